"""Routers: embedding -> root-to-leaf path in the tree.

* CentroidRouter: the paper's greedy centroid descent (Sec. 2.1).
* KnnRouter: a similarity-weighted vote over the leaves of the k nearest training documents.
  the prototype (docs/method.md §9) found centroid descent sent a probe to its entity's leaf only 25-30 % of the time,
  while this vote reached 76-87 % and scored like an oracle; both are kept and reported. Its index
  (routing/doc_index.py) is exact in RAM up to routing.knn_ram_docs documents; above, it searches the documents
  of each query's routing.knn_probe nearest leaves (or, with 0, scans every memory-mapped embedding).

Both support the paper's blocking experiment (Fig. 6b): with block_level=l, the node at level l that the
query would reach (with its whole subtree) is forbidden and the query goes to the next best.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from hiermem import config
from hiermem.errors import HiermemError
from hiermem.routing.doc_index import PROBE_LEAVES, RAM_DOCS, DocIndex, checked_leaf_counts
from hiermem.routing.embedders import l2_normalize
from hiermem.routing.tree import Tree, paths_from_leaves

DUPLICATE_SIM = 1.0 - 1e-5  # a neighbour this similar *is* the query (same text, batch noise aside)
_VOTE_CHUNK = 4096  # queries per chunk: bounds the [chunk, k, k] vote buffer


@runtime_checkable
class Router(Protocol):
    name: str
    tree: Tree

    def route(self, emb: np.ndarray, block_level: int | None = None) -> np.ndarray:
        """int64 [n, depth] global node ids per level."""
        ...


def _check_block_level(tree: Tree, block_level: int | None) -> None:
    if block_level is not None and not 0 <= block_level < tree.depth:
        raise HiermemError(f"block_level {block_level} outside 0..{tree.depth - 1} for a depth-{tree.depth} tree")


class CentroidRouter:
    def __init__(self, tree: Tree):
        self.tree = tree
        self.name = "centroid"

    def route(self, emb: np.ndarray, block_level: int | None = None) -> np.ndarray:
        _check_block_level(self.tree, block_level)
        paths = self.tree.route(emb)
        if block_level is None:
            return paths
        return self.tree.route(emb, exclude={block_level: paths[:, block_level]})


def _vote(leaves: np.ndarray, sims: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per row: the leaf with the largest summed similarity among valid neighbours (ties -> lowest
    leaf id); -1 where a row has no valid neighbour. leaves/sims/valid: [n, k]."""
    w = np.where(valid, sims, 0.0).astype(np.float64)
    same = (leaves[:, :, None] == leaves[:, None, :]) & valid[:, None, :]  # [n, k, k]
    score = (same * w[:, None, :]).sum(-1)  # members of one leaf get bit-identical sums
    score[~valid] = -np.inf
    best = score.max(axis=1, keepdims=True)
    big = np.iinfo(np.int64).max
    choice = np.where(valid & (score == best), leaves, big).min(axis=1)
    return np.where(valid.any(axis=1), choice, -1)


def _check_doc_paths(tree: Tree, doc_paths, n: int, skip=None) -> np.ndarray:
    """One-line errors for document paths that are not one root-to-leaf path of `tree` per document. Returns the
    documents per leaf, those in `skip` left out (the probing index's list sizes: one read of the paths for both)."""
    if doc_paths.shape != (n, tree.depth):
        raise HiermemError(f"knn router: document paths have shape {doc_paths.shape}, "
                           f"expected ({n}, {tree.depth}) (one path per document)")
    return checked_leaf_counts(tree, doc_paths, skip)


