import numpy as np
import pytest

from hiermem.errors import HiermemError
from hiermem.routing.routers import CentroidRouter, KnnRouter, Router, _vote, make_router, routing_agreement
from hiermem.routing.tree import Tree, fit_tree


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def blob_setup():
    """16 sub-blobs (4 groups of 4) on the 16-d sphere: 25 training points and 5 held-out queries each."""
    rng = np.random.default_rng(0)
    tops = unit(rng.standard_normal((4, 16)))
    train, test, blob_train, blob_test = [], [], [], []
    for g in range(4):
        for s, center in enumerate(unit(tops[g] + 0.35 * unit(rng.standard_normal((4, 16))))):
            pts = unit(center + 0.03 * rng.standard_normal((30, 16)))
            train.append(pts[:25]), test.append(pts[25:])
            blob_train += [4 * g + s] * 25
            blob_test += [4 * g + s] * 5
    X, Q = np.concatenate(train), np.concatenate(test)
    tree, paths = fit_tree(X, depth=2, branching=4, seed=0, steps=10, sample=64, progress=False, return_paths=True)
    # each blob's leaf = the leaf of its training points (the tree test checks it is unique)
    leaf_of_blob = {b: paths[np.array(blob_train) == b, 1][0] for b in range(16)}
    target = np.array([leaf_of_blob[b] for b in blob_test])
    return X, paths, Q, target, tree


