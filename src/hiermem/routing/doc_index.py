"""DocIndex: the nearest training documents of a batch of queries, by inner product of L2-normalised embeddings
(the knn router's votes and RAG's retrieved documents). Three ways, by the number N of documents it holds:

* N <= ram_docs (routing.knn_ram_docs): exact, a faiss IndexFlatIP in RAM (4 bytes x width a document).
* above, with probe > 0 (routing.knn_probe): an inverted file whose lists are the tree's leaves, as faiss's
  IndexIVFFlat with the tree as its coarse quantizer: each query searches, exactly, the documents of its own
  leaf (greedy descent) and of the `probe` leaves whose centroids are nearest to it. The documents are the
  clustering's, so no second k-means and no copy of the embeddings: one counting sort of the document ids by
  leaf (8 bytes a document, in an unlinked memory-mapped file), and a batch reads only the rows of the leaves it
  probes, a block at a time. Approximate: a neighbour in a leaf no query probes is missed.
* above, with probe = 0: exact, a scan of every (memory-mapped) embedding per batch, a block at a time, merged
  in a faiss ResultHeap: the in-RAM index's neighbours (ties aside), but a full read of the embeddings per batch.

Queries where fewer than kk documents were found get -inf similarities and document id -1 in the missing places.
"""

from __future__ import annotations

import os
import tempfile
from itertools import count
from pathlib import Path

import numpy as np

from hiermem.data.npyfile import counting_sort
from hiermem.errors import HiermemError
from hiermem.routing.embedders import l2_normalize
from hiermem.routing.tree import Tree, paths_from_leaves

RAM_DOCS = 2_000_000  # routing.knn_ram_docs's default: documents the knn index holds in RAM (3 GB at 384-d)
PROBE_LEAVES = 16  # routing.knn_probe's default: leaves searched per query above ram_docs, besides its own
KNN_BLOCK_DOCS = 1 << 16  # documents read at a time: building the index, checking paths, scanning
_names = count()


def checked_leaf_counts(tree: Tree, doc_paths, skip=None) -> np.ndarray:
    """The documents per leaf, those in `skip` left out (the probing index's list sizes), read KNN_BLOCK_DOCS rows
    at a time; a one-line error where a row is not a root-to-leaf path of `tree`."""
    n_leaves = tree.n_nodes(tree.depth - 1)
    counts = np.zeros(n_leaves, np.int64)
    for a in range(0, doc_paths.shape[0], KNN_BLOCK_DOCS):
        p = np.asarray(doc_paths[a : a + KNN_BLOCK_DOCS], np.int64)
        if not np.array_equal(p, paths_from_leaves(p[:, -1], tree.depth, tree.branching)) or \
                p[:, -1].min() < 0 or p[:, -1].max() >= n_leaves:
            raise HiermemError("knn router: document paths are not valid root-to-leaf paths of this tree")
        leaves = p[:, -1] if skip is None else p[~np.asarray(skip[a : a + KNN_BLOCK_DOCS], bool), -1]
        counts += np.bincount(leaves, minlength=n_leaves)
    return counts


