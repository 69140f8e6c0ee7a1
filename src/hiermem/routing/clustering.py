"""`hiermem cluster`: embed documents, build the hierarchical k-means tree, route every document.

Writes <data dir>/cluster/{tree.npz, doc_paths.npy, cluster.json} (embeddings are cached under
<data dir>/embeddings/) and reports cluster sizes per level and routing agreement for both routers:
how often the head of a document (its first `head_words` words) routes to the document's own leaf.

It streams, so its memory does not grow with the corpus (beyond DataDir.is_val's byte per document):
* texts are embedded `routing.chunk_docs` at a time into a memory-mapped .npy, the file the knn router
  reads (resumable; `embed_corpus`);
* the tree is fitted on at most `routing.fit_docs` training documents: all of them when there are no more
  (then the tree and the paths are exactly those of a fit on the whole training split), else a seeded
  uniform sample (`fit_sample`);
* every document is then routed down the tree `chunk_docs` at a time into a memory-mapped doc_paths.npy,
  by the plain nearest-centroid descent that the router also uses at inference. So the balance rule
  (routing.balance: a cluster may hold at most balance/branching of one k-means step's assignments) binds
  while fitting on the sample only; the final cluster sizes on the whole corpus, which the report shows,
  may exceed that cap;
* with routing.tree_from (a run or a clustered data directory) no tree is fitted: the documents are routed
  into that tree (`reused_tree`), so a run trained on them with train.init_from=<that run> adds to the
  memories of the nodes they reach and leaves every other block as it was;
* the agreement report's knn router votes among at most AGREEMENT_INDEX_DOCS documents of the fit sample
  (the queries' own documents among them), and the queries' texts are read with `texts_at`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hiermem.config import Config, diff_fields, read_config
from hiermem.errors import HiermemError
from hiermem.data.prepare import DataDir
from hiermem.integrity import FULL_CHECK_BYTES, check_file, crc32_bytes, entry_of, read_json
from hiermem.io_utils import atomic_path, atomic_write_json
from hiermem.locking import DirLock
from hiermem.routing.embedders import embed_corpus, make_embedder
from hiermem.routing.routers import make_router, routing_agreement
from hiermem.routing.tree import Tree, cluster_sizes, fit_tree

AGREEMENT_QUERIES = 500  # document heads routed for the agreement report
AGREEMENT_INDEX_DOCS = 50_000  # training documents the report's knn router votes among (its index is in RAM)


def routing_key(cfg: Config) -> dict:
    """The routing.* fields a clustering depends on (a later stage refuses a clustering made by others)."""
    r = cfg.routing
    return {"encoder": r.encoder, "max_tokens": r.max_tokens, "long_docs": r.long_docs, "depth": r.depth,
            "branching": r.branching, "kmeans_steps": r.kmeans_steps, "kmeans_sample": r.kmeans_sample,
            "balance": r.balance, "seed": r.seed, "fit_docs": r.fit_docs, "chunk_docs": r.chunk_docs,
            "embed_batch": r.embed_batch}


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
    meta = read_clustering_report(folder / "cluster.json")
    diffs = diff_fields(meta["routing"], routing_key(cfg), "routing.")  # every key is a routing.* field
    if diffs:
        if required:
            raise HiermemError(f"{folder}: clustered with another routing config: {'; '.join(diffs)}")
        return None
    files = meta.get("checksums", {}).get("files", {})
    try:
        check_file(folder / "tree.npz", "routing tree", entry=files.get("tree.npz"))
        paths_entry = files.get("doc_paths.npy")  # in full up to FULL_CHECK_BYTES, else its size (hiermem verify)
        check_file(folder / "doc_paths.npy", "document paths", entry=paths_entry,
                   full=(paths_entry or {}).get("size", 0) <= FULL_CHECK_BYTES)
        emb = meta["embeddings"]  # read row by row (the knn router): its size here, in full by hiermem verify
        check_file(data.path / emb, "embedding cache", full=False, entry=files.get(emb))
        tree = Tree.load(folder / "tree.npz")
    except HiermemError as e:
        if required:
            raise HiermemError(f"{e} (run `hiermem cluster` again)") from None
        print(f"warning: {e}; clustering again", file=sys.stderr)
        return None
    # memory-mapped: a billion documents' paths are 32 GB; training reads its documents' leaves, once
    return Clustering(tree, np.load(folder / "doc_paths.npy", mmap_mode="r"), data.path / meta["embeddings"], meta)


def read_clustering_report(path: Path) -> dict:
    """cluster.json, its report_crc32 (in "checksums", so the file is the report cluster() returns) checked."""
    meta = read_json(path, "clustering report")
    if not isinstance(meta, dict) or "routing" not in meta or "embeddings" not in meta:
        raise HiermemError(f"{path}: corrupted clustering report (no routing or embeddings)")
    checksums = meta.get("checksums")
    want = checksums.get("report_crc32") if isinstance(checksums, dict) else None
    if want is not None and want != _report_crc(meta):
        raise HiermemError(f"{path}: corrupted clustering report (checksum mismatch)")
    return meta


def _report_crc(report: dict) -> int:
    checksums = {k: v for k, v in report.get("checksums", {}).items() if k != "report_crc32"}
    return crc32_bytes(json.dumps({**report, "checksums": checksums}, sort_keys=True).encode())


def _previous_files(folder: Path) -> dict:
    """The file checksums of the clustering being replaced (none if it is unreadable)."""
    try:
        return read_clustering_report(folder / "cluster.json").get("checksums", {}).get("files", {})
    except (HiermemError, AttributeError):
        return {}


def _drop_damaged_cache(data: DataDir, previous: dict) -> None:
    """An embedding cache that no longer matches the checksum the last clustering recorded is removed (with a
    warning), so that embed_corpus builds it again rather than trusting it."""
    for rel, entry in previous.items():
        path = data.path / rel
        if rel.startswith("embeddings/") and path.is_file():
            try:
                check_file(path, "embedding cache", entry=entry)
            except HiermemError as e:
                print(f"warning: {e}; embedding again", file=sys.stderr)
                path.unlink()


def reused_tree(cfg: Config) -> Tree:
    """The tree routing.tree_from names (a run's tree.npz or a data directory's cluster/tree.npz), refused unless
    it has the config's depth and branching and was made by the same encoder settings."""
    src, r = Path(cfg.routing.tree_from), cfg.routing
    if (src / "tree.npz").is_file() and (src / "config.yaml").is_file():  # a run directory
        path, theirs = src / "tree.npz", routing_key(read_config(src / "config.yaml"))
    elif (src / "cluster" / "cluster.json").is_file():  # a clustered data directory
        path = src / "cluster" / "tree.npz"
        theirs = json.loads((src / "cluster" / "cluster.json").read_text())["routing"]
    else:
        raise HiermemError(f"routing.tree_from: {src} holds no tree (neither a run's tree.npz nor a data "
                           "directory's cluster/tree.npz)")
    tree = Tree.load(path)
    for name, have in (("depth", tree.depth), ("branching", tree.branching)):
        if have != getattr(r, name):
            raise HiermemError(f"{path}: a tree of {name} {have}, the config has routing.{name}={getattr(r, name)}")
    ours = routing_key(cfg)
    for key in ("encoder", "max_tokens", "long_docs"):  # what the centroids' embedding space depends on
        if theirs.get(key) != ours[key]:
            raise HiermemError(f"{path}: made with routing.{key}={theirs.get(key)!r}, the config has {ours[key]!r}")
    return tree


