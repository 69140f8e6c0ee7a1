"""Memory kinds (memory.kind = ffn | lora_qk | lora_vo | lora_ffn | kv), each checked against a plain reference.

The reference is written here, independently of model/memory_kinds.py: every sequence's own weights are put
together row by row from the distinct blocks, decoded from their slabs by the layout stated below, and applied
to the anchor itself (ffn: neurons appended to gate/up/down_proj; LoRA: W + (alpha/R)·B·A merged into the
weights; kv: a hand-written forward with the extra attention over the sequence's own slots)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from hiermem.config import ModelConfig, check_training, load_config
from hiermem.errors import HiermemError
from hiermem.eval.generation import generate_ids
from hiermem.memory.bank import MemoryBank
from hiermem.memory.fetch import fetch
from hiermem.memory.spec import BankSpec, bank_param_counts, equal_fetched_ranks, parameter_report, stored_entries
from hiermem.model.fetched import FetchedMemory, MemoryPart
from hiermem.model.memory_kinds import read_matrix
from hiermem.model.transformer import KVCache, Transformer, apply_rope, rope_tables
from hiermem.train.loop import Trainer

D, H, HD, FF = 16, 2, 12, 40  # attention width 24 and d_ff 40: both need zero-padded slabs
W = H * HD
CFG = ModelConfig(vocab_size=61, n_layers=3, d_model=D, n_heads=H, head_dim=HD, d_ff=FF, max_seq_len=24)
KINDS = ["ffn", "lora_qk", "lora_vo", "lora_ffn", "kv"]
ALPHA = 3.0
LAYOUT = {  # each kind's matrices in slab order, (name, columns); a matrix of n columns takes ceil(n/D) slabs
    "ffn": [("gate", D), ("up", D), ("down", D)],
    "lora_qk": [("q_proj.A", D), ("q_proj.B", W), ("k_proj.A", D), ("k_proj.B", W)],
    "lora_vo": [("v_proj.A", D), ("v_proj.B", W), ("o_proj.A", W), ("o_proj.B", D)],
    "lora_ffn": [("gate_proj.A", D), ("gate_proj.B", FF), ("up_proj.A", D), ("up_proj.B", FF),
                 ("down_proj.A", FF), ("down_proj.B", D)],
    "kv": [("keys", W), ("values", W)],
}
PER_RANK = {"ffn": 3 * D, "lora_qk": 2 * (D + W), "lora_vo": 2 * (D + W), "lora_ffn": 3 * (D + FF), "kv": 2 * W}


def n_slabs(kind):
    return sum(-(-cols // D) for _, cols in LAYOUT[kind])


def spec_of(kind, **kw):
    widths = {"ffn": {}, "lora_ffn": {"d_ff": FF}}.get(kind, {"attn_width": W})
    lora = {"lora_alpha": ALPHA} if kind.startswith("lora_") else {}
    return BankSpec(**({"d": D, "n_layers": 3, "ranks": (2, 3), "branching": 2, "layers": (1, 3)} | widths
                       | lora | {"kind": kind} | kw))


def anchor():
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def decode(slabs, kind):
    """{name: [R, cols]} from one layer's slabs [S, R, D]: slab k of a matrix holds its columns kD .. kD+D-1."""
    out, first = {}, 0
    for name, cols in LAYOUT[kind]:
        n = -(-cols // D)
        out[name] = torch.cat(list(slabs[first:first + n]), dim=1)[:, :cols]
        first += n
    assert first == slabs.shape[0]
    return out


def padding_mask(kind):
    """[S, 1, D] True at the padding entries of a layer's slabs."""
    pad = torch.zeros(n_slabs(kind), 1, D, dtype=torch.bool)
    first = 0
    for _, cols in LAYOUT[kind]:
        n = -(-cols // D)
        pad[first:first + n].view(-1)[cols:] = True
        first += n
    return pad


def assert_close(a, b):
    """fp32 agreement relative to the tensor's scale (summation order differs between the two paths)."""
    torch.testing.assert_close(a, b, atol=2e-6 * max(1.0, float(b.detach().abs().max())), rtol=1e-5)


# -- the plain reference, one sequence at a time -----------------------------------------------------------
def row_weights(parts, b, R):
    """Row b's weights [L, S, R, D] and its slots (positions along R it has), from the parts' blocks."""
    w, slots = 0, torch.zeros(R, dtype=torch.bool)
    for p in parts:
        i = int(p.index[b])
        if i >= 0:
            r = p.weights.shape[3]
            w = w + F.pad(p.weights[i], (0, 0, p.offset, R - p.offset - r))
            slots[p.offset:p.offset + r] = True
    return w, slots


def kv_forward(model, ids, layers):
    """The anchor's forward written out, with layers[i] = (keys, values) [n, W] of layer i's memory (or None)."""
    B, T = ids.shape
    cos, sin = rope_tables(torch.arange(T).expand(B, T), HD, CFG.rope_base)
    x = model.tok_emb(ids)
    for blk, mem in zip(model.blocks, layers):
        a, h = blk.attn, blk.attn_norm(x)
        q = a.q_norm(a.q_proj(h)).view(B, T, H, HD).transpose(1, 2)
        k = a.k_norm(a.k_proj(h)).view(B, T, H, HD).transpose(1, 2)
        v = a.v_proj(h).view(B, T, H, HD).transpose(1, 2)
        y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True)
        if mem is not None:
            km, vm = (t.view(-1, H, HD).transpose(0, 1) for t in mem)  # [H, n, HD]
            y = y + torch.softmax(q @ km.transpose(-1, -2) / math.sqrt(HD), -1) @ vm
        x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + blk.ffn(blk.ffn_norm(x))
    return model.lm_head(model.norm(x))


def reference_logits(model, kind, ids, parts, R, first_layer):
    params = dict(model.named_parameters())
    out = []
    for b in range(ids.shape[0]):
        w, slots = row_weights(parts, b, R)
        mats = [decode(w[j], kind) for j in range(w.shape[0])]
        at = {first_layer + j: m for j, m in enumerate(mats)}
        if kind == "kv":
            layers = [None if i not in at else (at[i]["keys"][slots], at[i]["values"][slots])
                      for i in range(CFG.n_layers)]
            out.append(kv_forward(model, ids[b:b + 1], layers))
            continue
        p = dict(params)
        for i, m in at.items():
            if kind == "ffn":  # R more neurons in gate_proj, up_proj and down_proj
                for name in ("gate", "up"):
                    key = f"blocks.{i}.ffn.{name}_proj.weight"
                    p[key] = torch.cat([p[key], m[name]])
                key = f"blocks.{i}.ffn.down_proj.weight"
                p[key] = torch.cat([p[key], m["down"].T], 1)
                continue
            for name in {n.split(".")[0] for n, _ in LAYOUT[kind]}:  # W + (alpha/R)·B·A
                key = f"blocks.{i}.{'attn' if name[0] in 'qkvo' else 'ffn'}.{name}.weight"
                p[key] = p[key] + ALPHA / R * m[f"{name}.B"].T @ m[f"{name}.A"]
        out.append(functional_call(model, p, (ids[b:b + 1],))[0])
    return torch.cat(out)


def batch_parts(kind, g, L=2):
    """B=5 rows over R=5: level0 (rank 2, 2 blocks shared), level1 (rank 3; row 2 has none), a generic block
    (row 3); blocks random everywhere, their padding too (it must have no effect)."""
    def blocks(U, r):
        return (torch.randn(U, L, n_slabs(kind), r, D, generator=g) * 0.4).requires_grad_(True)

    return [MemoryPart(blocks(2, 2), torch.tensor([0, 1, 1, -1, 0]), 0, "level0"),
            MemoryPart(blocks(3, 3), torch.tensor([2, 0, -1, -1, 1]), 2, "level1"),
            MemoryPart(blocks(1, 5), torch.tensor([-1, -1, -1, 0, -1]), 0, "generic")]


# -- (1) zero effect at initialisation ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_bank_leaves_the_anchor_bit_identical_also_while_decoding(kind):
    model, spec = anchor(), spec_of(kind)
    bank = MemoryBank.create(spec, seed=1)
    assert all(bank.part(k).abs().sum() > 0 for k in bank.parts())  # not trivially zero: A / keys are drawn
    paths = torch.tensor([[0, 1], [1, 3], [0, 0]])
    memory = fetch(bank, paths, use_generic=torch.tensor([False, False, True])).memory
    ids = torch.randint(0, 61, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], model(ids, memory=memory)[0])
        caches = {True: KVCache(), False: KVCache()}
        for t in range(4):  # the prompt, then one token at a time
            step = ids[:, :4] if t == 0 else ids[:, 3 + t:4 + t]
            pos = torch.arange(step.shape[1]).expand(3, -1) + (0 if t == 0 else 3 + t)
            plain, _ = model(step, positions=pos, cache=caches[False])
            mem, _ = model(step, positions=pos, memory=memory, cache=caches[True])
            assert torch.equal(plain, mem), t