class DocIndex:
    """Search over the documents of doc_emb [N, dim] not in `skip` (a bool [N]), answering document ids (rows of
    doc_emb). The probing index needs the tree and the documents' paths [N, depth] (memory-mapped is fine);
    leaf_counts, the kept documents per leaf if the caller has counted them, saves one read of the paths."""

    def __init__(self, doc_emb, skip=None, ram_docs: int = RAM_DOCS, probe: int = 0, tree: Tree | None = None,
                 doc_paths=None, leaf_counts: np.ndarray | None = None):
        import faiss

        self.doc_emb, self.skip, self.dim = doc_emb, skip, doc_emb.shape[1]
        self.ntotal = len(doc_emb) - (0 if skip is None else int(np.count_nonzero(skip)))
        self.probe, self.tree = int(probe), tree
        self._flat = self._lists = None
        if self.ntotal <= ram_docs:
            self._flat = faiss.IndexIDMap(faiss.IndexFlatIP(self.dim))
            for ids, x in self._blocks():
                self._flat.add_with_ids(x, ids)
        elif self.probe > 0:
            if tree is None or doc_paths is None:
                raise ValueError("DocIndex: probing the tree's leaves needs the tree and the documents' paths")
            self._build_lists(doc_paths, leaf_counts)

    @property
    def mode(self) -> str:
        return "ram" if self._flat is not None else "probe" if self._lists is not None else "scan"

    def _kept_blocks(self):
        """(first row, end row, which of them are kept) per block of KNN_BLOCK_DOCS rows."""
        for a in range(0, len(self.doc_emb), KNN_BLOCK_DOCS):
            b = min(len(self.doc_emb), a + KNN_BLOCK_DOCS)
            yield a, b, np.ones(b - a, bool) if self.skip is None else ~np.asarray(self.skip[a:b], bool)

    def _blocks(self):
        """(document ids, their normalised float32 embeddings) per block of KNN_BLOCK_DOCS rows."""
        for a, b, keep in self._kept_blocks():
            ids = a + np.flatnonzero(keep)
            if len(ids):
                yield ids, np.ascontiguousarray(l2_normalize(np.asarray(self.doc_emb[a:b], np.float32)[keep]))

    def _build_lists(self, doc_paths, counts: np.ndarray | None) -> None:
        """The kept document ids sorted by leaf (in id order inside a leaf), and where each leaf's run starts."""
        import faiss

        def by_leaf():
            for a, b, keep in self._kept_blocks():
                yield a + np.flatnonzero(keep), np.asarray(doc_paths[a:b, -1], np.int64)[keep]

        if counts is None:
            counts = checked_leaf_counts(self.tree, doc_paths, self.skip)
        # TMPDIR: file-backed pages (reclaimable), not anonymous memory; unlinked, so nothing is left behind
        path = Path(tempfile.gettempdir()) / f".hiermem-knn-{os.getpid()}-{next(_names)}.npy"
        self._lists = counting_sort(by_leaf, counts, path)
        path.unlink()
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._leaf_flat = faiss.IndexFlatL2(self.dim)  # the tree routes by squared L2, on normalised vectors
        self._leaf_flat.add(np.ascontiguousarray(self.tree.centroids[-1], np.float32))

    def probed_leaves(self, q: np.ndarray, avoid: tuple[int, np.ndarray] | None = None) -> np.ndarray:
        """[n, 1 + probe] leaves per query: its own (greedy descent) first, then the nearest leaf centroids; with
        avoid = (level, node per query) none inside that node's subtree. A repeated leaf is searched once."""
        t = self.tree
        n_leaves = t.n_nodes(t.depth - 1)
        extra = 0 if avoid is None else t.branching ** (t.depth - 1 - avoid[0])  # leaves under one node
        _, near = self._leaf_flat.search(q, min(n_leaves, self.probe + extra))
        exclude = None
        if avoid is not None:
            level, nodes = avoid
            exclude = {level: nodes}
            inside = near // t.branching ** (t.depth - 1 - level) == nodes[:, None]
            rank = np.cumsum(~inside, axis=1)
            near = np.where(inside | (rank > self.probe), -1, near)  # the first `probe` leaves outside
        own = t.route(q, exclude=exclude)[:, -1:]
        return np.concatenate([own, near], axis=1)

    def _search_lists(self, q: np.ndarray, kk: int, avoid) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        n = len(q)
        D = np.full((n, kk), -np.inf, np.float32)
        I = np.full((n, kk), -1, np.int64)
        probed = self.probed_leaves(q, avoid)
        leaves, queries = probed.ravel(), np.repeat(np.arange(n), probed.shape[1])
        ok = leaves >= 0
        pairs = np.unique(leaves[ok] * n + queries[ok])  # each (leaf, query) once, ordered by leaf
        leaf_of, query_of = pairs // n, pairs % n
        leaves, first = np.unique(leaf_of, return_index=True)
        flat = faiss.IndexFlatIP(self.dim)
        for leaf, qs in zip(leaves.tolist(), np.split(query_of, first[1:])):  # the queries that probe each leaf
            lo, hi = int(self._starts[leaf]), int(self._starts[leaf + 1])
            for a in range(lo, hi, KNN_BLOCK_DOCS):
                ids = np.asarray(self._lists[a : min(hi, a + KNN_BLOCK_DOCS)])  # ascending: rows in file order
                flat.add(np.ascontiguousarray(l2_normalize(np.asarray(self.doc_emb[ids], np.float32))))
                sims, rows = flat.search(q[qs], min(kk, len(ids)))
                flat.reset()
                _merge(D, I, qs, sims, ids[rows])
        return D, I

    def search(self, q: np.ndarray, kk: int, avoid: tuple[int, np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, document ids) [n, min(kk, ntotal)], most similar first. avoid = (level, node per query):
        a probing index searches no leaf under that node (the exact ones search everything; the caller drops)."""
        import faiss

        kk = min(kk, self.ntotal)
        if self._flat is not None:
            return self._flat.search(q, kk)
        if self._lists is not None:
            return self._search_lists(q, kk, avoid)
        heap, flat = faiss.ResultHeap(len(q), kk, keep_max=True), faiss.IndexFlatIP(self.dim)
        for ids, x in self._blocks():
            flat.add(x)
            sims, rows = flat.search(q, min(kk, len(ids)))
            flat.reset()
            pad = kk - rows.shape[1]  # a block smaller than kk: the heap takes [n, kk] results
            sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=-np.inf).astype(np.float32)
            heap.add_result(sims, np.pad(ids[rows], ((0, 0), (0, pad)), constant_values=-1))
        heap.finalize()
        return heap.D, heap.I


def _merge(D: np.ndarray, I: np.ndarray, qs: np.ndarray, sims: np.ndarray, ids: np.ndarray) -> None:
    """Rows qs of (D, I) become the kk most similar of themselves and (sims, ids), most similar first."""
    cat_d, cat_i = np.concatenate([D[qs], sims], 1), np.concatenate([I[qs], ids], 1)
    top = np.argsort(-cat_d, axis=1, kind="stable")[:, : D.shape[1]]
    D[qs], I[qs] = np.take_along_axis(cat_d, top, 1), np.take_along_axis(cat_i, top, 1)


__all__ = ["DocIndex", "KNN_BLOCK_DOCS", "PROBE_LEAVES", "RAM_DOCS", "checked_leaf_counts"]
