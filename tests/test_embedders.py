import json
import re

import numpy as np
import pytest
import torch

from hiermem.errors import HiermemError
from hiermem.routing.embedders import (
    Embedder,
    MiniLMEmbedder,
    WordLlamaEmbedder,
    embed_corpus,
    make_embedder,
)

LONG_DOC = (
    "The Amazon rainforest covers much of the Amazon basin of South America. "
    "Most of the forest is contained within Brazil, with smaller parts in Peru and Colombia. "
    "It represents over half of the planet's remaining rainforests and is the most biodiverse tract. "
    "Later sections of this article discuss deforestation, climate feedbacks and indigenous peoples. "
) * 6


class FakeEmbedder:
    """Counts encode calls; vectors are a deterministic function of the text."""

    dim = 8

    def __init__(self, name="fake:v1"):
        self.name = name
        self.calls = 0

    def encode(self, texts, batch_size=None, progress=False):
        self.calls += 1
        rows = [np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(self.dim) for t in texts]
        x = np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def batches_of(texts):
    """A stand-in for DataDir.iter_texts over an in-memory list."""
    return lambda chunk: (texts[i : i + chunk] for i in range(0, len(texts), chunk))


def test_embed_corpus_reuses_file(tmp_path):
    texts = ["a cat", "a dog", "quantum chromodynamics"]
    fake = FakeEmbedder()
    assert isinstance(fake, Embedder)
    path = embed_corpus(fake, batches_of(texts), 3, "corpus-a", tmp_path, chunk=2, progress=False)
    assert re.fullmatch(r"emb-[0-9a-f]{16}\.npy", path.name) and path.parent == tmp_path
    first = np.load(path)
    assert first.dtype == np.float32 and np.array_equal(first, FakeEmbedder().encode(texts))
    assert fake.calls == 2  # one call per chunk
    assert embed_corpus(fake, batches_of(texts), 3, "corpus-a", tmp_path, chunk=2, progress=False) == path
    assert fake.calls == 2
    # another corpus, encoder setting or chunk size is another key (texts are never hashed: the source names them)
    embed_corpus(fake, batches_of(texts), 3, "corpus-b", tmp_path, chunk=2, progress=False)
    embed_corpus(FakeEmbedder("fake:v2"), batches_of(texts), 3, "corpus-a", tmp_path, chunk=2, progress=False)
    embed_corpus(fake, batches_of(texts), 3, "corpus-a", tmp_path, chunk=3, progress=False)
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".npy"]) == 4
    assert not [p for p in tmp_path.iterdir() if p.suffix != ".lock" and p.suffix != ".npy"]  # no partial, no record
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or "partial" in p.name]


def test_embed_corpus_recovers_from_corrupt_cache_and_checks_the_count(tmp_path):
    fake = FakeEmbedder()
    path = embed_corpus(fake, batches_of(["a", "b"]), 2, "c", tmp_path, chunk=8, progress=False)
    path.write_bytes(b"garbage")
    embed_corpus(fake, batches_of(["a", "b"]), 2, "c", tmp_path, chunk=8, progress=False)
    assert fake.calls == 2 and np.load(path).shape == (2, 8)
    with pytest.raises(HiermemError, match=rf"^{re.escape(str(tmp_path))}: the corpus has 2 texts for its 3 documents$"):
        embed_corpus(fake, batches_of(["a", "b"]), 3, "d", tmp_path, chunk=8, progress=False)
    with pytest.raises(HiermemError, match="the corpus has more texts than its 1 documents"):
        embed_corpus(fake, batches_of(["a", "b"]), 1, "e", tmp_path, chunk=1, progress=False)


class Interrupted(Exception):
    pass


