"""routing/doc_index.py: the probing index (the tree's leaves as inverted lists) against a brute-force search
over the probed leaves' documents, and probing every leaf against the exact in-RAM index."""

import numpy as np
import pytest

from hiermem.routing.doc_index import DocIndex
from hiermem.routing.tree import fit_tree


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """64 blobs on the 16-d sphere, 20 documents each, in a memory-mapped file (scaled: the index normalises);
    a depth-2, 8-way tree over them (64 leaves); a skip mask of a fifth of the documents; 90 queries."""
    rng = np.random.default_rng(3)
    centers = unit(rng.standard_normal((64, 16)))
    X = unit(np.repeat(centers, 20, axis=0) + 0.25 * rng.standard_normal((1280, 16)))
    tree, paths = fit_tree(X, depth=2, branching=8, seed=0, steps=10, sample=512, progress=False, return_paths=True)
    emb = np.lib.format.open_memmap(tmp_path_factory.mktemp("emb") / "emb.npy", "w+", np.float32, X.shape)
    emb[:] = 2.0 * X
    skip = rng.random(len(X)) < 0.2
    Q = np.concatenate([unit(centers[:60] + 0.3 * rng.standard_normal((60, 16))), X[:30]])
    return X, emb, paths, tree, skip, Q


def brute_force(X, paths, tree, skip, q, kk, probe, avoid=None):
    """Per query: the exact kk nearest kept documents among those of its greedy leaf and of its `probe` nearest
    leaf centroids (squared L2), leaving out the leaves under the avoided node; -1 / -inf past what there is."""
    leaf_c = tree.centroids[-1]
    D = np.full((len(q), kk), -np.inf, np.float32)
    I = np.full((len(q), kk), -1, np.int64)
    for i, x in enumerate(q):
        order = np.argsort(((leaf_c - x) ** 2).sum(1), kind="stable")
        exclude = None
        if avoid is not None:
            level, nodes = avoid
            order = order[order // tree.branching ** (tree.depth - 1 - level) != nodes[i]]
            exclude = {level: nodes[i : i + 1]}
        leaves = set(order[:probe].tolist()) | {int(tree.route(x[None], exclude=exclude)[0, -1])}
        cand = np.flatnonzero(np.isin(paths[:, -1], list(leaves)) & ~skip)
        sims = X[cand] @ x
        top = np.argsort(-sims, kind="stable")[:kk]
        D[i, : len(top)], I[i, : len(top)] = sims[top], cand[top]
    return D, I


@pytest.mark.parametrize("probe", [1, 3])
def test_probing_is_the_exact_search_over_the_probed_leaves(corpus, probe):
    X, emb, paths, tree, skip, Q = corpus
    index = DocIndex(emb, skip, ram_docs=0, probe=probe, tree=tree, doc_paths=paths)
    assert index.mode == "probe" and index.ntotal == int((~skip).sum())
    for kk in (1, 10, 60):  # 60: more than some probed leaves hold, so some rows end in -1
        D, I = index.search(unit(Q), kk)
        D_ref, I_ref = brute_force(X, paths, tree, skip, unit(Q), kk, probe)
        assert np.array_equal(I, I_ref) and np.allclose(D, D_ref, atol=1e-5)
        assert not skip[I[I >= 0]].any()
    assert (I == -1).any() and np.isneginf(D[I == -1]).all()
    own = tree.route(unit(Q))[:, 0]  # avoid: no leaf under the query's own level-0 node is searched
    D, I = index.search(unit(Q), 10, avoid=(0, own))
    D_ref, I_ref = brute_force(X, paths, tree, skip, unit(Q), 10, probe, avoid=(0, own))
    assert np.array_equal(I, I_ref) and np.allclose(D, D_ref, atol=1e-5)
    assert (paths[I[I >= 0], 0] != np.broadcast_to(own[:, None], I.shape)[I >= 0]).all()


def test_probing_every_leaf_is_the_exact_in_ram_index(corpus):
    X, emb, paths, tree, skip, Q = corpus
    ram = DocIndex(emb, skip)
    probing = DocIndex(emb, skip, ram_docs=0, probe=64, tree=tree, doc_paths=paths)
    assert ram.mode == "ram" and probing.mode == "probe"
    for kk in (1, 10, 200):
        (s1, i1), (s2, i2) = ram.search(unit(Q), kk), probing.search(unit(Q), kk)
        assert np.array_equal(i1, i2) and np.allclose(s1, s2, atol=1e-6)
    with pytest.raises(ValueError, match="tree"):
        DocIndex(emb, skip, ram_docs=0, probe=2)
