import json
import tracemalloc

import numpy as np
import pytest

from hiermem.errors import HiermemError
from hiermem.routing import tree as tree_mod
from hiermem.routing.tree import Tree, balance_assignments, cluster_sizes, cluster_sums, fit_tree, paths_from_leaves


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def blobs(seed=0, per=25, dim=16, b=4, spread=0.35, noise=0.03):
    """Two-level gaussian blobs on the sphere: b groups of b sub-blobs, `per` points each.
    Returns X [b*b*per, dim] and the true (group, sub-blob) label of every point."""
    rng = np.random.default_rng(seed)
    tops = unit(rng.standard_normal((b, dim)))
    X, labels = [], []
    for g in range(b):
        subs = unit(tops[g] + spread * unit(rng.standard_normal((b, dim))))
        for s in range(b):
            X.append(unit(subs[s] + noise * rng.standard_normal((per, dim))))
            labels += [(g, g * b + s)] * per
    return np.concatenate(X), np.array(labels)


@pytest.fixture(scope="module")
def fitted():
    X, labels = blobs()
    tree, paths = fit_tree(X, depth=2, branching=4, seed=0, steps=10, sample=64, progress=False, return_paths=True)
    return X, labels, tree, paths


def _bijective(a, b):
    """Labels a and b induce the same partition."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_recovers_blob_structure(fitted):
    X, labels, tree, paths = fitted
    assert [c.shape for c in tree.centroids] == [(4, 16), (16, 16)]
    routed = tree.route(X)
    assert routed.dtype == np.int64 and routed.shape == (400, 2)
    assert _bijective(routed[:, 0], labels[:, 0]) and _bijective(routed[:, 1], labels[:, 1])
    # global ids: a leaf's parent is leaf // branching
    assert np.array_equal(routed[:, 0], routed[:, 1] // 4)
    assert np.array_equal(paths_from_leaves(routed[:, 1], 2, 4), routed)


def test_training_paths_equal_route(fitted):
    X, _, tree, paths = fitted
    assert np.array_equal(paths, tree.route(X))
    # routing normalises queries: scaled embeddings route the same way
    assert np.array_equal(tree.route(3.0 * X), tree.route(X))


def test_training_paths_equal_route_noisy():
    # overlapping data with many near-boundary points, deeper tree, subsampled steps
    X = np.random.default_rng(1).standard_normal((3000, 8)).astype(np.float32)
    tree, paths = fit_tree(X, depth=3, branching=3, seed=2, steps=5, sample=200, progress=False, return_paths=True)
    assert np.array_equal(paths, tree.route(X))


def test_deterministic_seed(fitted):
    X, _, tree, _ = fitted
    again = fit_tree(X, depth=2, branching=4, seed=0, steps=10, sample=64, progress=False)
    other = fit_tree(X, depth=2, branching=4, seed=1, steps=10, sample=64, progress=False)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(tree.centroids, again.centroids))
    assert tree.fingerprint() == again.fingerprint() != other.fingerprint()


def test_balance_assignments_caps_share():
    rng = np.random.default_rng(0)
    assign = np.concatenate([np.zeros(900, dtype=np.int64), rng.integers(1, 8, 100)])
    cap = 1.5 * len(assign) / 8
    out = balance_assignments(assign, 8, cap, rng)
    counts = np.bincount(out, minlength=8)
    assert counts.max() <= cap and counts.sum() == 1000
    assert not np.shares_memory(out, assign)
    # an unreachable cap (below the mean) stops instead of looping
    np.bincount(balance_assignments(assign, 8, 10.0, rng), minlength=8)


def test_fit_balances_every_step(monkeypatch):
    """One huge cluster: no step assignment may exceed the share balance/branching."""
    rng = np.random.default_rng(3)
    huge = unit(np.array([1.0] + [0.0] * 7) + 0.01 * rng.standard_normal((900, 8)))
    rest = unit(rng.standard_normal((100, 8)))
    X = np.concatenate([huge, rest])
    seen = []
    real = tree_mod.balance_assignments

    def spy(assign, k, cap, rng):
        out = real(assign, k, cap, rng)
        seen.append((np.bincount(out, minlength=k).max(), cap, len(assign)))
        return out

    monkeypatch.setattr(tree_mod, "balance_assignments", spy)
    fit_tree(X, depth=1, branching=4, steps=6, sample=400, balance=1.5, progress=False)
    assert len(seen) == 6
    for biggest, cap, m in seen:
        assert cap == 1.5 * m / 4 and biggest <= cap


@pytest.mark.parametrize("m,d,k", [(6400, 64, 16), (37, 5, 16), (1, 3, 4), (500, 8, 1)])
def test_cluster_sums_equal_add_at_bit_for_bit(m, d, k):
    """k-means' centroid sums (sort + reduceat) are np.add.at's exactly, empty clusters included."""
    rng = np.random.default_rng(m)
    X = rng.standard_normal((m, d)).astype(np.float32)
    assign = rng.integers(0, k, m)
    assign[assign == k // 2] = 0  # at least one empty cluster when k > 1
    ref = np.zeros((k, d))
    np.add.at(ref, assign, X)
    got = cluster_sums(X, assign, np.bincount(assign, minlength=k))
    assert got.dtype == np.float64 and np.array_equal(got, ref)


def test_exclude_takes_next_best(fitted):
    X, _, tree, _ = fitted
    q = X[::7]
    base = tree.route(q)
    blocked = tree.route(q, exclude={0: base[:, 0]})
    assert (blocked[:, 0] != base[:, 0]).all()
    d0 = ((q[:, None, :] - tree.centroids[0][None]) ** 2).sum(-1)
    assert np.array_equal(blocked[:, 0], np.argsort(d0, axis=1, kind="stable")[:, 1])
    # level-1 exclusion keeps the parent and takes the next sibling
    sib = tree.route(q, exclude={1: base[:, 1]})
    assert np.array_equal(sib[:, 0], base[:, 0]) and (sib[:, 1] != base[:, 1]).all()
    for i in range(len(q)):
        kids = np.arange(4) + 4 * base[i, 0]
        d = ((tree.centroids[1][kids] - q[i]) ** 2).sum(-1)
        assert sib[i, 1] == kids[np.argsort(d, kind="stable")[1]]
    # -1 excludes nothing
    assert np.array_equal(tree.route(q, exclude={0: np.full(len(q), -1)}), base)


def test_ties_go_to_lowest_index():
    c0 = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)  # children 0 and 1 coincide
    tree = Tree(1, 3, [c0])
    assert tree.route(np.array([[1.0, 0.1]]))[0, 0] == 0


def test_fit_tree_holds_one_copy_of_the_data_not_one_per_node():
    """fit_tree keeps one normalised copy of X; a node copies out only its k-means subsets (<= `sample`
    rows) and assigns its examples a chunk at a time. (Copying each node's rows, X[members], took a second
    full copy at the root: a peak of 3.0x X here.)"""
    X = np.random.default_rng(0).standard_normal((40000, 64)).astype(np.float32)
    tracemalloc.start()
    try:
        fit_tree(X, depth=2, branching=4, steps=3, sample=500, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.6 * X.nbytes, peak / X.nbytes  # measured 1.39x: the copy, index arrays, distance buffers


def test_small_nodes():
    # 6 points, 4-way: level-1 nodes get 0..6 examples; every node has branching children
    X = unit(np.random.default_rng(0).standard_normal((6, 5)))
    tree, paths = fit_tree(X, depth=2, branching=4, progress=False, return_paths=True)
    assert np.array_equal(paths, tree.route(X))
    # a node with fewer examples than children gives each distinct example its own leaf
    for node in np.unique(paths[:, 0]):
        members = paths[:, 0] == node
        assert len(np.unique(paths[members, 1])) == members.sum()
    # an empty node's children are copies of its own centroid; a 2-example node cycles its examples
    own = tree.centroids[0][0]
    assert np.array_equal(tree_mod._small_node_children(X[:0], own, 4), np.repeat(own[None], 4, 0))
    assert np.array_equal(tree_mod._small_node_children(X[:2], own, 4), X[[0, 1, 0, 1]])
    one = fit_tree(X[:1], depth=2, branching=4, progress=False)
    assert one.route(X[:1]).shape == (1, 2)


def test_cluster_sizes(fitted):
    X, _, tree, paths = fitted
    sizes = cluster_sizes(paths, tree)
    assert [len(s) for s in sizes] == [4, 16] and all(s.sum() == 400 for s in sizes)
    assert sizes[1].min() == sizes[1].max() == 25


def test_save_load_roundtrip(fitted, tmp_path):
    _, _, tree, _ = fitted
    path = tmp_path / "tree.npz"
    tree.save(path)
    back = Tree.load(path)
    assert (back.depth, back.branching, back.dim) == (2, 4, 16)
    assert all(np.array_equal(a, b) for a, b in zip(tree.centroids, back.centroids))
    assert back.fingerprint() == tree.fingerprint()
    assert [p.name for p in tmp_path.iterdir()] == ["tree.npz"]


def test_load_errors(fitted, tmp_path):
    _, _, tree, _ = fitted
    with pytest.raises(HiermemError, match="not found"):
        Tree.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(HiermemError, match="not a readable hiermem tree"):
        Tree.load(bad)
    good = tmp_path / "good.npz"
    tree.save(good)
    (tmp_path / "trunc.npz").write_bytes(good.read_bytes()[:200])
    with pytest.raises(HiermemError, match="trunc.npz"):
        Tree.load(tmp_path / "trunc.npz")
    meta = {"format": "hiermem-tree", "version": 1, "depth": 2, "branching": 4, "dim": 16,
            "fingerprint": tree.fingerprint()}
    shapes = tmp_path / "shapes.npz"
    np.savez(shapes, meta=np.array(json.dumps(meta)), level0=tree.centroids[0], level1=tree.centroids[1][:8])
    with pytest.raises(HiermemError, match="inconsistent tree.*level 1"):
        Tree.load(shapes)
    tampered = tmp_path / "tampered.npz"
    np.savez(tampered, meta=np.array(json.dumps(meta)), level0=tree.centroids[0], level1=tree.centroids[1] + 1e-3)
    with pytest.raises(HiermemError, match="fingerprint"):
        Tree.load(tampered)


def test_argument_errors(fitted):
    X, _, tree, _ = fitted
    with pytest.raises(HiermemError, match="route"):
        tree.route(X[:, :8])
    with pytest.raises(HiermemError, match="branching"):
        fit_tree(X, depth=2, branching=1, progress=False)
    with pytest.raises(HiermemError, match="NaN"):
        fit_tree(np.full((4, 3), np.nan), depth=1, branching=2, progress=False)
    with pytest.raises(HiermemError, match="shape"):
        Tree(2, 4, [tree.centroids[0], tree.centroids[0]])