class KnnRouter:
    """doc_emb [N, dim] and doc_paths [N, depth] of the documents (memory-mapped is fine: read in blocks);
    skip, an optional bool [N], leaves documents out of the index (the validation split); ram_docs: the most
    documents held in RAM (routing.knn_ram_docs); probe: leaves searched per query above it (routing.knn_probe;
    0 scans every document)."""

    def __init__(self, tree: Tree, doc_emb, doc_paths, k: int = 10, skip=None, ram_docs: int = RAM_DOCS,
                 probe: int = PROBE_LEAVES):
        doc_emb = doc_emb if hasattr(doc_emb, "shape") else np.asarray(doc_emb)  # a memory map stays one
        if len(doc_emb.shape) != 2 or doc_emb.shape[1] != tree.dim or len(doc_emb) == 0:
            raise HiermemError(f"knn router: document embeddings have shape {doc_emb.shape}, expected [N>0, {tree.dim}]")
        doc_paths = doc_paths if hasattr(doc_paths, "shape") else np.asarray(doc_paths)
        if skip is not None and len(skip) != len(doc_emb):
            raise HiermemError(f"knn router: the skip mask has {len(skip)} entries for {len(doc_emb)} documents")
        leaf_counts = _check_doc_paths(tree, doc_paths, len(doc_emb), skip)
        config.check_value("routing.knn_k", k, label="routing.knn_k")
        config.check_value("routing.knn_probe", probe, label="routing.knn_probe")
        self.tree, self.k = tree, int(k)
        self.doc_paths = doc_paths
        self.name = f"knn:k={self.k}"
        self.index = DocIndex(doc_emb, skip, ram_docs, probe, tree, doc_paths, leaf_counts)
        if self.index.ntotal == 0:
            raise HiermemError("knn router: every document is skipped (no training documents to vote among)")

    def _vote_paths(self, sims: np.ndarray, idx: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Leaf per query by vote over the first k valid neighbours; -1 where none is valid."""
        # keep only the k most similar valid neighbours of each row (results are sorted by similarity)
        valid = valid & (np.cumsum(valid, axis=1) <= self.k)
        leaves = self.doc_paths[np.maximum(idx, 0), -1]
        out = np.empty(len(idx), dtype=np.int64)
        for a in range(0, len(idx), _VOTE_CHUNK):
            s = slice(a, a + _VOTE_CHUNK)
            out[s] = _vote(leaves[s], sims[s], valid[s])
        return out

    def route(self, emb: np.ndarray, block_level: int | None = None) -> np.ndarray:
        _check_block_level(self.tree, block_level)
        emb = np.asarray(emb)
        if emb.ndim != 2 or emb.shape[1] != self.tree.dim:
            raise HiermemError(f"knn router: query embeddings have shape {emb.shape}, expected [n, {self.tree.dim}]")
        q = np.ascontiguousarray(l2_normalize(emb))
        if len(q) == 0:
            return np.empty((0, self.tree.depth), dtype=np.int64)
        sims, idx = self.index.search(q, self.k)
        leaves = self._vote_paths(sims, idx, idx >= 0)
        paths = paths_from_leaves(np.maximum(leaves, 0), self.tree.depth, self.tree.branching)
        none = leaves < 0  # a probing index found no document in the leaves it searched: centroid descent
        if none.any():
            paths[none] = self.tree.route(q[none])
        dup = sims[:, 0] >= DUPLICATE_SIM  # the query is a training document: its own path, exactly
        paths[dup] = self.doc_paths[idx[dup, 0]]
        if block_level is None:
            return paths
        # Blocking: drop every neighbour inside the blocked subtree and vote among the k nearest others.
        blocked = paths[:, block_level]
        sims, idx = self.index.search(q, 4 * self.k + 64, avoid=(block_level, blocked))
        anc = self.doc_paths[np.maximum(idx, 0), block_level]
        leaves = self._vote_paths(sims, idx, (idx >= 0) & (anc != blocked[:, None]))
        out = paths_from_leaves(np.maximum(leaves, 0), self.tree.depth, self.tree.branching)
        none = leaves < 0  # every searched neighbour was blocked: fall back to centroid descent
        if none.any():
            out[none] = self.tree.route(q[none], exclude={block_level: blocked[none]})
        return out


def make_router(name: str, tree: Tree, doc_emb: np.ndarray | None = None, doc_paths: np.ndarray | None = None,
                k: int = 10, skip: np.ndarray | None = None, ram_docs: int = RAM_DOCS,
                probe: int = PROBE_LEAVES) -> Router:
    config.check_value("routing.router", name, label="--router / routing.router")
    if name == "centroid":
        return CentroidRouter(tree)
    if name == "knn":
        if doc_emb is None or doc_paths is None:
            raise HiermemError("--router knn (routing.router) needs the training documents' embeddings and paths "
                               "(run `hiermem prepare` and `hiermem cluster` first)")
        return KnnRouter(tree, doc_emb, doc_paths, k=k, skip=skip, ram_docs=ram_docs, probe=probe)
    raise AssertionError(f"routing.router={name!r} passed its check but has no router")


def routing_agreement(router: Router, query_emb: np.ndarray, target_leaf: np.ndarray,
                      block_level: int | None = None) -> dict:
    """How often queries land on their target: `leaf` = fraction whose leaf matches, `levels` = the
    fraction matching the target's ancestor at each level (level 0 first), `n` = number of queries."""
    target_leaf = np.asarray(target_leaf, dtype=np.int64)
    if len(target_leaf) == 0 or len(target_leaf) != len(query_emb):
        raise HiermemError(f"routing agreement: {len(query_emb)} queries for {len(target_leaf)} target leaves "
                           "(need the same non-zero number)")
    tree: Tree = router.tree  # both routers carry their tree
    paths = router.route(query_emb, block_level=block_level)
    target = paths_from_leaves(target_leaf, tree.depth, tree.branching)
    levels = (paths == target).mean(axis=0)
    return {"leaf": float(levels[-1]), "levels": [float(v) for v in levels], "n": int(len(target_leaf))}
