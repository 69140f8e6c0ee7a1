"""Per-context memory at inference: embed the routing text, route (centroid or knn), fetch the path's blocks.

`--memory fetched` uses the routed path, `generic` the generic block, `none` the anchor alone. A blocking
level forbids the best-matching subtree at that level (the paper's blocking experiment, Fig. 6b).
"""

from __future__ import annotations

import numpy as np
import torch

from hiermem.config import MEMORY_MODES  # declared with the config, so the CLI reads it without torch
from hiermem.errors import HiermemError
from hiermem.eval.run import Run
from hiermem.memory.fetch import fetch
from hiermem.model import FetchedMemory
from hiermem.routing.clustering import embedder_for
from hiermem.routing.routers import make_router


class MemoryContext:
    def __init__(self, run: Run, memory: str = "fetched", router: str | None = None, block_level: int | None = None):
        if memory not in MEMORY_MODES:
            raise HiermemError(f"--memory {memory!r} is not one of {', '.join(MEMORY_MODES)}")
        if memory != "none" and run.bank is None:
            raise HiermemError(f"{run.path}: --memory {memory} needs a run trained with memory (this one has none)")
        self.run, self.mode, self.block_level = run, memory, block_level
        self.router_name = router or run.cfg.routing.router
        self._router = self._embedder = None
        if block_level is not None and run.tree is not None and not 0 <= block_level < run.tree.depth:
            raise HiermemError(f"--block-level {block_level} is outside the tree's levels 0..{run.tree.depth - 1}")

    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = embedder_for(self.run.cfg)
        return self._embedder

    @property
    def router(self):
        if self._router is None:
            doc_emb = doc_paths = skip = None
            if self.router_name == "knn":  # every training document, memory-mapped (the router reads blocks)
                c = self.run.clustering()
                doc_emb, doc_paths, skip = c.doc_emb(), c.doc_paths, self.run.data().is_val()
            self._router = make_router(self.router_name, self.run.tree, doc_emb=doc_emb, doc_paths=doc_paths,
                                       k=self.run.cfg.routing.knn_k, skip=skip,
                                       ram_docs=self.run.cfg.routing.knn_ram_docs,
                                       probe=self.run.cfg.routing.knn_probe)
        return self._router

    def route(self, texts: list[str]) -> np.ndarray:
        return self.router.route(self.embedder.encode(list(texts)), block_level=self.block_level)

    def memory_for_paths(self, paths: np.ndarray) -> FetchedMemory | None:
        if self.mode == "none":
            return None
        use_generic = torch.full((len(paths),), self.mode == "generic", dtype=torch.bool)
        return fetch(self.run.bank, np.asarray(paths), use_generic, device=self.run.device).memory

    def memory_for_texts(self, texts: list[str]) -> FetchedMemory | None:
        if self.mode == "none":
            return None
        if self.mode == "generic":
            return self.memory_for_paths(np.zeros((len(texts), self.run.tree.depth), dtype=np.int64))
        return self.memory_for_paths(self.route(texts))