# -- (2) shared blocks = each sequence's own weights on the anchor ------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_batched_memory_equals_the_per_sequence_reference_forward_and_gradients(kind):
    model, g = anchor(), torch.Generator().manual_seed(KINDS.index(kind))
    parts = batch_parts(kind, g)
    ref_parts = [MemoryPart(p.weights.detach().clone().requires_grad_(True), p.index, p.offset, p.name)
                 for p in parts]
    memory = FetchedMemory(parts, 5, first_layer=1, kind=spec_of(kind).memory_kind)
    ids = torch.randint(0, 61, (5, 9), generator=g)
    probe = torch.randn(5, 9, 61, generator=g)

    logits, _ = model(ids, memory=memory)
    (logits * probe).sum().backward()
    anchor_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = reference_logits(model, kind, ids, ref_parts, 5, first_layer=1)
    (ref * probe).sum().backward()

    assert (logits - model(ids)[0]).abs().max() > 1e-3  # the memory does act
    assert_close(logits, ref)
    for p, q in zip(parts, ref_parts):
        assert p.weights.grad.abs().sum() > 0
        assert_close(p.weights.grad, q.weights.grad)
        assert not p.weights.grad.masked_fill(~padding_mask(kind), 0).any()  # padding: no effect, no gradient
    for n, p in model.named_parameters():
        assert_close(anchor_grads[n], p.grad)


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_blocks_trace_every_kind_whole_and_equal_eager(kind):
    """train.compile compiles each block: every kind's memory traces without a graph break (fullgraph) and gives
    the eager logits and gradients (aot_eager: the traced graph itself, not a code generator's kernels)."""
    results, traced = [], []
    for compiled in (False, True):
        torch._dynamo.reset()
        model, g = anchor(), torch.Generator().manual_seed(KINDS.index(kind))
        parts = batch_parts(kind, g)
        memory = FetchedMemory(parts, 5, first_layer=1, kind=spec_of(kind).memory_kind)
        ids = torch.randint(0, 61, (5, 9), generator=g)
        if compiled:
            for block in model.blocks:
                block.compile(backend="aot_eager", fullgraph=True)
        logits, _ = model(ids, memory=memory)
        logits.square().sum().backward()
        results.append((logits.detach(), [p.weights.grad for p in parts], [p.grad for p in model.parameters()]))
        traced.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert traced[1] > traced[0]  # the blocks were compiled
    (y_eager, g_eager, a_eager), (y_comp, g_comp, a_comp) = results
    assert_close(y_comp, y_eager)
    for a, b in zip(g_comp + a_comp, g_eager + a_eager):
        assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_with_a_kv_cache_matches_the_full_forward(kind):
    """LoRA on k/v changes what is cached consistently; kv memory slots are seen by every new query."""
    model, g = anchor(), torch.Generator().manual_seed(7)
    memory = FetchedMemory([p for p in batch_parts(kind, g)], 5, first_layer=1, kind=spec_of(kind).memory_kind)
    ids = torch.randint(0, 61, (5, 8), generator=g)
    with torch.no_grad():
        full, _ = model(ids, memory=memory)
        cache = KVCache()
        for t in range(5, 9):
            step = ids[:, :5] if t == 5 else ids[:, t - 1:t]
            pos = torch.arange(step.shape[1]).expand(5, -1) + (0 if t == 5 else t - 1)
            last, _ = model(step, positions=pos, memory=memory, cache=cache)
            assert_close(last[:, 0], full[:, t - 1])
        prompts = [ids[b, :3 + b].tolist() for b in range(5)]  # ragged: stacked and left-padded rows
        cached = generate_ids(model, prompts, memory=memory, max_new_tokens=4)
        assert cached == generate_ids(model, prompts, memory=memory, max_new_tokens=4, use_cache=False)


