import re

import numpy as np
import pytest

from hiermem.errors import HiermemError
from hiermem.routing.embedders import (
    Embedder,
    MiniLMEmbedder,
    WordLlamaEmbedder,
    embed_cached,
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

    def encode(self, texts, batch_size=64, progress=False):
        self.calls += 1
        rows = [np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(self.dim) for t in texts]
        x = np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dim)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_embed_cached_reuses_file(tmp_path):
    texts = ["a cat", "a dog", "quantum chromodynamics"]
    fake = FakeEmbedder()
    assert isinstance(fake, Embedder)
    first = embed_cached(fake, texts, tmp_path, progress=False)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and re.fullmatch(r"emb-[0-9a-f]{16}\.npy", files[0].name)
    second = embed_cached(fake, texts, tmp_path, progress=False)
    assert fake.calls == 1 and np.array_equal(first, second) and second.dtype == np.float32
    # another corpus or another encoder setting is another key
    embed_cached(fake, texts + ["x"], tmp_path, progress=False)
    embed_cached(FakeEmbedder("fake:v2"), texts, tmp_path, progress=False)
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".npy"]) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_embed_cached_recovers_from_corrupt_cache(tmp_path):
    fake = FakeEmbedder()
    embed_cached(fake, ["a", "b"], tmp_path, progress=False)
    (path,) = tmp_path.iterdir()
    path.write_bytes(b"garbage")
    out = embed_cached(fake, ["a", "b"], tmp_path, progress=False)
    assert fake.calls == 2 and out.shape == (2, 8)


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
