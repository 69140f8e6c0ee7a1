"""model/fetched.py, the one memory representation: per part the distinct blocks plus each row's index.

Every path (the custom-autograd MemoryLayer, the traceable expansion used under torch.compile, micro-batches
through rows()) is checked against the plain reference: each row's neurons written out one by one, run through
widened_ffn, and each distinct block's gradient summed over the rows that use it; a zero memory leaves the
anchor bit-identical."""

import numpy as np
import pytest
import torch

from hiermem.config import ModelConfig
from hiermem.memory.bank import MemoryBank
from hiermem.memory.fetch import BlockGrads, block_grads, fetch
from hiermem.memory.optim import LazyAdamW
from hiermem.memory.spec import BankSpec
from hiermem.model.fetched import DOWN, FetchedMemory, MemoryPart, widened_ffn
from hiermem.model.transformer import Transformer

CFG = ModelConfig(vocab_size=61, n_layers=3, d_model=16, n_heads=2, head_dim=8, d_ff=24, max_seq_len=16)
SPEC = BankSpec(d=16, n_layers=3, ranks=(4, 0, 3), branching=2, layers=(1, 3))


# -- the reference ---------------------------------------------------------------------------------------------
def per_row(mem: FetchedMemory) -> torch.Tensor:
    """Each row's neurons [B, n_mem_layers, 3, R, d], written out row by row (zeros where a row uses no part)."""
    w0 = mem.parts[0].weights
    out = torch.zeros(mem.batch_size, mem.n_layers, 3, mem.rank, w0.shape[-1], dtype=w0.dtype)
    for p in mem.parts:
        for b, i in enumerate(p.index.tolist()):
            if i >= 0:
                out[b, :, :, p.offset:p.offset + p.rank] = p.weights[i].detach().cpu()
    return out