# -- (3) parameter accounting -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_parameter_counts_are_the_papers_and_the_entries_that_act(kind):
    spec = spec_of(kind)
    L, R = spec.n_mem_layers, spec.fetched_rank
    c = bank_param_counts(spec)
    assert spec.part_shape("level1") == (4, L, n_slabs(kind), 3, D)
    assert c["fetched"] == PER_RANK[kind] * L * R and c["generic"] == c["fetched"]
    assert c["bank"] == PER_RANK[kind] * L * (2 * 2 + 3 * 4)
    padding = (n_slabs(kind) * D - PER_RANK[kind]) * L * (2 * 2 + 3 * 4 + R)
    assert stored_entries(spec) == c["bank"] + c["generic"] + padding
    # the entries that act: a random memory's gradient is non-zero exactly at the counted ones
    w = torch.randn(1, L, n_slabs(kind), R, D, requires_grad=True)
    logits, _ = anchor()(torch.arange(9)[None], memory=FetchedMemory.per_sequence(w, 1, spec.memory_kind))
    (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert int((w.grad != 0).sum()) == c["fetched"]


def test_paper_formulae_at_the_160m_shape_and_equal_fetched_ranks():
    L, d, hdh, d_ff, r = 35, 512, 12 * 32, 2048, 256 + 64 + 16
    formula = {"ffn": 3 * r * L * d, "lora_qk": 2 * r * L * (d + hdh), "lora_vo": 2 * r * L * (d + hdh),
               "lora_ffn": 3 * r * L * (d + d_ff), "kv": 2 * r * L * hdh}
    for kind in KINDS:
        report = parameter_report(load_config("paper-160m", [f"memory.kind={kind}"]))
        assert report["fetched"] == formula[kind], kind
        assert ("stored" in report) == (kind in ("lora_qk", "lora_vo", "kv")), kind  # 384 < 512 pads; 2048 does not
        ranks = equal_fetched_ranks(load_config("paper-160m"), kind)
        per_rank = formula[kind] // r
        got = per_rank * sum(ranks)
        assert abs(got - formula["ffn"]) <= per_rank / 2, kind  # the closest total
        assert ranks[3] == 0 and all(x > 0 for x in ranks[:3]) and ranks[0] > ranks[1] > ranks[2], (kind, ranks)
    assert equal_fetched_ranks(load_config("paper-160m"), "ffn") == (256, 64, 16, 0)
    assert equal_fetched_ranks(load_config("paper-160m"), "kv") == (512, 128, 32, 0)  # 2·384 per rank vs 3·512
    assert equal_fetched_ranks(spec_of("lora_qk"), "lora_qk") == (1, 2)  # 5·48 / 80 = 3
    with pytest.raises(HiermemError, match=r"^equal_fetched_ranks: memory.kind=lora_ffn needs d_ff; pass the config$"):
        equal_fetched_ranks(spec_of("ffn"), "lora_ffn")


# -- specs, configs and refusals --------------------------------------------------------------------------
def test_specs_record_their_kind_and_old_manifests_load_as_ffn(tmp_path):
    spec = spec_of("lora_vo")
    assert BankSpec.from_dict(spec.to_dict()) == spec and spec.to_dict()["kind"] == "lora_vo"
    old = spec_of("ffn").to_dict()  # written as before memory kinds: no kind, no widths
    assert not {"kind", "attn_width", "d_ff", "lora_alpha"} & set(old) and BankSpec.from_dict(old) == spec_of("ffn")
    assert spec_of("lora_qk", lora_alpha=None).lora_alpha == 2.0  # the default
    bank = MemoryBank.create(spec, seed=0)
    with pytest.raises(HiermemError, match=r"^memory.kind: bank has lora_vo, config has kv$"):
        bank.check_compatible(spec_of("kv"))
    with pytest.raises(HiermemError, match=r"^memory.lora_alpha: bank has 3.0, config has 2.0$"):
        bank.check_compatible(spec_of("lora_vo", lora_alpha=2.0))


@pytest.mark.parametrize("kw,message", [
    (dict(kind="mlp"), "memory.kind: 'mlp' is not one of ffn, lora_qk, lora_vo, lora_ffn, kv"),
    (dict(kind="kv", attn_width=None), "memory.attn_width: memory.kind=kv needs a positive width, got None"),
    (dict(kind="ffn", d_ff=40), "memory.d_ff: memory.kind=ffn does not use it, got 40"),
    (dict(kind="lora_ffn", d_ff=FF, lora_alpha=0.0), "memory.lora_alpha: must be > 0, got 0.0"),
    (dict(kind="kv", attn_width=W, lora_alpha=2.0), "memory.lora_alpha: memory.kind=kv does not use it, got 2.0"),
])
def test_bad_kind_specs_are_refused(kw, message):
    with pytest.raises(HiermemError, match=f"^{message}$"):
        BankSpec(d=D, n_layers=3, ranks=(2,), branching=2, **kw)


def test_config_fields_and_refusals():
    with pytest.raises(HiermemError, match=r"^config: memory.kind='lora' is not one of ffn, lora_qk"):
        load_config("tiny", ["memory.kind=lora"])
    with pytest.raises(HiermemError, match=r"^config: memory.lora_alpha must be > 0 \(got -1.0\)$"):
        load_config("tiny", ["memory.lora_alpha=-1"])
    cfg = load_config("tiny", ["memory.kind=kv", "train.mode=frozen", "model.hf=/x"])
    with pytest.raises(HiermemError, match=r"^config: model.hf supports memory.kind=ffn only \(got kv\)$"):
        check_training(cfg)
    check_training(load_config("tiny", ["memory.kind=kv", "train.mode=scratch", "train.compile=true"]))


def test_the_transformers_hooks_refuse_other_kinds():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hiermem.model.hf.mlp import MemoryHooks

    hf = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=D, intermediate_size=FF, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, head_dim=12))
    memory = FetchedMemory.per_sequence(torch.zeros(1, 2, n_slabs("lora_qk"), 3, D), kind=spec_of("lora_qk").memory_kind)
    with pytest.raises(HiermemError, match=r"^memory.kind=lora_qk: the transformers path adds ffn memory only$"):
        with MemoryHooks(hf).using(memory):
            pass


