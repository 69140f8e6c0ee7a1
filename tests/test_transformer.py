import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hiermem.config import ModelConfig
from hiermem.model import FetchedMemory
from hiermem.model.transformer import Transformer, count_parameters

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
        with_mem, _ = m(ids, memory=FetchedMemory(w))
    assert torch.equal(plain, with_mem)


def test_batched_memory_equals_concatenated_ffn_per_sequence():
    """Memory = extra SwiGLU neurons: per sequence, concatenate them into W1/W2/W3 and run a plain model."""
    m = tiny()
    ids = torch.randint(0, 97, (3, 12))
    w = torch.randn(3, 2, 3, 4, 32) * 0.3
    mem = FetchedMemory(w, first_layer=1)  # layers 1 and 2 only
    with torch.no_grad():
        batched, _ = m(ids, memory=mem)
        for b in range(3):
            ref = tiny(d_ff=TINY.d_ff + 4)
            state = {k: v.clone() for k, v in m.state_dict().items()}
            for j, layer in enumerate((1, 2)):
                p = f"blocks.{layer}.ffn."
                state[p + "w1.weight"] = torch.cat([state[p + "w1.weight"], w[b, j, 0]], 0)
                state[p + "w2.weight"] = torch.cat([state[p + "w2.weight"], w[b, j, 1]], 0)
                state[p + "w3.weight"] = torch.cat([state[p + "w3.weight"], w[b, j, 2].T], 1)
            for layer in (0,):  # layer 0 has no memory: pad with neurons whose down column is zero
                p = f"blocks.{layer}.ffn."
                state[p + "w1.weight"] = torch.cat([state[p + "w1.weight"], torch.zeros(4, 32)], 0)
                state[p + "w2.weight"] = torch.cat([state[p + "w2.weight"], torch.zeros(4, 32)], 0)
                state[p + "w3.weight"] = torch.cat([state[p + "w3.weight"], torch.zeros(32, 4)], 1)
            ref.load_state_dict(state)
            expected, _ = ref(ids[b : b + 1])
            torch.testing.assert_close(batched[b : b + 1], expected, atol=1e-5, rtol=1e-5)


def test_document_mask_equals_separate_documents():
    """Two documents packed in one row with the doc mask and restarting positions == each run alone."""
    m = tiny()
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5))
    ids = torch.cat([a, b], 1)
    seg = torch.tensor([[0] * 7 + [1] * 5])
    pos = torch.tensor([list(range(7)) + list(range(5))])
    T = ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    with torch.no_grad():
        packed, _ = m(ids, positions=pos, mask=mask[:, None])
        ra, _ = m(a)
        rb, _ = m(b)
    torch.testing.assert_close(packed[:, :7], ra, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 7:], rb, atol=1e-5, rtol=1e-5)


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
        q = apply_rope(attn.wq(x).view(2, 6, 2, 8).transpose(1, 2), cos, sin)
        k = apply_rope(attn.wk(x).view(2, 6, 2, 8).transpose(1, 2), cos, sin)
        v = attn.wv(x).view(2, 6, 2, 8).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / 8**0.5
        scores = scores.masked_fill(~mask, float("-inf"))
        ref = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 16))
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


def test_memory_gradient_flows_only_through_memory_leaf():
    m = tiny()
    w = torch.zeros(2, 3, 3, 4, 32, requires_grad=True)
    ids = torch.randint(0, 97, (2, 8))
    _, loss = m(ids, targets=ids, memory=FetchedMemory(w))
    loss.backward()
    # with a zero down part, only the down rows receive gradient at step 0 (gate/up see zero upstream grad)
    assert w.grad[:, :, 2].abs().sum() == 0  # silu(0)*0 = 0 activations -> zero grad for down too
    w2 = torch.randn(2, 3, 3, 4, 32) * 0.1
    w2[:, :, 2] = 0
    w2.requires_grad_(True)
    m.zero_grad()
    _, loss = m(ids, targets=ids, memory=FetchedMemory(w2))
    loss.backward()
    assert w2.grad[:, :, 2].abs().sum() > 0
    assert w2.grad[:, :, :2].abs().sum() == 0
