import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from hiermem.config import ModelConfig
from hiermem.model import FetchedMemory
from hiermem.model.transformer import Transformer, count_parameters, document_mask, next_token_loss

TINY = ModelConfig(vocab_size=97, n_layers=3, d_model=32, n_heads=2, head_dim=8, d_ff=48, max_seq_len=32)


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(TINY, **kw)).eval()


@pytest.mark.parametrize(
    "shape,expected",
    [
        (dict(n_layers=35, d_model=512, n_heads=12, head_dim=32, d_ff=2048, tie_embeddings=True), 163_510_016),
        (dict(n_layers=24, d_model=1024, n_heads=16, head_dim=64, d_ff=2816, tie_embeddings=False), 411_665_408),
        (dict(n_layers=24, d_model=2048, n_heads=16, head_dim=128, d_ff=5632, tie_embeddings=False), 1_439_893_504),
        (dict(n_layers=12, d_model=1024, n_heads=16, head_dim=64, d_ff=2816, tie_embeddings=False), 257_475_584),
    ],
)
def test_paper_parameter_counts_without_allocating(shape, expected):
    assert count_parameters(ModelConfig(vocab_size=50_432, **shape)) == expected


@pytest.mark.parametrize("tie,qk", [(True, True), (False, False)])
def test_count_matches_built_model(tie, qk):
    m = tiny(tie_embeddings=tie, qk_norm=qk)
    assert sum(p.numel() for p in m.parameters()) == count_parameters(m.cfg)


def test_zero_memory_is_bit_identical_to_anchor():
    m = tiny()
    ids = torch.randint(0, 97, (3, 16))
    w = torch.randn(3, 3, 3, 5, 32)
    w[:, :, 2] = 0  # down part zero, as a fresh bank initialises it
    with torch.no_grad():
        plain, _ = m(ids)
        with_mem, _ = m(ids, memory=FetchedMemory.per_sequence(w))
    assert torch.equal(plain, with_mem)


def test_batched_memory_equals_concatenated_ffn_per_sequence():
    """Memory = extra SwiGLU neurons: per sequence, concatenate them into gate/up/down_proj and run a plain model."""
    m = tiny()
    ids = torch.randint(0, 97, (3, 12))
    w = torch.randn(3, 2, 3, 4, 32) * 0.3
    mem = FetchedMemory.per_sequence(w, first_layer=1)  # layers 1 and 2 only
    with torch.no_grad():
        batched, _ = m(ids, memory=mem)
        for b in range(3):
            ref = tiny(d_ff=TINY.d_ff + 4)
            state = {k: v.clone() for k, v in m.state_dict().items()}
            for j, layer in enumerate((1, 2)):
                p = f"blocks.{layer}.ffn."
                state[p + "gate_proj.weight"] = torch.cat([state[p + "gate_proj.weight"], w[b, j, 0]], 0)
                state[p + "up_proj.weight"] = torch.cat([state[p + "up_proj.weight"], w[b, j, 1]], 0)
                state[p + "down_proj.weight"] = torch.cat([state[p + "down_proj.weight"], w[b, j, 2].T], 1)
            for layer in (0,):  # layer 0 has no memory: pad with neurons whose down column is zero
                p = f"blocks.{layer}.ffn."
                state[p + "gate_proj.weight"] = torch.cat([state[p + "gate_proj.weight"], torch.zeros(4, 32)], 0)
                state[p + "up_proj.weight"] = torch.cat([state[p + "up_proj.weight"], torch.zeros(4, 32)], 0)
                state[p + "down_proj.weight"] = torch.cat([state[p + "down_proj.weight"], torch.zeros(32, 4)], 1)
            ref.load_state_dict(state)
            expected, _ = ref(ids[b : b + 1])
            torch.testing.assert_close(batched[b : b + 1], expected, atol=1e-5, rtol=1e-5)


def test_segment_ids_give_each_document_the_logits_it_has_alone():
    """Packed rows (several documents, restarting positions, padding) == each document run alone."""
    m = tiny()
    g = torch.Generator().manual_seed(1)
    docs = [[7, 5], [4], [6, 3]]  # per row: document lengths; row 1 ends in 3 padding tokens
    T = 12
    ids = torch.randint(0, 97, (3, T), generator=g)
    seg = torch.full((3, T), -1)
    pos = torch.zeros(3, T, dtype=torch.long)
    for b, lengths in enumerate(docs):
        lo = 0
        for s, n in enumerate(lengths):
            seg[b, lo:lo + n], pos[b, lo:lo + n] = s, torch.arange(n)
            lo += n
    with torch.no_grad():
        packed, _ = m(ids, positions=pos, segment_ids=seg)
        for b, lengths in enumerate(docs):
            lo = 0
            for n in lengths:
                alone, _ = m(ids[b:b + 1, lo:lo + n])
                torch.testing.assert_close(packed[b:b + 1, lo:lo + n], alone, atol=1e-5, rtol=1e-5)
                lo += n
        assert torch.isfinite(packed).all()  # padding queries attend to themselves: no NaN
        whole, _ = m(ids)  # one whole document per row: segment ids change nothing
        torch.testing.assert_close(m(ids, segment_ids=torch.zeros(3, T, dtype=torch.long))[0], whole,
                                   atol=0, rtol=0)


def test_document_mask_is_none_exactly_for_rows_that_are_whole_documents():
    assert document_mask(torch.zeros(2, 5, dtype=torch.long), "sdpa") is None
    assert document_mask(torch.tensor([[0, 0, 0], [3, 3, 3]]), "sdpa") is None  # one document per row
    for seg in ([[0, 0, 1], [0, 0, 0]],  # two documents in a row
                [[0, 0, -1], [0, 0, 0]],  # padding
                [[-1, -1, -1], [0, 0, 0]]):  # a row of padding only
        mask = document_mask(torch.tensor(seg), "sdpa")
        assert isinstance(mask, torch.Tensor) and mask.shape == (2, 1, 3, 3) and mask.dtype == torch.bool
    assert isinstance(document_mask(torch.zeros(2, 5, dtype=torch.long), "flex"), BlockMask)  # flex: always


