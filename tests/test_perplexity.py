import math

import numpy as np
import pytest
import torch

from hiermem.config import ModelConfig
from hiermem.eval.perplexity import perplexity
from hiermem.model import FetchedMemory
from hiermem.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.torch_threads

CFG = ModelConfig(vocab_size=61, n_layers=2, d_model=32, n_heads=2, head_dim=8, d_ff=48, max_seq_len=16,
                  init_std=0.1)
EOS = 0
SEQ_LEN = 8
LENGTHS = [5, 20, 0, 33, 8, 1, 16]  # shorter, longer and exact multiples of seq_len, and an empty document


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(CFG).eval()


@pytest.fixture(scope="module")
def docs():
    rng = np.random.default_rng(0)
    return [rng.integers(1, CFG.vocab_size, n).astype(np.uint16) for n in LENGTHS]


def doc_memories(n_docs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_docs, CFG.n_layers, 3, 3, CFG.d_model, generator=g) * 0.3


@torch.no_grad()
def reference_nll(model, docs, memories=None):
    """One window at a time, no padding: the document + eos, cut every SEQ_LEN targets."""
    total, count, owners = 0.0, 0, []
    for d, toks in enumerate(docs):
        stream = list(map(int, toks)) + [EOS]
        for lo in range(0, len(stream) - 1, SEQ_LEN):
            x = torch.tensor([stream[lo: lo + SEQ_LEN]])
            y = torch.tensor(stream[lo + 1: lo + SEQ_LEN + 1])
            mem = FetchedMemory.per_sequence(memories[d: d + 1]) if memories is not None else None
            logits, _ = model(x, memory=mem)
            logp = torch.log_softmax(logits[0].double(), -1)
            total -= float(logp[torch.arange(len(y)), y].sum())
            count += len(y)
            owners.append(d)
    return total, count, owners


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_perplexity_is_exp_of_the_mean_nll(model, docs, batch_size):
    total, count, _ = reference_nll(model, docs)
    out = perplexity(model, docs, EOS, SEQ_LEN, batch_size=batch_size)
    assert out["tokens"] == count == sum(LENGTHS)  # every token predicted once, its eos included
    assert out["docs"] == len(docs)
    assert out["loss"] == pytest.approx(total / count, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_windows_are_cut_at_seq_len(model, docs):
    widths = []
    handle = model.register_forward_pre_hook(lambda m, args: widths.append(args[0].shape))
    try:
        perplexity(model, docs, EOS, SEQ_LEN, batch_size=1)
    finally:
        handle.remove()
    expected = []
    for n in LENGTHS:  # n targets per document: n // SEQ_LEN full windows and a shorter remainder
        expected += [SEQ_LEN] * (n // SEQ_LEN) + ([n % SEQ_LEN] if n % SEQ_LEN else [])
    assert [w[1] for w in widths] == expected and all(w[0] == 1 for w in widths)


def test_memory_for_gets_the_document_owners(model, docs):
    mems = doc_memories(len(docs))
    calls = []

    def memory_for(owners):
        calls.append(np.asarray(owners).copy())
        return FetchedMemory.per_sequence(mems[torch.from_numpy(np.asarray(owners))])

    total, count, owners = reference_nll(model, docs, memories=mems)
    out = perplexity(model, docs, EOS, SEQ_LEN, memory_for=memory_for, batch_size=3)
    assert np.concatenate(calls).tolist() == owners
    assert [len(c) for c in calls] == [min(3, len(owners) - i) for i in range(0, len(owners), 3)]
    assert 2 not in owners  # the empty document has no window
    assert out["loss"] == pytest.approx(total / count, rel=1e-5)
    # the memory matters: without it the loss differs
    assert out["loss"] != pytest.approx(perplexity(model, docs, EOS, SEQ_LEN)["loss"], rel=1e-4)


def test_memory_none_from_memory_for_equals_no_memory(model, docs):
    a = perplexity(model, docs, EOS, SEQ_LEN, memory_for=lambda owners: None, batch_size=4)
    b = perplexity(model, docs, EOS, SEQ_LEN, batch_size=4)
    assert a == b