def embedder_for(cfg: Config):
    """The routing encoder, on train.device (auto = CUDA when present: MiniLM in fp16, routing.embed_batch a batch)."""
    r = cfg.routing
    return make_embedder(r.encoder, r.max_tokens, r.long_docs, device=cfg.train.device, cuda_batch=r.embed_batch)


def doc_heads(texts: list[str], head_words: int) -> list[str]:
    return [" ".join(t.split()[:head_words]) for t in texts]


def fit_sample(is_val: np.ndarray, fit_docs: int, seed: int, chunk: int) -> np.ndarray:
    """Sorted ids of the training documents the tree is fitted on: all of them when there are at most
    `fit_docs`; else the `fit_docs` whose seeded uniform random keys are smallest (a uniform sample without
    replacement), chosen `chunk` documents at a time so that at most fit_docs + chunk keys are held. The
    keys are drawn in document order from one stream, so the sample does not depend on `chunk`."""
    if len(is_val) - np.count_nonzero(is_val) <= fit_docs:
        return np.flatnonzero(~is_val)
    rng = np.random.default_rng(seed)
    ids, keys = np.empty(0, dtype=np.int64), np.empty(0)
    for a in range(0, len(is_val), chunk):
        new = np.flatnonzero(~is_val[a : a + chunk]) + a
        ids, keys = np.concatenate([ids, new]), np.concatenate([keys, rng.random(len(new))])
        if len(ids) > fit_docs:
            keep = np.argpartition(keys, fit_docs - 1)[:fit_docs]
            ids, keys = ids[keep], keys[keep]
    return np.sort(ids)