def packed_rows():
    """Token ids, targets, positions and segment ids of three packed rows: several documents, one whole-document
    row, padding at the ends."""
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1, -1, -1],
                        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                        [0, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1]])
    pos = torch.zeros_like(seg)
    for b in range(3):
        for i in range(1, 12):
            pos[b, i] = pos[b, i - 1] + 1 if seg[b, i] == seg[b, i - 1] and seg[b, i] >= 0 else 0
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(2))
    return ids, torch.where(seg >= 0, ids, -100), pos, seg


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_equals_the_dense_sdpa_mask():
    """model.attention=flex (a BlockMask) and sdpa (a dense boolean mask) give the same forward on packed rows
    with padding (FlexAttention has no backward on CPU; the GPU test below checks gradients)."""
    ids, tgt, pos, seg = packed_rows()
    out = {}
    with torch.no_grad():
        for kind in ("sdpa", "flex"):
            out[kind] = tiny(attention=kind)(ids, tgt, positions=pos, segment_ids=seg)
    torch.testing.assert_close(out["flex"][0], out["sdpa"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["flex"][1], out["sdpa"][1], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flex_attention_equals_the_dense_sdpa_mask_with_gradients_on_gpu():
    ids, tgt, pos, seg = (t.cuda() for t in packed_rows())
    out = {}
    for kind in ("sdpa", "flex"):
        m = tiny(attention=kind).cuda()
        logits, loss = m(ids, tgt, positions=pos, segment_ids=seg)
        loss.backward()
        out[kind] = logits.detach(), {n: p.grad for n, p in m.named_parameters()}
    torch.testing.assert_close(out["flex"][0], out["sdpa"][0], atol=1e-4, rtol=1e-4)
    for n, g in out["sdpa"][1].items():
        torch.testing.assert_close(out["flex"][1][n], g, atol=1e-4, rtol=1e-3, msg=n)


def test_attention_matches_explicit_reference():
    """SDPA with a boolean mask equals softmax(q k^T / sqrt(d) + mask) v written out by hand."""
    m = tiny(qk_norm=False)
    attn = m.blocks[0].attn
    x = torch.randn(2, 6, 32)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    mask = ((seg[:, :, None] == seg[:, None, :]) & torch.ones(6, 6, dtype=torch.bool).tril())[:, None]
    from hiermem.model.transformer import apply_rope, rope_tables

    pos = torch.arange(6).expand(2, 6)
    cos, sin = rope_tables(pos, 8, TINY.rope_base)
    with torch.no_grad():
        got = attn(x, cos, sin, mask)
        q = apply_rope(attn.q_proj(x).view(2, 6, 2, 8).transpose(1, 2), cos, sin)
        k = apply_rope(attn.k_proj(x).view(2, 6, 2, 8).transpose(1, 2), cos, sin)
        v = attn.v_proj(x).view(2, 6, 2, 8).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / 8**0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 16))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_loss_ignores_masked_targets_and_tied_weights_shared():
    m = tiny()
    assert m.lm_head.weight is m.tok_emb.weight
    ids = torch.randint(0, 97, (2, 8))
    tgt = ids.clone()
    tgt[:, :4] = -100
    logits, loss = m(ids, targets=tgt)
    ref = F.cross_entropy(logits[:, 4:].reshape(-1, 97), ids[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_next_token_loss_equals_the_plain_cross_entropy(dtype):
    """train.compile compiles the loss (the step takes it from the model's logits): in value and in the logits'
    gradient it is the plain float32 cross-entropy over the targets that are not -100, for bf16 logits too."""
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 7, 50, generator=g)).to(dtype)
    targets = torch.randint(0, 50, (3, 7), generator=g)
    targets[0, :4] = targets[2, 5:] = -100
    keep = targets != -100
    ref = -torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][keep].mean()
    compiled = torch.compile(next_token_loss)
    grads = []
    for fn in (next_token_loss, compiled):
        x = logits.clone().requires_grad_(True)
        loss = fn(x, targets)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.allclose(loss, ref, rtol=1e-6, atol=1e-6)
        grads.append(x.grad)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6  # bf16: the gradient is rounded to bf16 either way
    assert grads[0].dtype == grads[1].dtype == dtype
    assert torch.allclose(grads[0].float(), grads[1].float(), rtol=tol, atol=1e-6)
    assert not grads[1][~keep].any()  # ignored positions get no gradient


def test_memory_gradient_flows_only_through_memory_leaf():
    m = tiny()
    w = torch.zeros(2, 3, 3, 4, 32, requires_grad=True)
    ids = torch.randint(0, 97, (2, 8))
    _, loss = m(ids, targets=ids, memory=FetchedMemory.per_sequence(w))
    loss.backward()
    # with a zero down part, only the down rows receive gradient at step 0 (gate/up see zero upstream grad)
    assert w.grad[:, :, 2].abs().sum() == 0  # silu(0)*0 = 0 activations -> zero grad for down too
    w2 = torch.randn(2, 3, 3, 4, 32) * 0.1
    w2[:, :, 2] = 0
    w2.requires_grad_(True)
    m.zero_grad()
    _, loss = m(ids, targets=ids, memory=FetchedMemory.per_sequence(w2))
    loss.backward()
    assert w2.grad[:, :, 2].abs().sum() > 0
    assert w2.grad[:, :, :2].abs().sum() == 0
