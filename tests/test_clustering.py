import json
import random

import numpy as np
import pytest
from conftest import TOPICS, write_topic_corpus
from traced import traced_peak

from hiermem.config import load_config
from hiermem.data.prepare import prepare
from hiermem.errors import HiermemError
from hiermem.routing import clustering as clustering_mod
from hiermem.routing.clustering import cluster, doc_heads, ensure_clustered, fit_sample, format_report
from hiermem.routing.embedders import WordLlamaEmbedder
from hiermem.routing.routers import make_router, routing_agreement
from hiermem.routing.tree import Tree, cluster_sizes, fit_tree
from hiermem.routing.clustering import load_clustering


def make_cfg(tmp_path, *extra):
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        write_topic_corpus(corpus)
    return load_config("tiny", [f"data.corpus={corpus}", f"data.dir={tmp_path / 'data'}", "data.vocab_size=320",
                                "routing.encoder=wordllama", "routing.depth=2", "routing.branching=4",
                                "train.device=cpu", *extra])


@pytest.fixture
def counting_encode(monkeypatch):
    """Count WordLlama encode calls by the number of texts they embed."""
    calls = []
    original = WordLlamaEmbedder.encode

    def encode(self, texts, *a, **k):
        calls.append(len(texts))
        return original(self, texts, *a, **k)

    monkeypatch.setattr(WordLlamaEmbedder, "encode", encode)
    return calls


