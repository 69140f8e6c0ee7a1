"""The demo's retrieval rows: the population probes with RAG over the knn index (hiermem/eval/rag.py).

  rag              the anchor run, each prompt preceded by its RAG_K nearest training documents (RAG alone)
  rag+fetched_knn  the memory run with knn-routed memory (routed on the prompt, as fetched_knn) + RAG

The anchor run retrieves from the clustering of the shared data directory (the memory run's). Only the
population accuracy by bucket is measured: perplexity is never retrieval-augmented, so the report shows "-".
Each row records the CPU seconds its probes took (rag_cpu_s), the demo's added cost.
"""

from __future__ import annotations

import time

import numpy as np

from hiermem_experiments.longtail.buckets import accuracy_by_bucket

RAG_K = 1
RAG_ROWS = {"rag": ("anchor", "none"), "rag+fetched_knn": ("memory", "fetched")}  # row -> (run, memory)


def evaluate_rag_rows(run_name: str, run, probes: list[dict], buckets: list[str], knn_paths: np.ndarray | None,
                      max_new_tokens: int) -> dict[str, dict]:
    """The RAG rows of one trained run (none for other runs). knn_paths: the probes' knn paths (memory run)."""
    from hiermem.eval.evaluate import probe_predictor
    from hiermem.eval.inference import MemoryContext
    from hiermem.eval.rag import make_rag

    rows = {}
    for row, (name, mode) in RAG_ROWS.items():
        if name != run_name:
            continue
        t0 = time.process_time()
        ctx = MemoryContext(run, mode, "knn")
        paths_for = (lambda recs: knn_paths[[r["_idx"] for r in recs]]) if mode == "fetched" else None
        predict = probe_predictor(run, ctx, max_new_tokens, paths_for=paths_for, rag=make_rag(run, ctx, RAG_K))
        accuracy, overall = accuracy_by_bucket(probes, predict, buckets)
        rows[row] = {"accuracy": accuracy, "overall": overall, "perplexity_real_text": None, "perplexity_facts": None,
                     "rag_k": RAG_K, "rag_cpu_s": round(time.process_time() - t0, 2)}
    return rows


def report_rows(results: dict[str, dict]) -> dict[str, dict]:
    """The RAG rows found in the evaluation results (run -> its eval JSON); an older cached one has none."""
    return {row: results[run]["rows"][row] for row, (run, _) in RAG_ROWS.items()
            if run in results and row in results[run]["rows"]}