# -- (4) end to end -----------------------------------------------------------------------------------------
@pytest.fixture
def make(longtail_data, tmp_path):
    def _make(name, *overrides):
        return load_config("tiny", [*longtail_data, f"train.run_dir={tmp_path / name}", *overrides])

    return _make


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kind", ["lora_qk", "lora_vo", "lora_ffn", "kv"])
def test_training_runs_with_each_kind(make, kind):
    common = ["train.mode=scratch", "train.max_steps=3", f"memory.kind={kind}"]
    ram = Trainer(make("ram", *common), progress=False)
    summary = ram.run()
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"])
    spec = ram.bank.spec
    fresh = MemoryBank.create(spec, seed=ram.cfg.train.seed)
    zero = spec.memory_kind.matrix("values" if kind == "kv" else LAYOUT[kind][1][0], spec.d)  # a B, or the values
    trained, init = (read_matrix(b.read_part("level0"), zero) for b in (ram.bank, fresh))
    assert not init.any() and trained.abs().sum() > 0  # zero at init, then learned
    if kind == "lora_ffn":  # a bank on disk trains to the same blocks
        disk = Trainer(make("disk", *common, "memory.mmap=true", "memory.cache_bytes=400000"), progress=False)
        disk.run()
        for key in ram.bank.parts():
            assert torch.equal(disk.bank.read_part(key), ram.bank.read_part(key)), key
