"""`hiermem cluster`: embed documents, build the hierarchical k-means tree, route every document.

Writes <data dir>/cluster/{tree.npz, doc_paths.npy, cluster.json} (embeddings are cached under
<data dir>/embeddings/) and reports cluster sizes per level and routing agreement for both routers:
how often the head of a document (its first `head_words` words) routes to the document's own leaf.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hiermem.config import Config, diff_fields
from hiermem.errors import HiermemError
from hiermem.data.prepare import DataDir
from hiermem.io_utils import atomic_save_npy, atomic_write_json
from hiermem.routing.embedders import corpus_key, embed_cached, make_embedder
from hiermem.routing.routers import make_router, routing_agreement
from hiermem.routing.tree import Tree, cluster_sizes, fit_tree


def routing_key(cfg: Config) -> dict:
    """The routing.* fields a clustering depends on (a later stage refuses a clustering made by others)."""
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


def embedder_for(cfg: Config):
    r = cfg.routing
    return make_embedder(r.encoder, r.max_tokens, r.long_docs)


def doc_heads(texts: list[str], head_words: int) -> list[str]:
    return [" ".join(t.split()[:head_words]) for t in texts]


def cluster(cfg: Config, data: DataDir, head_words: int = 8, progress: bool = True) -> dict:
    r = cfg.routing
    texts = data.texts()
    embedder = embedder_for(cfg)
    emb = embed_cached(embedder, texts, data.path / "embeddings", progress=progress)
    is_val = data.is_val()
    tree = fit_tree(emb[~is_val], depth=r.depth, branching=r.branching, seed=r.seed, steps=r.kmeans_steps,
                    sample=r.kmeans_sample, balance=r.balance, progress=progress)
    doc_paths = tree.route(emb)
    folder = data.path / "cluster"
    folder.mkdir(parents=True, exist_ok=True)
    emb_file = data.path / "embeddings" / f"emb-{corpus_key(embedder.name, texts)[:16]}.npy"
    sizes = cluster_sizes(doc_paths[~is_val], tree)
    size_report = [{"level": l + 1, "nodes": int(len(s)), "non_empty": int((s > 0).sum()), "min": int(s.min()),
                    "median": float(np.median(s)), "max": int(s.max())} for l, s in enumerate(sizes)]

    # routing agreement: a document's head (a shorter, different text) vs the document's leaf
    train_idx = np.flatnonzero(~is_val)
    sample = np.random.default_rng(r.seed).permutation(train_idx)[:500]
    head_emb = embedder.encode(doc_heads([texts[i] for i in sample], head_words))
    agreement = {}
    for name in ("centroid", "knn"):
        router = make_router(name, tree, doc_emb=emb[train_idx], doc_paths=doc_paths[train_idx], k=r.knn_k)
        agreement[name] = routing_agreement(router, head_emb, doc_paths[sample, -1])

    tree.save(folder / "tree.npz")
    atomic_save_npy(folder / "doc_paths.npy", doc_paths)
    report = {"routing": routing_key(cfg), "tree_fingerprint": tree.fingerprint(),
              "embeddings": str(emb_file.relative_to(data.path)), "n_docs": len(texts), "sizes": size_report,
              "agreement": {"query": f"first {head_words} words of {len(sample)} training documents",
                            **agreement}}
    atomic_write_json(folder / "cluster.json", report)
    return report


def ensure_clustered(cfg: Config, data: DataDir, progress: bool = True) -> Clustering:
    existing = load_clustering(data, cfg, required=False)
    if existing is None:
        cluster(cfg, data, progress=progress)
        existing = load_clustering(data, cfg, required=True)
    return existing


def format_report(report: dict) -> str:
    lines = ["level  nodes  non-empty  min  median  max"]
    for s in report["sizes"]:
        lines.append(f"{s['level']:>5}  {s['nodes']:>5}  {s['non_empty']:>9}  {s['min']:>3}  {s['median']:>6.1f}  {s['max']:>3}")
    a = report["agreement"]
    lines.append(f"routing agreement ({a['query']} -> the document's leaf):")
    for name in ("centroid", "knn"):
        per_level = ", ".join(f"{x:.2f}" for x in a[name]["levels"])
        lines.append(f"  {name:<8} leaf {a[name]['leaf']:.3f}   per level [{per_level}]")
    return "\n".join(lines)
