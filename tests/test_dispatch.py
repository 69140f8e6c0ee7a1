"""Grouped-by-node memory (memory/dispatch.py) against the gathered per-sequence path: same forward, same
per-block gradients, same optimizer step; and a zero memory leaves the anchor bit-identical."""

import numpy as np
import pytest
import torch

from hiermem.config import ModelConfig, load_config
from hiermem.errors import HiermemError
from hiermem.memory.bank import BankSpec, MemoryBank, Prefetcher
from hiermem.memory.dispatch import GroupedMemory, MemoryPart, apply_memory, gathered_ffn, select_rows
from hiermem.memory.optim import LazyAdamW
from hiermem.model.transformer import Transformer

CFG = ModelConfig(vocab_size=61, n_layers=3, d_model=16, n_heads=2, head_dim=8, d_ff=24, max_seq_len=16)
SPEC = BankSpec(d=16, n_layers=3, ranks=(4, 0, 3), branching=2, layers=(1, 3))


def model():
    torch.manual_seed(0)
    return Transformer(CFG)


def trained_bank(spec=SPEC, seed=0):
    """A bank whose down rows are non-zero (as after training), so every block gets a gradient."""
    bank = MemoryBank.create(spec, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key in bank.parts():
            t = bank.part(key)
            t[:, :, 2] = torch.randn(t[:, :, 2].shape, generator=g) * 0.3
    return bank


def shared_paths(B, seed=0):
    """Consistent root-to-leaf paths with heavy sharing (branching 2: few distinct nodes per level)."""
    leaves = np.random.default_rng(seed).integers(0, SPEC.n_nodes(2), B)
    return np.stack([leaves // 4, leaves // 2, leaves], axis=1).astype(np.int64)


def run(m, bank, fetch, ids, micro=None):
    B = ids.shape[0]
    micro = micro or B
    outs = []
    for lo in range(0, B, micro):
        sl = slice(lo, lo + micro)
        logits, loss = m(ids[sl], ids[sl], memory=select_rows(fetch.memory, sl))
        (loss * (ids[sl].shape[0] / B)).backward()
        outs.append(logits)
    return torch.cat(outs), bank.block_grads(fetch)


@pytest.mark.parametrize("generic", [None, "some", "all"])
def test_grouped_equals_gathered_forward_and_block_grads(generic):
    bank = trained_bank()
    B = 6
    paths = shared_paths(B)
    use = {None: None, "some": torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool),
           "all": torch.ones(B, dtype=torch.bool)}[generic]
    ids = torch.randint(0, CFG.vocab_size, (B, 10), generator=torch.Generator().manual_seed(3))
    m_ref, m_grp = model(), model()
    f_ref = bank.fetch(paths, use, requires_grad=True)
    f_grp = bank.fetch_grouped(paths, use, requires_grad=True)
    if generic != "all":
        assert len(f_grp.memory.parts[0].weights) < B  # shared blocks are held once, not once per row
    out_ref, g_ref = run(m_ref, bank, f_ref, ids)
    out_grp, g_grp = run(m_grp, bank, f_grp, ids)
    torch.testing.assert_close(out_grp, out_ref, atol=1e-5, rtol=1e-5)
    assert sorted(g_grp.ids) == sorted(g_ref.ids)
    for key in g_ref.ids:
        assert torch.equal(g_grp.ids[key], g_ref.ids[key])
        assert g_grp.grads[key].shape == g_ref.grads[key].shape
        assert g_ref.grads[key].abs().sum() > 0
        torch.testing.assert_close(g_grp.grads[key], g_ref.grads[key], atol=1e-5, rtol=1e-5)
    for (n, p), q in zip(m_ref.named_parameters(), m_grp.parameters()):  # the anchor sees the same gradient
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=n)


def test_micro_batches_accumulate_into_the_same_leaves():
    bank = trained_bank()
    paths = shared_paths(6, seed=1)
    ids = torch.randint(0, CFG.vocab_size, (6, 8), generator=torch.Generator().manual_seed(4))
    _, whole = run(model(), bank, bank.fetch(paths, requires_grad=True), ids)
    _, parts = run(model(), bank, bank.fetch_grouped(paths, requires_grad=True), ids, micro=4)
    for key in whole.ids:
        torch.testing.assert_close(parts.grads[key], whole.grads[key], atol=1e-5, rtol=1e-5)


def test_zero_memory_is_bit_identical_to_anchor_on_the_grouped_path():
    bank = MemoryBank.create(SPEC, seed=0)  # fresh: down rows are zero
    m = model()
    ids = torch.randint(0, CFG.vocab_size, (5, 12))
    use = torch.tensor([0, 0, 1, 0, 0], dtype=torch.bool)
    with torch.no_grad():
        plain, _ = m(ids)
        grouped, _ = m(ids, memory=bank.fetch_grouped(shared_paths(5), use).memory)
    assert torch.equal(plain, grouped)


def test_fetch_grouped_reads_each_block_once_and_expands_to_fetch():
    bank = trained_bank()
    paths = shared_paths(8, seed=2)
    use = torch.tensor([0, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    f_ref, f_grp = bank.fetch(paths, use), bank.fetch_grouped(paths, use)
    names = [p.name for p in f_grp.memory.parts]
    assert names == ["level0", "level2", "generic"]
    for p in f_grp.memory.parts[:2]:
        ids = f_grp.node_ids[p.name]
        assert torch.equal(p.weights, bank.part(p.name)[ids])  # U distinct blocks, in node-id order
        assert len(ids) == len(np.unique(paths[~use.numpy(), int(p.name[5:])]))
        assert (p.index[use] == -1).all()
    layers = f_grp.memory.per_layer(CFG.n_layers)
    assert layers[0] is None
    for layer in (1, 2):
        torch.testing.assert_close(layers[layer].expand(torch.float32), f_ref.memory.for_layer(layer), rtol=0, atol=0)
    bank.record(f_grp)
    assert bank.generic_fetch_count == 1


def test_lazy_adamw_step_after_grouped_equals_after_gathered():
    paths = shared_paths(6, seed=5)
    ids = torch.randint(0, CFG.vocab_size, (6, 8), generator=torch.Generator().manual_seed(6))
    use = torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.bool)
    result = []
    for grouped in (False, True):
        bank = trained_bank()
        opt = LazyAdamW(bank, lr=1e-3)  # first step ~ lr·sign(g): tiny g differences show up
        fetch = (bank.fetch_grouped if grouped else bank.fetch)(paths, use, requires_grad=True)
        _, grads = run(model(), bank, fetch, ids)
        opt.step(grads)
        result.append({k: bank.part(k).clone() for k in bank.parts()})
    for k in result[0]:
        torch.testing.assert_close(result[1][k], result[0][k], atol=1e-5, rtol=1e-5)


def test_grouped_backward_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    d, B, T = 5, 4, 3
    lvl = torch.randn(2, 1, 3, 3, d, generator=g, dtype=torch.float64, requires_grad=True)
    gen = torch.randn(1, 1, 3, 5, d, generator=g, dtype=torch.float64, requires_grad=True)
    lvl2 = torch.randn(3, 1, 3, 2, d, generator=g, dtype=torch.float64, requires_grad=True)
    parts = [MemoryPart(lvl, torch.tensor([0, 1, -1, 0]), 0), MemoryPart(lvl2, torch.tensor([2, 0, -1, 2]), 3),
             MemoryPart(gen, torch.tensor([-1, -1, 0, -1]), 0)]
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x, a, b, c):
        mem = GroupedMemory([MemoryPart(a, parts[0].index, 0), MemoryPart(b, parts[1].index, 3),
                             MemoryPart(c, parts[2].index, 0)], rank=5)
        return apply_memory(x, mem.per_layer(1)[0])

    assert torch.autograd.gradcheck(f, (x, lvl, lvl2, gen))
    # and the same values as the per-sequence reference
    rows = torch.stack([torch.cat([lvl[0, 0], lvl2[2, 0]], 1), torch.cat([lvl[1, 0], lvl2[0, 0]], 1), gen[0, 0],
                        torch.cat([lvl[0, 0], lvl2[2, 0]], 1)])
    torch.testing.assert_close(f(x, lvl, lvl2, gen), gathered_ffn(x, rows))


def test_bf16_autocast_runs_and_stays_close():
    bank = trained_bank()
    paths = shared_paths(4)
    ids = torch.randint(0, CFG.vocab_size, (4, 8))
    m = model()
    outs = []
    for fetch_fn in (bank.fetch, bank.fetch_grouped):
        f = fetch_fn(paths, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = m(ids, ids, memory=f.memory)
        loss.backward()
        outs.append((logits.float(), bank.block_grads(f)))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=5e-2, rtol=5e-2)
    for key in outs[0][1].ids:
        a, b = outs[0][1].grads[key], outs[1][1].grads[key]
        assert b.dtype == torch.float32
        assert (a - b).norm() <= 5e-2 * a.norm() + 1e-6


def test_prefetcher_grouped_returns_what_fetch_grouped_returns():
    bank = trained_bank()
    paths = shared_paths(5, seed=7)
    with Prefetcher(bank, requires_grad=True, grouped=True) as pf:
        pf.submit(paths)
        got = pf.result()
    ref = bank.fetch_grouped(paths)
    assert isinstance(got.memory, GroupedMemory)
    for a, b in zip(got.memory.parts, ref.memory.parts):
        assert a.weights.requires_grad and torch.equal(a.weights.detach(), b.weights)


def test_block_grads_without_backward_is_refused():
    bank = trained_bank()
    with pytest.raises(RuntimeError, match="no gradients"):
        bank.block_grads(bank.fetch_grouped(shared_paths(3)))


def test_dispatch_config_field_is_validated():
    assert load_config(None, ["memory.dispatch=grouped"]).memory.dispatch == "grouped"
    with pytest.raises(HiermemError, match="memory.dispatch"):
        load_config(None, ["memory.dispatch=scatter"])


def test_grouped_memory_refuses_inconsistent_parts():
    w = torch.zeros(2, 1, 3, 4, 8)
    with pytest.raises(ValueError, match="batch size"):
        GroupedMemory([MemoryPart(w, torch.zeros(3, dtype=torch.long), 0),
                       MemoryPart(w, torch.zeros(4, dtype=torch.long), 4)], rank=8)
    with pytest.raises(ValueError, match="outside R"):
        GroupedMemory([MemoryPart(w, torch.zeros(3, dtype=torch.long), 6)], rank=8)
    layer = GroupedMemory([MemoryPart(w, torch.zeros(3, dtype=torch.long), 0)], rank=4).per_layer(1)[0]
    with pytest.raises(ValueError, match="3 rows"):
        apply_memory(torch.zeros(2, 5, 8), layer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grouped_path_on_gpu_matches_gathered():
    bank = trained_bank()
    paths = shared_paths(6)
    ids = torch.randint(0, CFG.vocab_size, (6, 10)).cuda()
    res = []
    for fetch_fn in (bank.fetch, bank.fetch_grouped):
        m = model().cuda()
        f = fetch_fn(paths, requires_grad=True, device="cuda")
        out, g = run(m, bank, f, ids)
        res.append((out, g))
    torch.testing.assert_close(res[1][0], res[0][0], atol=1e-4, rtol=1e-4)
    for key in res[0][1].ids:
        torch.testing.assert_close(res[1][1].grads[key], res[0][1].grads[key], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("generic", [False, True])
def test_traceable_expansion_used_under_torch_compile_matches_the_custom_backward(generic):
    """Inside a compiled block the grouped layer runs plain ops (expand_traceable + the reference matmuls);
    its values and per-block gradients equal the eager custom-backward path's."""
    bank = trained_bank()
    use = torch.tensor([0, 1, 0, 0], dtype=torch.bool) if generic else None
    f = bank.fetch_grouped(shared_paths(4, seed=8), use, requires_grad=True)
    layer = f.memory.per_layer(CFG.n_layers)[1]
    x = torch.randn(4, 5, CFG.d_model, generator=torch.Generator().manual_seed(9))
    assert torch.equal(layer.expand_traceable(), layer.expand(torch.float32))
    y_eager = apply_memory(x, layer)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), layer.weights)
    y_trace = gathered_ffn(x, layer.expand_traceable())
    grads_trace = torch.autograd.grad(y_trace.square().sum(), layer.weights)
    torch.testing.assert_close(y_trace, y_eager, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_trace, grads_eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
