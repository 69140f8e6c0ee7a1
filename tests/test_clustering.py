import json

import numpy as np
import pytest
from conftest import write_topic_corpus

from hiermem.config import load_config
from hiermem.data.prepare import prepare
from hiermem.errors import HiermemError
from hiermem.routing.clustering import cluster, ensure_clustered, format_report
from hiermem.routing.embedders import WordLlamaEmbedder
from hiermem.routing.tree import Tree
from hiermem.routing.clustering import load_clustering


def make_cfg(tmp_path, *extra):
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        write_topic_corpus(corpus)
    return load_config("tiny", [f"data.corpus={corpus}", f"data.dir={tmp_path / 'data'}", "data.vocab_size=320",
                                "routing.encoder=wordllama", "routing.depth=2", "routing.branching=4", *extra])


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


def test_cluster_writes_tree_paths_and_report(tmp_path):
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
    text = format_report(report)
    assert "centroid" in text and "knn" in text and text.count("\n") >= 4

    loaded = load_clustering(data, cfg, required=True)
    np.testing.assert_array_equal(loaded.doc_paths, doc_paths)
    assert loaded.tree.fingerprint() == tree.fingerprint()
    np.testing.assert_array_equal(loaded.doc_emb(), emb)


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