def route_all(tree: Tree, emb: np.ndarray, is_val: np.ndarray, path: Path, chunk: int,
              progress: bool = True) -> list[np.ndarray]:
    """Route every row of `emb` down the tree, `chunk` rows at a time, into a memory-mapped int64
    [n_docs, depth] .npy at `path` (published atomically). Returns the number of training documents per
    node, one array per level (the final cluster sizes)."""
    from tqdm.auto import tqdm

    sizes = [np.zeros(tree.n_nodes(l), dtype=np.int64) for l in range(tree.depth)]
    with atomic_path(path) as tmp, tqdm(total=len(emb), disable=not progress, desc="route", unit="doc",
                                        dynamic_ncols=True) as bar:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(len(emb), tree.depth))
        for a in range(0, len(emb), chunk):
            paths = tree.route(emb[a : a + chunk])
            out[a : a + len(paths)] = paths
            for total, part in zip(sizes, cluster_sizes(paths[~is_val[a : a + chunk]], tree)):
                total += part
            bar.update(len(paths))
        out.flush()
        del out
    return sizes


def _agreement(cfg: Config, data: DataDir, embedder, tree: Tree, emb: np.ndarray, doc_paths: np.ndarray,
               fit_idx: np.ndarray, head_words: int) -> dict:
    """Routing agreement of document heads (a shorter, different text) with the documents' leaves."""
    r = cfg.routing
    order = np.random.default_rng(r.seed).permutation(fit_idx)
    heads, index = order[:AGREEMENT_QUERIES], np.sort(order[:AGREEMENT_INDEX_DOCS])  # heads are in the index
    head_emb = embedder.encode(doc_heads(data.texts_at(heads), head_words))
    routers = {"centroid": make_router("centroid", tree),
               "knn": make_router("knn", tree, doc_emb=emb[index], doc_paths=doc_paths[index], k=r.knn_k)}
    return {"query": f"first {head_words} words of {len(heads)} training documents",
            "index": f"the knn router votes among {len(index)} training documents (at most {AGREEMENT_INDEX_DOCS})",
            **{name: routing_agreement(router, head_emb, doc_paths[heads, -1]) for name, router in routers.items()}}


def cluster(cfg: Config, data: DataDir, head_words: int = 8, progress: bool = True) -> dict:
    with DirLock(data.path, "cluster"):  # one writer per data directory (prepare or cluster)
        return _cluster(cfg, data, head_words, progress)


