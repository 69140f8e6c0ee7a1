"""The memory explorer's question, answered: the route of a prompt down the tree, how many training documents
each node on it holds, and the training documents of its leaf nearest to the prompt.

Node sizes and documents come from the run's clustering (its data directory: doc_paths, the document
embeddings, documents.jsonl); a run whose data directory is gone still routes, and says why the rest is missing.
"""

from __future__ import annotations

import numpy as np

from hiermem.errors import HiermemError
from hiermem.eval.run import Run
from hiermem.routing.embedders import l2_normalize
from hiermem.routing.tree import cluster_sizes

SNIPPET_CHARS = 300


class Explorer:
    def __init__(self, run: Run):
        self.run = run
        self._loaded = False
        self._why: str | None = None
        self._paths = self._emb = self._sizes = None

    def _load(self) -> None:
        """The training documents' paths, embeddings and per-node counts (once; the reason if unavailable)."""
        if self._loaded:
            return
        self._loaded = True
        try:
            c = self.run.clustering()
            train = ~self.run.data().is_val()
        except HiermemError as e:
            self._why = str(e)
            return
        self._ids = np.flatnonzero(train)
        self._paths = c.doc_paths[train]
        self._emb = c.doc_emb()
        self._sizes = cluster_sizes(self._paths, self.run.tree)

    def explain(self, emb: np.ndarray, path: np.ndarray, n_docs: int) -> dict:
        """emb: the prompt's embedding [dim]; path: its route [depth]."""
        self._load()
        levels = [{"level": l, "node": int(node), "children": self.run.tree.branching,
                   "documents": None if self._sizes is None else int(self._sizes[l][node])}
                  for l, node in enumerate(path)]
        out = {"path": [int(x) for x in path], "levels": levels, "leaf_documents": [], "note": self._why}
        if self._sizes is None or n_docs == 0:
            return out
        members = np.flatnonzero(self._paths[:, -1] == path[-1])
        if len(members):
            docs = self._ids[members]
            sims = l2_normalize(np.asarray(self._emb[docs], np.float32)) @ l2_normalize(emb[None].astype(np.float32))[0]
            best = np.argsort(-sims, kind="stable")[:n_docs]
            texts = self.run.data().texts_at(docs[best])
            out["leaf_documents"] = [{"document": int(docs[b]), "similarity": round(float(sims[b]), 4),
                                      "text": t if len(t) <= SNIPPET_CHARS else t[:SNIPPET_CHARS] + "…"}
                                     for b, t in zip(best, texts)]
        return out


__all__ = ["Explorer"]
