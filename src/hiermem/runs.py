"""Glue between stages: resolving config values, the clustering of a data directory, packed data, and
loading a finished run directory (config, tokenizer, anchor, bank, tree, routers) for eval/generate/demo."""

from __future__ import annotations

import fcntl
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hiermem.config import Config, diff_fields, read_config, to_dict
from hiermem.data.packing import PackedDataset, pack_sequences
from hiermem.data.prepare import DataDir
from hiermem.data.tokenizer import Tokenizer
from hiermem.errors import HiermemError
from hiermem.memory.bank import BankSpec, MemoryBank, bank_param_counts
from hiermem.model.transformer import Transformer, count_parameters
from hiermem.routing.tree import Tree
from hiermem.train.checkpoint import load_weights


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HiermemError("config: train.device=cuda but no CUDA device is available")
    return torch.device(name)


def resolve_vocab(cfg: Config, tok: Tokenizer) -> None:
    """model.vocab_size 0 -> the tokenizer's size rounded up to a multiple of 64; a smaller one is refused."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = -(-tok.vocab_size // 64) * 64
    elif cfg.model.vocab_size < tok.vocab_size:
        raise HiermemError(
            f"config: model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")


def bank_spec(cfg: Config) -> BankSpec:
    m = cfg.memory
    return BankSpec(d=cfg.model.d_model, n_layers=cfg.model.n_layers, ranks=tuple(m.ranks),
                    branching=cfg.routing.branching, layers=tuple(m.layers) if m.layers else None,
                    generic=m.generic, init_std=m.init_std)


def parameter_report(cfg: Config) -> dict:
    """Anchor / fetched / bank parameter counts, computed from shapes alone."""
    out = {"anchor": count_parameters(cfg.model)}
    if cfg.uses_memory:
        counts = bank_param_counts(bank_spec(cfg))
        out.update(fetched=counts["fetched"], bank=counts["bank"], generic=counts["generic"])
    return out


def routing_key(cfg: Config) -> dict:
    r = cfg.routing
    return {"encoder": r.encoder, "max_tokens": r.max_tokens, "long_docs": r.long_docs, "depth": r.depth,
            "branching": r.branching, "kmeans_steps": r.kmeans_steps, "kmeans_sample": r.kmeans_sample,
            "balance": r.balance, "seed": r.seed}


@dataclass
class Clustering:
    """The tree of a data directory, every document's path and the document embeddings (for the knn router)."""

    tree: Tree
    doc_paths: np.ndarray  # [n_docs, depth] int64, training and validation documents alike
    doc_emb_path: Path
    meta: dict

    def doc_emb(self) -> np.ndarray:
        return np.load(self.doc_emb_path, mmap_mode="r")


def load_clustering(data: DataDir, cfg: Config, required: bool) -> Clustering | None:
    folder = data.path / "cluster"
    if not (folder / "cluster.json").is_file():
        if required:
            raise HiermemError(f"{data.path}: no tree yet (run `hiermem cluster` with this config first)")
        return None
    meta = json.loads((folder / "cluster.json").read_text())
    diffs = diff_fields(meta["routing"], routing_key(cfg), "routing.")  # every key is a routing.* field
    if diffs:
        if required:
            raise HiermemError(f"{folder}: clustered with another routing config: {'; '.join(diffs)}")
        return None
    tree = Tree.load(folder / "tree.npz")
    return Clustering(tree, np.load(folder / "doc_paths.npy"), data.path / meta["embeddings"], meta)


def _pack_split(data: DataDir, cfg: Config, clustering: Clustering | None, split: str, out: Path) -> None:
    is_val = data.is_val()
    doc_index = np.flatnonzero(is_val if split == "val" else ~is_val)
    if len(doc_index) == 0:
        raise HiermemError(f"{data.path}: the {split} split has no documents")
    tok = data.tokenizer()
    groups = paths = None
    depth = 0
    if clustering is not None:
        leaf = clustering.doc_paths[:, -1]
        groups = leaf[doc_index]
        paths = {int(l): tuple(int(x) for x in clustering.doc_paths[i]) for i, l in zip(doc_index, groups)}
        depth = clustering.doc_paths.shape[1]
    pack_sequences(data.doc_tokens(), doc_index, cfg.data.seq_len, tok.eos_id, out,
                   group_of_doc=groups, path_of_group=paths, depth=depth)


def packed_dir(data: DataDir, cfg: Config, clustering: Clustering | None, split: str) -> Path:
    """Where a split's packed sequences live, keyed by (split, seq_len, tree or flat)."""
    tree_id = clustering.tree.fingerprint() if clustering is not None else "flat"
    key = hashlib.sha256(f"{split}:{cfg.data.seq_len}:{tree_id}".encode()).hexdigest()[:12]
    return data.path / "packed" / f"{split}-{key}"


def ensure_packed(data: DataDir, cfg: Config, clustering: Clustering | None, split: str) -> PackedDataset:
    """Packed sequences for a split, cached. With a clustering, documents are packed per leaf (one path per
    sequence, the paper's App. A.2); without, in corpus order."""
    out = packed_dir(data, cfg, clustering, split)
    out.parent.mkdir(parents=True, exist_ok=True)
    # several trainings may start at once on one data dir (the demo's parallel jobs): one packs, the others
    # wait on the lock and then reuse its output
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "meta.json").is_file():
            _pack_split(data, cfg, clustering, split, out)
    return PackedDataset(out)


class Run:
    """A finished (or checkpointed) run directory, loaded for evaluation and generation."""

    def __init__(self, path: str | Path, device: str = "auto"):
        self.path = Path(path)
        self.cfg = read_config(self.path / "config.yaml")
        self.tokenizer = Tokenizer.load(self.path / "tokenizer.json")
        if self.tokenizer.vocab_size > self.cfg.model.vocab_size:
            raise HiermemError(f"{self.path}/tokenizer.json: vocabulary larger than the model's (another tokenizer?)")
        self.device = resolve_device(device)
        self.model = Transformer(self.cfg.model).to(self.device).eval()
        weights, bank_dir = self.path / "anchor.safetensors", self.path / "bank"
        if not weights.is_file():  # an unfinished run: its last checkpoint, anchor and bank of the same step
            weights, bank_dir = self.path / "checkpoint" / "model.safetensors", self.path / "checkpoint" / "bank"
        load_weights(self.model, weights)
        self.bank = self.tree = None
        if self.cfg.uses_memory:
            self.bank = MemoryBank.load(bank_dir, mmap=True, cache_levels=self.cfg.memory.cache_levels)
            self.bank.check_compatible(bank_spec(self.cfg))
            self.tree = Tree.load(self.path / "tree.npz")

    def check_data(self, data: DataDir) -> None:
        """Refuse data tokenised with another tokenizer than the run's."""
        if data.meta["tokenizer_fingerprint"] != self.tokenizer.fingerprint():
            raise HiermemError(f"{data.path}: tokenised with another tokenizer than the run {self.path}")

    def clustering(self) -> Clustering:
        data = DataDir(self.cfg.data_dir)
        c = load_clustering(data, self.cfg, required=True)
        if c.tree.fingerprint() != self.tree.fingerprint():
            raise HiermemError(f"{data.path}/cluster: tree differs from the run's tree.npz (re-clustered since?)")
        return c

    def same_config_as(self, other: Config) -> list[str]:
        return diff_fields(to_dict(self.cfg), to_dict(other))