def _cluster(cfg: Config, data: DataDir, head_words: int, progress: bool) -> dict:
    r = cfg.routing
    folder = data.path / "cluster"
    previous = _previous_files(folder)
    reused = reused_tree(cfg) if r.tree_from else None  # refused before anything is computed or removed
    # cluster.json is written last: without it, a half-replaced folder is never taken for a finished clustering
    (folder / "cluster.json").unlink(missing_ok=True)
    embedder = embedder_for(cfg)
    _drop_damaged_cache(data, previous)
    emb_file = embed_corpus(embedder, data.iter_texts, data.n_docs, data.fingerprint(), data.path / "embeddings",
                            chunk=r.chunk_docs, progress=progress)
    emb = np.load(emb_file, mmap_mode="r")
    is_val = data.is_val()
    fit_idx = fit_sample(is_val, r.fit_docs, r.seed, r.chunk_docs)  # with tree_from: the report's sample only
    if reused is not None:
        if reused.dim != emb.shape[1]:
            raise HiermemError(f"routing.tree_from: {r.tree_from} has centroids of dimension {reused.dim}, the "
                               f"encoder's embeddings have {emb.shape[1]}")
        tree = reused
    else:
        tree = fit_tree(emb[fit_idx], depth=r.depth, branching=r.branching, seed=r.seed, steps=r.kmeans_steps,
                        sample=r.kmeans_sample, balance=r.balance, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    tree.save(folder / "tree.npz")
    sizes = route_all(tree, emb, is_val, folder / "doc_paths.npy", r.chunk_docs, progress)
    size_report = [{"level": l + 1, "nodes": int(len(s)), "non_empty": int((s > 0).sum()), "min": int(s.min()),
                    "median": float(np.median(s)), "max": int(s.max())} for l, s in enumerate(sizes)]
    doc_paths = np.load(folder / "doc_paths.npy", mmap_mode="r")
    report = {"routing": routing_key(cfg), "tree_fingerprint": tree.fingerprint(), "encoder": embedder.name,
              "embeddings": str(emb_file.relative_to(data.path)), "n_docs": data.n_docs, "fit_docs": len(fit_idx),
              "tree_from": r.tree_from or None,
              "sizes": size_report,
              "agreement": _agreement(cfg, data, embedder, tree, emb, doc_paths, fit_idx, head_words)}
    files = {"tree.npz": entry_of(folder / "tree.npz"), "doc_paths.npy": entry_of(folder / "doc_paths.npy"),
             report["embeddings"]: entry_of(emb_file)}  # what load_clustering and hiermem verify check
    report["checksums"] = {"files": files}
    report["checksums"]["report_crc32"] = _report_crc(report)
    atomic_write_json(folder / "cluster.json", report)
    return report


def ensure_clustered(cfg: Config, data: DataDir, progress: bool = True) -> Clustering:
    existing = load_clustering(data, cfg, required=False)
    if existing is None:
        cluster(cfg, data, progress=progress)
        existing = load_clustering(data, cfg, required=True)
    return existing


def format_report(report: dict) -> str:
    fitted = (f"tree reused from {report['tree_from']}" if report.get("tree_from")
              else f"tree fitted on {report['fit_docs']} training documents")
    lines = [f"{fitted}; the sizes count every training document (routed after the fit, so a cluster may exceed "
             "the balance cap):",
             "level  nodes  non-empty  min  median  max"]
    for s in report["sizes"]:
        lines.append(f"{s['level']:>5}  {s['nodes']:>5}  {s['non_empty']:>9}  {s['min']:>3}  {s['median']:>6.1f}  {s['max']:>3}")
    a = report["agreement"]
    lines.append(f"routing agreement ({a['query']} -> the document's leaf; {a['index']}):")
    for name in ("centroid", "knn"):
        per_level = ", ".join(f"{x:.2f}" for x in a[name]["levels"])
        lines.append(f"  {name:<8} leaf {a[name]['leaf']:.3f}   per level [{per_level}]")
    return "\n".join(lines)