def test_both_routers_recover_blobs(blob_setup):
    X, paths, Q, target, tree = blob_setup
    for router in (CentroidRouter(tree), KnnRouter(tree, X, paths, k=10)):
        assert isinstance(router, Router)
        routed = router.route(Q)
        assert routed.dtype == np.int64 and routed.shape == (len(Q), 2)
        assert np.array_equal(routed[:, 1], target) and np.array_equal(routed[:, 0], target // 4)


def test_document_routes_to_its_own_path(blob_setup):
    """A training document used as a prompt lands on its training path, under both routers."""
    X, paths, _, _, tree = blob_setup
    assert np.array_equal(CentroidRouter(tree).route(X), paths)
    assert np.array_equal(KnnRouter(tree, X, paths, k=10).route(X), paths)


def test_blocking_never_returns_blocked_node(blob_setup):
    X, paths, Q, _, tree = blob_setup
    probing = KnnRouter(tree, X, paths, k=10, ram_docs=0, probe=2)  # searches no leaf under the blocked node
    for router in (CentroidRouter(tree), KnnRouter(tree, X, paths, k=10), probing):
        base = router.route(Q)
        for level in (0, 1):
            blocked = router.route(Q, block_level=level)
            assert (blocked[:, level] != base[:, level]).all()
            assert np.array_equal(blocked[:, 0], blocked[:, 1] // 4)  # still a valid path
    # the centroid router takes the next-best node at the blocked level
    d0 = ((Q[:, None, :] - tree.centroids[0][None]) ** 2).sum(-1)
    assert np.array_equal(CentroidRouter(tree).route(Q, block_level=0)[:, 0], np.argsort(d0, axis=1)[:, 1])
    with pytest.raises(HiermemError, match="block_level"):
        CentroidRouter(tree).route(Q, block_level=2)


def _hand_tree(dim=6):
    return Tree(1, 4, [np.eye(4, dim, dtype=np.float32)])


def _doc(sim, axis, dim=6):
    """Unit vector with cosine `sim` to e0, the rest along `axis`."""
    v = np.zeros(dim, dtype=np.float32)
    v[0], v[axis] = sim, np.sqrt(1 - sim**2)
    return v


def test_knn_vote_weights_decide():
    tree, q = _hand_tree(), np.eye(1, 6, dtype=np.float32)
    paths = np.array([[2], [1], [1], [3]])
    # nearest doc is in leaf 2 (0.9), but leaf 1's two docs sum to 0.95
    docs = np.stack([_doc(0.9, 1), _doc(0.5, 2), _doc(0.45, 3), _doc(0.3, 4)])
    assert KnnRouter(tree, docs, paths, k=4).route(q)[0, 0] == 1
    assert KnnRouter(tree, docs, paths, k=1).route(q)[0, 0] == 2
    # lower the weights of leaf 1 (0.4 + 0.45 = 0.85 < 0.9): leaf 2 wins
    docs[1] = _doc(0.4, 2)
    assert KnnRouter(tree, docs, paths, k=4).route(q)[0, 0] == 2


def test_knn_blocking_votes_among_the_rest():
    tree, q = _hand_tree(), np.eye(1, 6, dtype=np.float32)
    paths = np.array([[2], [1], [1], [3]])
    docs = np.stack([_doc(0.9, 1), _doc(0.5, 2), _doc(0.45, 3), _doc(0.3, 4)])
    router = KnnRouter(tree, docs, paths, k=4)
    assert router.route(q, block_level=0)[0, 0] == 2  # leaf 1 blocked -> its docs dropped -> leaf 2
    # every document is in the blocked subtree: fall back to centroid descent with that node excluded
    only1 = KnnRouter(tree, docs[1:3], paths[1:3], k=2)
    q2 = unit(np.array([[0, 1, 0.5, 0, 0, 0]], dtype=np.float32))
    assert only1.route(q2)[0, 0] == 1
    assert only1.route(q2, block_level=0)[0, 0] == 2  # next-best centroid after the blocked leaf 1


def test_vote_ties_go_to_lowest_leaf():
    leaves = np.array([[3, 1, 5]])
    sims = np.array([[0.5, 0.5, 0.2]], dtype=np.float32)
    assert _vote(leaves, sims, np.ones_like(leaves, dtype=bool))[0] == 1
    assert _vote(leaves, sims, np.array([[True, False, True]]))[0] == 3
    assert _vote(leaves, sims, np.zeros_like(leaves, dtype=bool))[0] == -1


def test_knn_exact_duplicate_rule():
    tree = _hand_tree()
    v = _doc(0.6, 1)
    rng = np.random.default_rng(0)
    near = unit(v + 0.05 * rng.standard_normal((5, 6)))  # 5 close docs in leaf 1 outvote v's leaf 3
    docs = np.concatenate([v[None], near])
    paths = np.array([[3]] + [[1]] * 5)
    router = KnnRouter(tree, docs, paths, k=6)
    assert router.route(v[None])[0, 0] == 3
    assert router.route(unit(v + 0.01 * rng.standard_normal(6))[None])[0, 0] == 1


def test_make_router_and_errors(blob_setup):
    X, paths, _, _, tree = blob_setup
    assert make_router("centroid", tree).name == "centroid"
    assert make_router("knn", tree, X, paths, k=5).name == "knn:k=5"
    with pytest.raises(HiermemError, match=r"--router.*routing\.router.*centroid, knn"):
        make_router("oracle", tree)
    with pytest.raises(HiermemError, match="knn"):
        make_router("knn", tree)
    with pytest.raises(HiermemError, match="paths"):
        KnnRouter(tree, X, paths[:, ::-1], k=5)  # not root-to-leaf paths
    with pytest.raises(HiermemError, match="shape"):
        KnnRouter(tree, X[:, :8], paths)
    with pytest.raises(HiermemError, match="skip mask has 3 entries for 400 documents"):
        KnnRouter(tree, X, paths, skip=np.zeros(3, bool))
    with pytest.raises(HiermemError, match="every document is skipped"):
        KnnRouter(tree, X, paths, skip=np.ones(len(X), bool))


def test_routing_agreement(blob_setup):
    X, paths, Q, target, tree = blob_setup
    for router in (CentroidRouter(tree), KnnRouter(tree, X, paths)):
        good = routing_agreement(router, Q, target)
        assert good == {"leaf": 1.0, "levels": [1.0, 1.0], "n": len(Q)}
        # the neighbouring leaf id: same parent except for the last child of each node (4 of 16 leaves)
        shifted = routing_agreement(router, Q, (target + 1) % 16)
        assert shifted["leaf"] == 0.0 and shifted["levels"] == [0.75, 0.0]
    with pytest.raises(HiermemError, match="queries"):
        routing_agreement(CentroidRouter(tree), Q, target[:3])


def test_knn_scan_of_a_memory_map_is_the_in_ram_index(blob_setup, tmp_path, monkeypatch):
    """Above ram_docs (routing.knn_ram_docs) the index is a blocked scan of the (memory-mapped) embeddings: the same neighbours,
    similarities and routes (plain, blocked, duplicates) as the in-RAM faiss index, with skipped documents (the
    validation split) in neither, and blocks smaller than k."""
    X, paths, Q, _, tree = blob_setup
    emb = np.lib.format.open_memmap(tmp_path / "emb.npy", "w+", np.float32, X.shape)
    emb[:] = 3.0 * X  # the router normalises what it reads
    skip = np.random.default_rng(1).random(len(X)) < 0.2
    queries = np.concatenate([Q, X[:20]])  # held-out prompts and training documents (duplicates)
    ram = KnnRouter(tree, emb, paths, k=10, skip=skip)
    monkeypatch.setattr("hiermem.routing.doc_index.KNN_BLOCK_DOCS", 7)
    scan = KnnRouter(tree, emb, paths, k=10, skip=skip, ram_docs=0, probe=0)
    assert scan.index.mode == "scan" and ram.index.mode == "ram"
    assert scan.index.ntotal == ram.index.ntotal == int((~skip).sum())
    for kk in (1, 10, 74):
        (s1, i1), (s2, i2) = ram.index.search(unit(queries), kk), scan.index.search(unit(queries), kk)
        assert np.array_equal(i1, i2) and np.allclose(s1, s2, atol=1e-6)
        assert not skip[i1].any()
    for level in (None, 0, 1):
        assert np.array_equal(ram.route(queries, block_level=level), scan.route(queries, block_level=level))
    skipped = np.flatnonzero(skip)[:5]  # a skipped document is not its own neighbour
    assert not np.isin(scan.index.search(unit(X[skipped]), 1)[1], skipped).any()


@pytest.mark.parametrize("probe", [0, 2])
def test_knn_scan_holds_a_block_not_the_corpus(tmp_path, monkeypatch, probe):
    """Building the scanning (probe 0) or probing router and routing a batch: the same traced (numpy) memory
    for 4x more memory-mapped documents, and a peak RssAnon (faiss's C++ side included) far below the in-RAM
    index's, which holds every embedding. The probing index's document ids sorted by leaf are a memory-mapped
    file (file-backed pages)."""
    from traced import traced_peak

    from hiermem.bench.rss import RssSampler, proc_status

    monkeypatch.setattr("hiermem.routing.doc_index.KNN_BLOCK_DOCS", 4096)
    tree = Tree(1, 4, [unit(np.random.default_rng(0).standard_normal((4, 32)))])
    q = unit(np.random.default_rng(1).standard_normal((8, 32)))

    def files(n):
        emb = np.lib.format.open_memmap(tmp_path / f"e{n}.npy", "w+", np.float32, (n, 32))
        paths = np.lib.format.open_memmap(tmp_path / f"p{n}.npy", "w+", np.int64, (n, 1))
        rng = np.random.default_rng(n)
        for a in range(0, n, 50_000):
            emb[a : a + 50_000] = rng.standard_normal((min(n, a + 50_000) - a, 32))
            paths[a : a + 50_000, 0] = rng.integers(0, 4, min(n, a + 50_000) - a)
        return emb, paths

    data = {n: files(n) for n in (1000, 100_000, 400_000)}
    peaks = {n: traced_peak(lambda: KnnRouter(tree, *data[n], k=10, ram_docs=0, probe=probe).route(q))
             for n in data}  # the first: caches
    assert peaks[400_000] - peaks[100_000] < 100_000, peaks

    def rss_growth(ram_docs):
        before = proc_status()["RssAnon"]
        with RssSampler(interval=0.01) as rss:
            KnnRouter(tree, *data[400_000], k=10, ram_docs=ram_docs, probe=probe).route(q)
        return rss.peak - before

    if "RssAnon" in proc_status():
        scan, in_ram = rss_growth(0), rss_growth(1 << 30)
        assert scan < 16 << 20 and in_ram > 45 << 20, (scan, in_ram)  # 400k x 32 float32 = 51 MB


def test_knn_probing_that_finds_no_document_routes_by_centroid_descent():
    """Above knn_ram_docs a query whose probed leaves hold no training document (here: all in leaf 3) takes the
    centroid router's path; one that finds some votes among them."""
    tree = _hand_tree()
    docs = np.stack([_doc(s, 3) for s in (0.1, 0.2, 0.3)] * 4)  # near e3: leaf 3
    paths = np.full((len(docs), 1), 3)
    q = np.stack([_doc(0.99, 1), _doc(0.1, 3)])  # near e0 (leaf 0), near e3
    router = KnnRouter(tree, docs, paths, k=3, ram_docs=0, probe=1)
    assert router.index.mode == "probe" and router.index.search(unit(q[:1]), 3)[1].tolist() == [[-1, -1, -1]]
    assert router.route(q).tolist() == [[0], [3]]
    assert router.route(q[:1]).tolist() == CentroidRouter(tree).route(q[:1]).tolist()


def test_the_probing_router_reads_the_paths_twice_and_lists_what_the_index_counts_itself(blob_setup):
    """Above knn_ram_docs the router's path check also counts the documents per leaf, so its start reads the
    paths once for check + counts and once for the sort (not three times); the lists equal those of a DocIndex
    that counts on its own."""
    from hiermem.routing.doc_index import DocIndex

    X, paths, Q, _, tree = blob_setup
    skip = np.random.default_rng(2).random(len(X)) < 0.2

    class Counted:  # the rows that indexing reads, as a memory map would serve them
        def __init__(self, a):
            self.a, self.shape, self.rows = a, a.shape, 0

        def __getitem__(self, key):
            out = self.a[key]
            self.rows += len(np.atleast_1d(out)) if np.ndim(out) else 1
            return out

    counted = Counted(paths)
    router = KnnRouter(tree, X, counted, k=10, skip=skip, ram_docs=0, probe=2)
    assert router.index.mode == "probe" and counted.rows == 2 * len(X)
    alone = DocIndex(X, skip, ram_docs=0, probe=2, tree=tree, doc_paths=paths)
    assert np.array_equal(router.index._lists, alone._lists) and np.array_equal(router.index._starts, alone._starts)
    assert np.array_equal(router.index.search(unit(Q), 10)[1], alone.search(unit(Q), 10)[1])