def sum_per_block(mem: FetchedMemory, row_grads: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per part: each distinct block's gradient = the sum over the rows that use it of their rows' gradient."""
    out = {}
    for p in mem.parts:
        g = torch.zeros(p.weights.shape, dtype=row_grads.dtype)
        for b, i in enumerate(p.index.tolist()):
            if i >= 0:
                g[i] += row_grads[b, :, :, p.offset:p.offset + p.rank].cpu()
        out[p.name] = g
    return out


# -- layer level: MemoryLayer against widened_ffn ---------------------------------------------------------------
def layer_parts(case: str, g: torch.Generator, dtype=torch.float64, L: int = 1):
    """Parts over B=5 rows and R=5 (a level of rank 3 at 0, a level of rank 2 at 3, a generic block of rank 5)."""
    def w(U, r):
        return (torch.randn(U, L, 3, r, 6, generator=g, dtype=dtype) * 0.5).requires_grad_(True)

    a, b, gen = w(2, 3), w(3, 2), w(1, 5)
    if case == "dense":  # every row uses both levels: the fast path (one cat, no zero fill)
        return [MemoryPart(a, torch.tensor([0, 1, 1, 0, 1]), 0, "a"), MemoryPart(b, torch.tensor([2, 0, 2, 1, 2]), 3, "b")]
    if case == "one_part":
        return [MemoryPart(w(2, 5), torch.tensor([1, 0, 1, 1, 0]), 0, "a")]
    if case == "generic_some":
        return [MemoryPart(a, torch.tensor([0, 1, -1, 0, -1]), 0, "a"), MemoryPart(b, torch.tensor([2, 0, -1, 2, -1]), 3, "b"),
                MemoryPart(gen, torch.tensor([-1, -1, 0, -1, 0]), 0, "generic")]
    if case == "generic_all":
        return [MemoryPart(a, torch.full((5,), -1), 0, "a"), MemoryPart(gen, torch.zeros(5, dtype=torch.long), 0, "generic")]
    if case == "partial":  # row 1 uses level a only, row 3 level b only: zero neurons elsewhere
        return [MemoryPart(a, torch.tensor([0, 1, -1, -1, 0]), 0, "a"), MemoryPart(b, torch.tensor([1, -1, -1, 2, 1]), 3, "b")]
    raise AssertionError(case)


CASES = ["dense", "one_part", "generic_some", "generic_all", "partial"]


@pytest.mark.parametrize("case", CASES)
def test_memory_layer_equals_widened_ffn_forward_and_per_block_grads(case):
    g = torch.Generator().manual_seed(CASES.index(case))
    mem = FetchedMemory(layer_parts(case, g), rank=5)
    layer = mem.per_layer(1)[0]
    assert layer.dense == (case in ("dense", "one_part", "generic_all"))  # (unused parts are left out)
    rows = per_row(mem)
    assert torch.equal(layer.expand(torch.float64), rows[:, 0])
    assert torch.equal(layer.expand_traceable(), rows[:, 0])
    x = torch.randn(5, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    coeff = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (y * coeff).sum().backward()

    ref_rows = rows[:, 0].clone().requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    y_ref = widened_ffn(ref_x, ref_rows)
    (y_ref * coeff).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12)
    want = sum_per_block(mem, ref_rows.grad[:, None])
    for p in mem.parts:
        if (p.index >= 0).any():
            assert p.weights.grad.abs().sum() > 0
            torch.testing.assert_close(p.weights.grad, want[p.name], rtol=1e-12, atol=1e-12, msg=p.name)
        else:  # a part no row uses is left out of the layer: no gradient at all
            assert p.weights.grad is None


def test_per_layer_places_memory_on_its_layers():
    g = torch.Generator().manual_seed(0)
    mem = FetchedMemory(layer_parts("generic_some", g, L=2), rank=5, first_layer=1)
    layers = mem.per_layer(4)
    assert layers[0] is None and layers[3] is None and layers[1] is not None and layers[2] is not None
    for j, layer in enumerate(layers[1:3]):
        assert torch.equal(layer.expand(torch.float64), per_row(mem)[:, j])
    unused = FetchedMemory([MemoryPart(torch.zeros(1, 2, 3, 4, 6), torch.full((3,), -1), 0)], rank=4)
    assert unused.per_layer(3) == [None, None, None]  # no row uses any part
    empty = FetchedMemory.per_sequence(torch.zeros(3, 2, 3, 0, 6))
    assert empty.per_layer(2) == [None, None]  # rank 0: nothing to add
    ps = FetchedMemory.per_sequence(torch.randn(3, 2, 3, 4, 6), first_layer=1)
    assert ps.parts[0].index.tolist() == [0, 1, 2] and ps.rank == 4 and ps.batch_size == 3 and ps.n_layers == 2
    assert ps.per_layer(3)[1].dense and torch.equal(per_row(ps), ps.parts[0].weights)


def test_rows_are_micro_batches_of_the_same_leaves():
    g = torch.Generator().manual_seed(5)
    parts = layer_parts("generic_some", g, L=2)
    mem = FetchedMemory(parts, rank=5, first_layer=0)
    x = torch.randn(5, 3, 6, generator=g, dtype=torch.float64)

    def loss(m, xs):
        out = xs
        for layer in m.per_layer(2):
            out = out + layer(out)
        return out.square().sum()

    loss(mem, x).backward()
    whole = [p.weights.grad.clone() for p in parts]
    for p in parts:
        p.weights.grad = None
    for sl in (slice(0, 2), slice(2, 5)):
        sub = mem.rows(sl)
        assert sub.batch_size == sl.stop - sl.start
        assert all(a.weights is b.weights for a, b in zip(sub.parts, parts))  # the very same leaves
        loss(sub, x[sl]).backward()
    for p, w in zip(parts, whole):
        torch.testing.assert_close(p.weights.grad, w, rtol=1e-12, atol=1e-12)


def test_backward_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    d, B, T = 5, 4, 3
    lvl = torch.randn(2, 1, 3, 3, d, generator=g, dtype=torch.float64, requires_grad=True)
    gen = torch.randn(1, 1, 3, 5, d, generator=g, dtype=torch.float64, requires_grad=True)
    lvl2 = torch.randn(3, 1, 3, 2, d, generator=g, dtype=torch.float64, requires_grad=True)
    index = [torch.tensor([0, 1, -1, 0]), torch.tensor([2, 0, -1, 2]), torch.tensor([-1, -1, 0, -1])]
    x = torch.randn(B, T, d, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x, a, b, c):
        mem = FetchedMemory([MemoryPart(a, index[0], 0), MemoryPart(b, index[1], 3), MemoryPart(c, index[2], 0)], rank=5)
        return mem.per_layer(1)[0](x)

    assert torch.autograd.gradcheck(f, (x, lvl, lvl2, gen))
    # and the same values as the per-sequence reference
    rows = torch.stack([torch.cat([lvl[0, 0], lvl2[2, 0]], 1), torch.cat([lvl[1, 0], lvl2[0, 0]], 1), gen[0, 0],
                        torch.cat([lvl[0, 0], lvl2[2, 0]], 1)])
    torch.testing.assert_close(f(x, lvl, lvl2, gen), widened_ffn(x, rows))


@pytest.mark.parametrize("case", ["dense", "generic_some"])
def test_compiled_layer_equals_the_eager_custom_backward(case):
    """Under torch.compile (fullgraph: no graph break) a MemoryLayer runs the traceable branch (plain ops); its
    forward and the leaves' gradients equal the eager custom-autograd path's."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(7)
    parts = layer_parts(case, g, dtype=torch.float32, L=2)
    mem = FetchedMemory(parts, rank=5, first_layer=1)
    x = torch.randn(5, 4, 6, generator=g)
    compiling = []

    def apply(x, layers):
        compiling.append(torch.compiler.is_compiling())
        out = x
        for layer in layers:
            if layer is not None:
                out = out + layer(out)
        return out

    # the layers are made outside the traced code and passed in, as Transformer.forward hands them to its
    # compiled blocks (torch 2.11's Dynamo cannot build a MemoryLayer inside a trace: it refuses the kind constant)
    compiled = torch.compile(apply, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (apply, compiled):
        y = fn(x, mem.per_layer(3))
        results.append((y.detach(), torch.autograd.grad(y.square().sum(), [p.weights for p in parts])))
    assert compiling == [False, True]  # eager, then traced once by the compiler
    (y_eager, g_eager), (y_comp, g_comp) = results
    torch.testing.assert_close(y_comp, y_eager, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_comp, g_eager):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_inconsistent_parts_and_batches_are_refused():
    w = torch.zeros(2, 1, 3, 4, 8)
    with pytest.raises(ValueError, match="batch size"):
        FetchedMemory([MemoryPart(w, torch.zeros(3, dtype=torch.long), 0),
                       MemoryPart(w, torch.zeros(4, dtype=torch.long), 4)], rank=8)
    with pytest.raises(ValueError, match="layers"):
        FetchedMemory([MemoryPart(w, torch.zeros(3, dtype=torch.long), 0),
                       MemoryPart(torch.zeros(2, 2, 3, 4, 8), torch.zeros(3, dtype=torch.long), 4)], rank=8)
    with pytest.raises(ValueError, match="outside R"):
        FetchedMemory([MemoryPart(w, torch.zeros(3, dtype=torch.long), 6)], rank=8)
    with pytest.raises(ValueError, match="outside R"):
        FetchedMemory([MemoryPart(torch.zeros(2, 1, 2, 4, 8), torch.zeros(3, dtype=torch.long), 0)], rank=4)
    with pytest.raises(ValueError, match="outside R"):
        FetchedMemory([MemoryPart(torch.zeros(2, 3, 4, 8), torch.zeros(3, dtype=torch.long), 0)], rank=4)
    with pytest.raises(ValueError, match="at least one part"):
        FetchedMemory([], rank=4)
    layer = FetchedMemory([MemoryPart(w, torch.zeros(3, dtype=torch.long), 0)], rank=4).per_layer(1)[0]
    with pytest.raises(ValueError, match="3 rows"):
        layer(torch.zeros(2, 5, 8))


# -- model level: a bank's fetch against per-sequence copies of each row's neurons ------------------------------
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
            t[:, :, DOWN] = torch.randn(t[:, :, DOWN].shape, generator=g) * 0.3
    return bank


def shared_paths(B, seed=0):
    """Consistent root-to-leaf paths with heavy sharing (branching 2: few distinct nodes per level)."""
    leaves = np.random.default_rng(seed).integers(0, SPEC.n_nodes(2), B)
    return np.stack([leaves // 4, leaves // 2, leaves], axis=1).astype(np.int64)


def run(m, memory, ids, micro=None):
    B = ids.shape[0]
    micro = micro or B
    outs = []
    for lo in range(0, B, micro):
        sl = slice(lo, lo + micro)
        logits, loss = m(ids[sl], ids[sl], memory=memory.rows(sl))
        (loss * (ids[sl].shape[0] / B)).backward()
        outs.append(logits)
    return torch.cat(outs)


def reference(f):
    """Per-sequence copies of a fetch's rows, as a leaf, and the FetchedMemory over them."""
    rows = per_row(f.memory).to(f.memory.parts[0].weights.device).requires_grad_(True)
    return rows, FetchedMemory.per_sequence(rows, f.memory.first_layer)


@pytest.mark.parametrize("generic", [None, "some", "all"])
def test_fetched_memory_equals_per_sequence_reference_in_the_model(generic):
    bank = trained_bank()
    B = 6
    paths = shared_paths(B)
    use = {None: None, "some": torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool),
           "all": torch.ones(B, dtype=torch.bool)}[generic]
    ids = torch.randint(0, CFG.vocab_size, (B, 10), generator=torch.Generator().manual_seed(3))
    f = fetch(bank, paths, use, requires_grad=True)
    if generic != "all":
        assert len(f.memory.parts[0].weights) < B  # shared blocks are held once, not once per row
    rows, ref_mem = reference(f)
    m_ref, m = model(), model()
    out_ref = run(m_ref, ref_mem, ids)
    out = run(m, f.memory, ids)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    got, want = block_grads(f, "cpu"), sum_per_block(f.memory, rows.grad)
    assert sorted(got.ids) == sorted(p.name for p in f.memory.parts if len(p.weights))  # (no empty parts)
    for key, g in got.grads.items():
        assert g.shape == want[key].shape and g.dtype == torch.float32
        assert want[key].abs().sum() > 0
        torch.testing.assert_close(g, want[key], atol=1e-5, rtol=1e-5, msg=key)
    for (n, p), q in zip(m_ref.named_parameters(), m.parameters()):  # the anchor sees the same gradient
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5, msg=n)


def test_micro_batches_accumulate_into_the_same_leaves():
    bank = trained_bank()
    paths = shared_paths(6, seed=1)
    ids = torch.randint(0, CFG.vocab_size, (6, 8), generator=torch.Generator().manual_seed(4))
    f_whole, f_parts = fetch(bank, paths, requires_grad=True), fetch(bank, paths, requires_grad=True)
    run(model(), f_whole.memory, ids)
    run(model(), f_parts.memory, ids, micro=4)
    whole, parts = block_grads(f_whole, "cpu"), block_grads(f_parts, "cpu")
    for key in whole.ids:
        torch.testing.assert_close(parts.grads[key], whole.grads[key], atol=1e-5, rtol=1e-5)


def test_zero_memory_is_bit_identical_to_anchor():
    bank = MemoryBank.create(SPEC, seed=0)  # fresh: down rows are zero
    m = model()
    ids = torch.randint(0, CFG.vocab_size, (5, 12))
    use = torch.tensor([0, 0, 1, 0, 0], dtype=torch.bool)
    with torch.no_grad():
        plain, _ = m(ids)
        with_memory, _ = m(ids, memory=fetch(bank, shared_paths(5), use).memory)
    assert torch.equal(plain, with_memory)


def test_lazy_adamw_step_after_fetched_equals_after_reference():
    paths = shared_paths(6, seed=5)
    ids = torch.randint(0, CFG.vocab_size, (6, 8), generator=torch.Generator().manual_seed(6))
    use = torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.bool)
    result = []
    for via_reference in (False, True):
        bank = trained_bank()
        opt = LazyAdamW(bank, lr=1e-3)  # first step ~ lr·sign(g): tiny g differences show up
        f = fetch(bank, paths, use, requires_grad=True)
        if via_reference:
            rows, ref_mem = reference(f)
            run(model(), ref_mem, ids)
            grads = BlockGrads({k: v for k, v in f.block_ids.items()}, sum_per_block(f.memory, rows.grad))
        else:
            run(model(), f.memory, ids)
            grads = block_grads(f, "cpu")
        opt.step(grads)
        result.append({k: bank.part(k).clone() for k in bank.parts()})
    for k in result[0]:
        torch.testing.assert_close(result[1][k], result[0][k], atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # rms_norm: fp32 weight
def test_bf16_autocast_runs_and_stays_close():
    bank = trained_bank()
    ids = torch.randint(0, CFG.vocab_size, (4, 8))
    m = model()
    f = fetch(bank, shared_paths(4), requires_grad=True)
    rows, ref_mem = reference(f)
    outs = []
    for memory in (ref_mem, f.memory):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = m(ids, ids, memory=memory)
        loss.backward()
        outs.append(logits.float())
    torch.testing.assert_close(outs[1], outs[0], atol=5e-2, rtol=5e-2)
    want, got = sum_per_block(f.memory, rows.grad), block_grads(f, "cpu")
    for key, b in got.grads.items():
        a = want[key]
        assert b.dtype == torch.float32 and f.memory.parts[0].weights.grad.dtype == torch.float32
        assert (a - b).norm() <= 5e-2 * a.norm() + 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fetched_memory_on_gpu_matches_the_per_sequence_reference():
    bank = trained_bank()
    paths = shared_paths(6)
    ids = torch.randint(0, CFG.vocab_size, (6, 10)).cuda()
    f = fetch(bank, paths, torch.tensor([0, 1, 0, 0, 0, 0], dtype=torch.bool), device="cuda", requires_grad=True)
    rows, ref_mem = reference(f)
    out_ref = run(model().cuda(), ref_mem, ids)
    out = run(model().cuda(), f.memory, ids)
    torch.testing.assert_close(out, out_ref, atol=1e-4, rtol=1e-4)
    want, got = sum_per_block(f.memory, rows.grad), block_grads(f, "cpu")
    for key in got.ids:
        torch.testing.assert_close(got.grads[key], want[key].float(), atol=1e-4, rtol=1e-4)
