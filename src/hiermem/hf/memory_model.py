"""MemoryModel: an exported hiermem model run with fetched memory from transformers, no trainer involved.

    model = MemoryModel.from_pretrained(OUT)                  # a folder written by `hiermem export RUN OUT`
    batch = model.tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=32)          # each prompt routed on its own text

Each sequence is routed once on its text (by default the decoded prompt; `route_texts=` or `paths=` override
it), the blocks of its root-to-leaf path are fetched from the exported bank, and MemoryHooks (model/hf/mlp.py) add
them to every MLP for the call: what `hiermem generate RUN` and `hiermem eval RUN` do with the native anchor.
`memory="generic"` uses the generic block instead, `memory="none"` the anchor alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hiermem.config import MEMORY_MODES, read_config
from hiermem.errors import HiermemError
from hiermem.hf.export import EXPORT_DIR, EXPORT_FORMAT, EXPORT_VERSION, KNN_FILES
from hiermem.model.hf.load import load_model, load_tokenizer
from hiermem.model.hf.mlp import MemoryHooks
from hiermem.memory.bank import MemoryBank
from hiermem.memory.fetch import fetch
from hiermem.model import FetchedMemory
from hiermem.routing.clustering import embedder_for
from hiermem.routing.routers import make_router
from hiermem.routing.tree import Tree


def read_export(path: Path) -> dict:
    """export.json of an export folder; anything else is refused in one line."""
    meta_path = path / EXPORT_DIR / "export.json"
    if not meta_path.is_file():
        raise HiermemError(f"{path}: not a hiermem export (no {EXPORT_DIR}/export.json; write one with "
                           "`hiermem export RUN OUT`)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        fmt, version = meta["format"], meta["format_version"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HiermemError(f"{meta_path}: unreadable ({type(e).__name__}: {e})") from None
    if fmt != EXPORT_FORMAT or not isinstance(version, int) or version > EXPORT_VERSION:
        raise HiermemError(f"{meta_path}: export format {fmt!r} version {version!r} is not one this hiermem "
                           f"reads ({EXPORT_FORMAT} <= {EXPORT_VERSION})")
    return meta


class MemoryModel:
    """A transformers causal LM (`.model`), its tokenizer (`.tokenizer`) and, for memory runs, the bank, tree
    and router that give each sequence its fetched neurons."""

    def __init__(self, path: str | Path, memory: str | None = None, router: str | None = None,
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.path = Path(path)
        self.meta = read_export(self.path)
        self.mode = memory or ("fetched" if self.meta["memory"] else "none")
        if self.mode not in MEMORY_MODES:
            raise HiermemError(f"memory={self.mode!r} is not one of {', '.join(MEMORY_MODES)}")
        if self.mode != "none" and not self.meta["memory"]:
            raise HiermemError(f"{self.path}: memory={self.mode} needs an export of a memory run (this one has none)")
        side = self.path / EXPORT_DIR
        overrides = [f"train.device={device}"] + ([f"routing.router={router}"] if router else [])
        self.cfg = read_config(side / "config.yaml", overrides)
        self.device = torch.device(device)
        self.model = load_model(self.path, dtype=dtype, device=device)
        self.tokenizer = load_tokenizer(self.path)
        self.hooks = MemoryHooks(self.model)
        self.bank = self.tree = self._router = self._embedder = None
        if self.meta["memory"]:
            self.tree = Tree.load(side / "tree.npz")
        if self.mode != "none":
            m = self.cfg.memory
            self.bank = MemoryBank.load(side / "bank", mmap=m.mmap, cache_bytes=m.cache_bytes, writable=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "MemoryModel":
        """Load an export folder; kwargs: memory (fetched | generic | none), router (knn | centroid), device, dtype."""
        return cls(path, **kwargs)

    @property
    def router(self):
        if self._router is None:
            r = self.cfg.routing
            emb = paths = None
            side = self.path / EXPORT_DIR
            if r.router == "knn" and (side / "knn.npz").is_file():  # an export written before KNN_FILES
                with np.load(side / "knn.npz") as z:
                    emb, paths = z["doc_emb"], z["doc_paths"]
            elif r.router == "knn":  # memory-mapped: the router reads its index in blocks
                emb, paths = (np.load(side / f, mmap_mode="r") for f in KNN_FILES)
            self._router = make_router(r.router, self.tree, doc_emb=emb, doc_paths=paths, k=r.knn_k,
                                       ram_docs=r.knn_ram_docs, probe=r.knn_probe)
        return self._router

    def route(self, texts: list[str]) -> np.ndarray:
        """Root-to-leaf paths [len(texts), depth] of the texts (the export's encoder and router)."""
        if self._embedder is None:
            self._embedder = embedder_for(self.cfg)
        return self.router.route(self._embedder.encode(list(texts)))

    def memory_for(self, texts: list[str] | None = None, paths: np.ndarray | None = None) -> FetchedMemory | None:
        """The fetched memory of a batch: routed on texts, or from paths [B, depth]; None for memory="none"."""
        if self.mode == "none":
            return None
        if self.mode == "generic":
            n = len(texts) if texts is not None else len(paths)
            paths, generic = np.zeros((n, self.tree.depth), np.int64), torch.ones(n, dtype=torch.bool)
        else:
            paths, generic = (self.route(texts) if paths is None else np.asarray(paths)), None
        return fetch(self.bank, paths, generic, device=self.device).memory

    def _memory(self, input_ids: torch.Tensor, attention_mask, route_texts, paths) -> FetchedMemory | None:
        if self.mode == "none" or paths is not None or route_texts is not None:
            return self.memory_for(route_texts, paths)
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        return self.memory_for([self.tokenizer.decode(row[k]) for row, k in zip(input_ids, keep)])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 route_texts: list[str] | None = None, paths: np.ndarray | None = None, **kwargs):
        """The model's forward pass (logits ...) with each row's memory."""
        memory = self._memory(input_ids, attention_mask, route_texts, paths)
        with self.hooks.using(memory):
            return self.model(input_ids=input_ids.to(self.device), attention_mask=None if attention_mask is None
                              else attention_mask.to(self.device), **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 route_texts: list[str] | None = None, paths: np.ndarray | None = None, **kwargs) -> torch.Tensor:
        """transformers' generate with each row's memory (one row per prompt: no beams, one sequence each)."""
        if kwargs.get("num_beams", 1) != 1 or kwargs.get("num_return_sequences", 1) != 1:
            raise HiermemError("MemoryModel.generate: one memory per prompt, so num_beams and "
                               "num_return_sequences must be 1")
        memory = self._memory(input_ids, attention_mask, route_texts, paths)
        with self.hooks.using(memory), torch.no_grad():
            return self.model.generate(input_ids=input_ids.to(self.device), attention_mask=None
                                       if attention_mask is None else attention_mask.to(self.device), **kwargs)


__all__ = ["MemoryModel", "read_export"]