def test_an_interrupted_embedding_resumes_after_its_last_finished_chunk(tmp_path, monkeypatch):
    texts = [f"document number {i}" for i in range(7)]
    encoded, fail_at = [], [2]  # the third chunk's encode call is interrupted
    original = FakeEmbedder.encode

    def encode(self, batch, *a, **k):
        if len(encoded) == fail_at[0]:
            raise Interrupted
        encoded.append(list(batch))
        return original(self, batch, *a, **k)

    monkeypatch.setattr(FakeEmbedder, "encode", encode)
    with pytest.raises(Interrupted):
        embed_corpus(FakeEmbedder(), batches_of(texts), 7, "c", tmp_path / "a", chunk=2, progress=False)
    (partial,) = (tmp_path / "a").glob("*.partial.npy")
    (record,) = (tmp_path / "a").glob("*.progress.json")
    assert json.loads(record.read_text())["done"] == 4 and not list((tmp_path / "a").glob("emb-*[0-9a-f].npy"))

    encoded.clear()
    fail_at[0] = None
    path = embed_corpus(FakeEmbedder(), batches_of(texts), 7, "c", tmp_path / "a", chunk=2, progress=False)
    assert encoded == [texts[4:6], texts[6:]]  # the two finished chunks were not encoded again
    assert not partial.exists() and not record.exists()
    encoded.clear()
    whole = embed_corpus(FakeEmbedder(), batches_of(texts), 7, "c", tmp_path / "b", chunk=2, progress=False)
    assert len(encoded) == 4 and np.load(path).tobytes() == np.load(whole).tobytes()

    # a record left by another key (or a damaged one) is not trusted: everything is encoded afresh
    fail_at[0] = len(encoded) + 1
    with pytest.raises(Interrupted):
        embed_corpus(FakeEmbedder(), batches_of(texts), 7, "d", tmp_path / "a", chunk=2, progress=False)
    (record,) = (tmp_path / "a").glob("*.progress.json")
    record.write_text(json.dumps({"key": "another", "done": 4}))
    encoded.clear()
    fail_at[0] = None
    embed_corpus(FakeEmbedder(), batches_of(texts), 7, "d", tmp_path / "a", chunk=2, progress=False)
    assert len(encoded) == 4


def test_make_embedder_errors():
    with pytest.raises(HiermemError, match=r"routing\.encoder.*minilm, wordllama"):
        make_embedder("bert", 16, "truncate")
    with pytest.raises(HiermemError, match=r"routing\.long_docs.*truncate, mean_chunks"):
        make_embedder("minilm", 16, "average")
    with pytest.raises(HiermemError, match=r"routing\.max_tokens"):
        make_embedder("minilm", 1000, "truncate")
    e = make_embedder("minilm", 16, "truncate")
    assert e.name == "minilm-l6-v2:max_tokens=16:long=truncate" and e.dim == 384
    assert make_embedder("wordllama", 16, "truncate").dim == 256
    # the device and a batch other than the CPU's 64 change the last bits, so they are in the name (the cache key)
    assert MiniLMEmbedder(16, device="cuda", batch_size=512).name == \
        "minilm-l6-v2:max_tokens=16:long=truncate:batch=512:cuda-fp16"
    with pytest.raises(HiermemError, match="^minilm: device 'mps' is not cpu or cuda$"):
        MiniLMEmbedder(16, device="mps")
    auto = make_embedder("minilm", 16, "truncate", device="auto", cuda_batch=512)
    if torch.cuda.is_available():
        assert (auto.device, auto.batch_size) == ("cuda", 512)
    else:  # the CPU keeps fp32 and 64 a batch whatever cuda_batch says
        assert (auto.device, auto.batch_size, auto.name) == ("cpu", 64, e.name)
        with pytest.raises(HiermemError, match="no CUDA device is available"):
            make_embedder("minilm", 16, "truncate", device="cuda")


@pytest.fixture(scope="module")
def minilm_vectors():
    """Every MiniLM encode of the module in one place, so the model loads and runs once."""
    paraphrases = ["A man is playing a guitar on stage.", "Someone performs music with a guitar at a concert.",
                   "The stock market fell sharply on Tuesday."]
    short = "Paris is the capital of France."
    out = {}
    for max_tokens in (16, 256):
        for mode in ("truncate", "mean_chunks"):
            e = MiniLMEmbedder(max_tokens=max_tokens, long_docs=mode)
            out[max_tokens, mode] = e.encode(paraphrases + [short, LONG_DOC], batch_size=4)
    return out