def test_cluster_writes_tree_paths_and_report(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path)
    data = prepare(cfg)
    report = cluster(cfg, data, progress=False)
    folder = data.path / "cluster"
    assert sorted(p.name for p in folder.iterdir()) == ["cluster.json", "doc_paths.npy", "tree.npz"]
    assert json.loads((folder / "cluster.json").read_text()) == report

    tree = Tree.load(folder / "tree.npz")
    assert (tree.depth, tree.branching) == (2, 4) and tree.fingerprint() == report["tree_fingerprint"]
    texts = data.texts()
    emb = np.load(data.path / report["embeddings"])
    np.testing.assert_allclose(emb, WordLlamaEmbedder().encode(texts), atol=1e-6)  # really the documents' vectors
    doc_paths = np.load(folder / "doc_paths.npy")
    assert doc_paths.shape == (len(texts), 2) and doc_paths.dtype == np.int64
    np.testing.assert_array_equal(doc_paths, tree.route(emb))
    assert (doc_paths[:, 0] == doc_paths[:, 1] // 4).all()  # parent of the leaf, as the tree numbers nodes

    # sizes per level, over training documents only
    train = doc_paths[~data.is_val()]
    assert [s["level"] for s in report["sizes"]] == [1, 2]
    for s, level in zip(report["sizes"], (0, 1)):
        counts = np.bincount(train[:, level], minlength=4 ** (level + 1))
        assert s["nodes"] == 4 ** (level + 1)
        assert (s["non_empty"], s["min"], s["max"]) == ((counts > 0).sum(), counts.min(), counts.max())
        assert s["median"] == pytest.approx(float(np.median(counts)))
    # four disjoint vocabularies: the first level separates them, so no level-1 node is empty
    assert report["sizes"][0]["non_empty"] == 4

    # agreement for both routers, per level, leaf = last level
    n_train = int((~data.is_val()).sum())
    for name in ("centroid", "knn"):
        a = report["agreement"][name]
        assert a["n"] == min(500, n_train) and len(a["levels"]) == 2
        assert a["leaf"] == a["levels"][-1]
        assert all(0.0 <= x <= 1.0 for x in a["levels"])
        assert a["levels"][0] >= a["levels"][1]  # a right leaf implies a right parent
    assert report["fit_docs"] == n_train and report["encoder"] == WordLlamaEmbedder().name
    text = format_report(report)
    assert "centroid" in text and "knn" in text and text.count("\n") >= 5
    assert f"tree fitted on {n_train} training documents" in text
    assert f"the knn router votes among {n_train} training documents (at most 50000)" in text

    loaded = load_clustering(data, cfg, required=True)
    np.testing.assert_array_equal(loaded.doc_paths, doc_paths)
    assert loaded.tree.fingerprint() == tree.fingerprint()
    np.testing.assert_array_equal(loaded.doc_emb(), emb)

    # a damaged doc_paths.npy is refused when opened; above FULL_CHECK_BYTES only its size is checked there
    raw = bytearray((folder / "doc_paths.npy").read_bytes())
    raw[-1] ^= 1
    (folder / "doc_paths.npy").write_bytes(bytes(raw))
    with pytest.raises(HiermemError, match="doc_paths.npy.*run `hiermem cluster` again"):
        load_clustering(data, cfg, required=True)
    monkeypatch.setattr(clustering_mod, "FULL_CHECK_BYTES", len(raw) - 1)
    assert load_clustering(data, cfg, required=True).doc_paths[-1, -1] == doc_paths[-1, -1] ^ (1 << 56)


def test_embeddings_are_cached_and_clustering_is_deterministic(tmp_path, counting_encode):
    cfg = make_cfg(tmp_path)
    data = prepare(cfg)
    first = cluster(cfg, data, progress=False)
    n_docs = data.n_docs
    assert counting_encode.count(n_docs) == 1  # the corpus, once
    emb_file = data.path / first["embeddings"]
    stamp = emb_file.stat().st_mtime_ns
    paths_first = np.load(data.path / "cluster" / "doc_paths.npy")

    counting_encode.clear()
    second = cluster(cfg, data, progress=False)
    assert n_docs not in counting_encode  # only the short routing-agreement queries were embedded
    assert emb_file.stat().st_mtime_ns == stamp
    assert second == first  # same tree, same report
    np.testing.assert_array_equal(np.load(data.path / "cluster" / "doc_paths.npy"), paths_first)

    # ensure_clustered reuses a matching clustering without touching the encoder at all
    counting_encode.clear()
    ensure_clustered(cfg, data, progress=False)
    assert counting_encode == []


@pytest.mark.parametrize("override,field", [
    ("routing.kmeans_steps=5", "routing.kmeans_steps"),
    ("routing.seed=1", "routing.seed"),
    ("routing.branching=3", "routing.branching"),
])
def test_another_routing_config_is_refused_naming_the_field(tmp_path, override, field):
    cfg = make_cfg(tmp_path)
    data = prepare(cfg)
    cluster(cfg, data, progress=False)
    other = make_cfg(tmp_path, override)
    with pytest.raises(HiermemError, match=rf"clustered with another routing config: {field} \("):
        load_clustering(data, other, required=True)
    assert load_clustering(data, other, required=False) is None
    # the other config re-clusters (replacing the folder's clustering), after which it matches
    ensure_clustered(other, data, progress=False)
    assert load_clustering(data, other, required=True) is not None
    with pytest.raises(HiermemError, match=field):
        load_clustering(data, cfg, required=True)


def test_no_clustering_yet(tmp_path):
    cfg = make_cfg(tmp_path)
    data = prepare(cfg)
    with pytest.raises(HiermemError, match="no tree yet"):
        load_clustering(data, cfg, required=True)
    assert load_clustering(data, cfg, required=False) is None


def test_streamed_clustering_is_bit_identical_to_fitting_and_routing_the_whole_corpus_at_once(tmp_path):
    """With at most fit_docs training documents, chunked embedding, fitting and routing give exactly what
    the former all-in-RAM clustering gave: a fit on every training embedding, one route of all of them."""
    cfg = make_cfg(tmp_path, "routing.chunk_docs=50")  # 320 documents: 7 chunks
    data = prepare(cfg)
    report = cluster(cfg, data, progress=False)
    r, is_val = cfg.routing, data.is_val()
    emb = np.load(data.path / report["embeddings"])
    np.testing.assert_allclose(emb, WordLlamaEmbedder().encode(data.texts()), atol=1e-6)
    tree = fit_tree(emb[~is_val], depth=r.depth, branching=r.branching, seed=r.seed, steps=r.kmeans_steps,
                    sample=r.kmeans_sample, balance=r.balance, progress=False)
    paths = tree.route(emb)
    assert report["tree_fingerprint"] == tree.fingerprint()
    assert np.load(data.path / "cluster" / "doc_paths.npy").tobytes() == paths.tobytes()
    sizes = cluster_sizes(paths[~is_val], tree)
    assert [(s["min"], s["max"], s["non_empty"]) for s in report["sizes"]] == \
        [(c.min(), c.max(), (c > 0).sum()) for c in sizes]
    # the agreement report too: the same heads, and the knn router over every training document
    train_idx = np.flatnonzero(~is_val)
    heads = np.random.default_rng(r.seed).permutation(train_idx)[:500]
    head_emb = WordLlamaEmbedder().encode(doc_heads([data.texts()[i] for i in heads], 8))
    for name in ("centroid", "knn"):
        router = make_router(name, tree, doc_emb=emb[train_idx], doc_paths=paths[train_idx], k=r.knn_k)
        assert report["agreement"][name] == routing_agreement(router, head_emb, paths[heads, -1])


def test_fit_sample_is_a_seeded_uniform_sample_of_training_documents():
    is_val = np.zeros(1000, dtype=bool)
    is_val[::7] = True
    train = np.flatnonzero(~is_val)
    np.testing.assert_array_equal(fit_sample(is_val, 10**6, 0, 64), train)  # few enough: all of them
    np.testing.assert_array_equal(fit_sample(is_val, len(train), 0, 64), train)
    a = fit_sample(is_val, 100, 0, 64)
    assert len(a) == 100 and np.all(np.diff(a) > 0) and not is_val[a].any()
    for chunk in (1, 99, 5000):  # the keys come from one stream in document order: the chunk changes nothing
        np.testing.assert_array_equal(fit_sample(is_val, 100, 0, chunk), a)
    assert not np.array_equal(fit_sample(is_val, 100, 1, 64), a)
    # uniform: over 200 seeds every training document is drawn about 200 * 100/857 = 23 times
    counts = np.bincount(np.concatenate([fit_sample(is_val, 100, s, 256) for s in range(200)]), minlength=1000)
    assert counts[is_val].sum() == 0 and 5 < counts[train].min() and counts[train].max() < 45


def test_the_tree_is_fitted_on_fit_docs_documents_and_every_document_is_routed(tmp_path, monkeypatch):
    fitted = []
    original = clustering_mod.fit_tree

    def spy(X, **kw):
        fitted.append(np.array(X))
        return original(X, **kw)

    monkeypatch.setattr(clustering_mod, "fit_tree", spy)
    cfg = make_cfg(tmp_path, "routing.fit_docs=100", "routing.chunk_docs=64")
    data = prepare(cfg)
    report = cluster(cfg, data, progress=False)
    is_val, r = data.is_val(), cfg.routing
    emb = np.load(data.path / report["embeddings"])
    sample = fit_sample(is_val, 100, r.seed, 64)
    assert report["fit_docs"] == 100 and len(sample) == 100
    np.testing.assert_array_equal(fitted[0], emb[sample])
    tree = Tree.load(data.path / "cluster" / "tree.npz")
    paths = np.load(data.path / "cluster" / "doc_paths.npy")
    np.testing.assert_array_equal(paths, tree.route(emb))  # every document, training and validation
    for s, counts in zip(report["sizes"], cluster_sizes(paths[~is_val], tree)):
        assert (s["min"], s["max"], s["non_empty"]) == (counts.min(), counts.max(), (counts > 0).sum())
    assert report["sizes"][0]["max"] > 0 and sum(cluster_sizes(paths[~is_val], tree)[0]) == (~is_val).sum()
    assert report["agreement"]["knn"]["n"] == 100  # heads and the knn index come from the fit sample
    assert "the knn router votes among 100 training documents" in format_report(report)
    with pytest.raises(HiermemError, match=r"routing\.fit_docs \(100 vs 1000000\)"):
        load_clustering(data, make_cfg(tmp_path), required=True)


def test_an_interrupted_clustering_resumes_its_embeddings(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, "routing.chunk_docs=100")  # 320 documents: chunks of 100, 100, 100, 20
    data = prepare(cfg)
    calls, interrupt = [], [True]
    original = WordLlamaEmbedder.encode

    def encode(self, texts, *a, **k):
        if interrupt[0] and len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(len(texts))
        return original(self, texts, *a, **k)

    monkeypatch.setattr(WordLlamaEmbedder, "encode", encode)
    with pytest.raises(KeyboardInterrupt):
        cluster(cfg, data, progress=False)
    assert calls == [100, 100] and load_clustering(data, cfg, required=False) is None
    calls.clear()
    interrupt[0] = False
    report = cluster(cfg, data, progress=False)
    assert calls[:2] == [100, 20]  # the two finished chunks were not encoded again
    whole = np.concatenate([original(WordLlamaEmbedder(), texts) for texts in data.iter_texts(100)])
    assert np.load(data.path / report["embeddings"]).tobytes() == whole.tobytes()


def write_fixed_length_corpus(path, n):
    """Documents of exactly 12 topic words: every chunk encodes the same shapes, so peaks compare exactly."""
    rng, names = random.Random(0), sorted(TOPICS)
    rows = [{"id": f"f{i}", "text": " ".join(rng.choice(TOPICS[names[i % 4]]) for _ in range(12))} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path, monkeypatch):
    """tracemalloc counts every numpy and Python allocation (memory-mapped files are not allocations):
    clustering a corpus 4x as large leaves the peak within a small constant (the only per-document state
    is the 1-byte split mask). Both corpora are larger than the 1024 texts DataDir reads at a time."""
    embedder = WordLlamaEmbedder()
    embedder.encode(["load the weights before measuring"])
    held = []
    monkeypatch.setattr(clustering_mod, "embedder_for", lambda cfg: embedder)
    original = WordLlamaEmbedder.encode
    monkeypatch.setattr(WordLlamaEmbedder, "encode", lambda self, t, *a, **k: (held.append(len(t)),
                                                                               original(self, t, *a, **k))[1])
    runs = {}
    for n in (1100, 4400):
        write_fixed_length_corpus(tmp_path / f"c{n}.jsonl", n)
        cfg = load_config("tiny", [f"data.corpus={tmp_path / f'c{n}.jsonl'}", f"data.dir={tmp_path / f'd{n}'}",
                                   "data.vocab_size=300", "routing.encoder=wordllama", "routing.depth=2",
                                   "routing.branching=4", "routing.chunk_docs=100", "routing.fit_docs=200"])
        runs[n] = cfg, prepare(cfg)
    cluster(*runs[1100], progress=False)  # first-call allocations (imports, caches) out of the way
    peaks = {}
    for n, (cfg, data) in runs.items():
        for f in (data.path / "embeddings").glob("*"):
            f.unlink()
        held.clear()
        peaks[n] = traced_peak(cluster, cfg, data, progress=False)
        assert held == [100] * (n // 100) + [200]  # 100 texts a chunk, then the 200 heads of the fit sample
    # 3,300 more documents: measured +0.2 kB alone, up to +30 kB after the other tests of the module, of a
    # 3.5 MB peak. Holding every text (about 150 bytes each) or every vector (1 kB each) would exceed this
    # bound; the former all-in-RAM clustering's peak grew by 15 MB here (4.6 kB per document).
    assert peaks[4400] - peaks[1100] < 200_000, peaks