def test_minilm_paraphrase_and_norm(minilm_vectors):
    v = minilm_vectors[256, "truncate"]
    assert v.shape == (5, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def test_minilm_truncation_and_chunks(minilm_vectors):
    t16, t256 = minilm_vectors[16, "truncate"], minilm_vectors[256, "truncate"]
    m16, m256 = minilm_vectors[16, "mean_chunks"], minilm_vectors[256, "mean_chunks"]
    short, long_ = 3, 4
    # a short text fits every window: all settings agree on it
    for v in (t256, m16, m256):
        assert t16[short] @ v[short] > 0.9999
    # the long doc's head (14 wordpieces) differs from its first 254 wordpieces and from the chunk mean
    assert t16[long_] @ t256[long_] < 0.95
    assert t16[long_] @ m16[long_] < 0.99
    np.testing.assert_allclose(np.linalg.norm(m16, axis=1), 1.0, atol=1e-5)
    # the 16-wordpiece chunk mean covers the whole doc, so it is closer to the 256 view than the head is
    assert m16[long_] @ m256[long_] > t16[long_] @ m256[long_]


def test_minilm_matches_sentence_transformers(minilm_vectors):
    """Our window/batching path equals SentenceTransformer.encode at the same max_seq_length."""
    from hiermem.routing.embedders import _load_minilm

    model = _load_minilm("cpu")
    old = model.max_seq_length
    try:
        model.max_seq_length = 16
        ref = model.encode(["Paris is the capital of France.", LONG_DOC], normalize_embeddings=True)
    finally:
        model.max_seq_length = old
    np.testing.assert_allclose(minilm_vectors[16, "truncate"][3:], ref, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_minilm_on_cuda_runs_fp16_and_agrees_with_cpu_fp32(minilm_vectors):
    from hiermem.routing.embedders import _load_minilm

    gpu = make_embedder("minilm", 256, "truncate", device="auto", cuda_batch=512)
    assert gpu.device == "cuda" and gpu.name.endswith(":batch=512:cuda-fp16")
    texts = ["A man is playing a guitar on stage.", "Someone performs music with a guitar at a concert.",
             "The stock market fell sharply on Tuesday.", "Paris is the capital of France.", LONG_DOC]
    v = gpu.encode(texts)
    assert next(_load_minilm("cuda").parameters()).dtype == torch.float16
    assert v.dtype == np.float32 and v.shape == (5, 384)
    cos = (v * minilm_vectors[256, "truncate"]).sum(axis=1)  # both sides have unit norm
    assert cos.min() > 0.99, cos


def test_wordllama():
    e = WordLlamaEmbedder()
    v = e.encode(["the cat sat on the mat", "a cat was sitting on the rug", "interest rates rose again"])
    assert v.shape == (3, 256) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2]
    assert WordLlamaEmbedder(64).encode(["x"]).shape == (1, 64)
    assert e.encode([]).shape == (0, 256)
    with pytest.raises(HiermemError, match="routing.dim"):
        WordLlamaEmbedder(300)


@pytest.mark.parametrize("dim", [256, 64])
def test_wordllama_pooling_is_bit_identical_to_wordllama_embed(dim):
    """The unpadded embedding_bag mean gives WordLlama.embed's own vectors, bit for bit, for long and short
    texts, an empty one, and any batch size (so an embedding cache made before it stays valid)."""
    from hiermem.routing.embedders import l2_normalize

    texts = [LONG_DOC * 3, "", "   ", "x", "the cat sat on the mat", LONG_DOC[:300]] * 11
    e = WordLlamaEmbedder(dim)
    ref = l2_normalize(np.asarray(e._load().embed(texts, batch_size=64))[:, :dim])
    for batch in (None, 7, 1):
        got = e.encode(texts, batch_size=batch)
        assert got.dtype == np.float32 and np.array_equal(got, ref), batch
    assert not got[1].any()  # no tokens: a zero row, not NaN
