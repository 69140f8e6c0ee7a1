"""Unlearning by block on the long-tail demo: reset one leaf's memory and see which facts go with it.

On a finished demo output folder (`hiermem demo`): the population probes of the seen cities are routed by the
knn router and answered by the memory run with the fetched memory (the report's fetched_knn row). The leaf the
most correctly answered cities are routed to is reset (`hiermem bank reset --leaf`, in a COPY of the memory run
under <out>/unlearn/: the demo's own runs are never modified) and the same probes, on the same paths, are
answered again. Accuracy before and after, per group:
  leaf         the seen cities routed to the reset leaf
  siblings     the seen cities routed to the other leaves under the same level-0 node (their parent block stays)
  other leaves the seen cities routed to any other leaf (siblings included)
  unseen       the never-seen cities (the guessing control)
Writes <out>/unlearn/{report.json, report.txt}. Run: `python -m hiermem_experiments.longtail.unlearn OUT`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from hiermem.config import read_config
from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_write_json, atomic_write_text
from hiermem_experiments.longtail.corpus import load_corpus
from hiermem_experiments.longtail.demo import DemoSpec, _entity_leaves, _probe_sets, _route_all, _routers

GROUPS = ("leaf", "siblings", "other leaves", "unseen")


def _answers(run, records: list[dict], paths: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Whether the run, fetching each record's given path, answers it correctly (the demo's greedy probe)."""
    from hiermem.eval.evaluate import probe_predictor
    from hiermem.eval.inference import MemoryContext
    from hiermem.eval.probes import evaluate_probes

    ctx = MemoryContext(run, "fetched", "knn")
    by_idx = {r["_idx"]: p for r, p in zip(records, paths)}
    predict = probe_predictor(run, ctx, max_new_tokens, paths_for=lambda recs: np.stack([by_idx[r["_idx"]]
                                                                                          for r in recs]))
    return np.array([p["correct"] for p in evaluate_probes(records, predict, progress=False)["predictions"]])


def _demo(out: Path) -> tuple[Path, DemoSpec]:
    memory_cfg, spec_file = out / "configs" / "memory.yaml", out / "spec.json"
    if not memory_cfg.is_file() or not spec_file.is_file():
        raise HiermemError(f"{out}: not a demo output folder (no configs/memory.yaml or spec.json)")
    run_dir = read_config(memory_cfg).run_dir
    if not (run_dir / "train_summary.json").is_file():
        raise HiermemError(f"{run_dir}: the demo's memory run is not finished (no train_summary.json)")
    fields = json.loads(spec_file.read_text())
    return run_dir, DemoSpec(**{k: v for k, v in fields.items() if k != "corpus"})


def unlearn(out: str | Path) -> dict:
    """Measure (see the module docstring); returns the report."""
    from hiermem.cli import bank_reset
    from hiermem.eval.run import Run

    out = Path(out)
    run_dir, spec = _demo(out)
    corpus = load_corpus(out / "corpus")
    probes = _probe_sets(corpus)["population"]
    run = Run(run_dir, device="cpu")
    paths = _route_all(_routers(run), [p["prompt"] for p in probes])["knn"]
    seen = np.array([p["entity"] in _entity_leaves(out, corpus, run.clustering()) for p in probes])
    before = _answers(run, probes, paths, spec.max_new_tokens)

    leaves = paths[:, -1]
    counts = np.bincount(leaves[seen & before], minlength=run.tree.n_nodes(run.tree.depth - 1))
    if not counts.any():
        raise HiermemError(f"{run_dir}: the fetched (knn) model answers no seen city's population probe")
    leaf = int(np.argmax(counts))  # ties: the lowest leaf id
    parent = paths[leaves == leaf][0, 0]
    groups = {"leaf": seen & (leaves == leaf), "siblings": seen & (leaves != leaf) & (paths[:, 0] == parent),
              "other leaves": seen & (leaves != leaf), "unseen": ~seen}

    copy = out / "unlearn" / "memory_reset"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    edit = bank_reset(str(copy), leaf=leaf)
    after = _answers(Run(copy, device="cpu"), probes, paths, spec.max_new_tokens)

    rows = {g: {"n": int(m.sum()), "before": float(before[m].mean() * 100) if m.any() else 0.0,
                "after": float(after[m].mean() * 100) if m.any() else 0.0} for g, m in groups.items()}
    report = {"memory_run": str(run_dir), "copy": str(copy), "leaf": leaf, "level0_parent": int(parent),
              "router": "knn", "edit": edit, "groups": rows,
              "cities_in_leaf": [p["entity"] for p, m in zip(probes, groups["leaf"]) if m]}
    atomic_write_json(out / "unlearn" / "report.json", report)
    atomic_write_text(out / "unlearn" / "report.txt", format_report(report) + "\n")
    return report


def format_report(report: dict) -> str:
    lines = [f"reset leaf {report['leaf']} (level-0 parent {report['level0_parent']}) of a copy of "
             f"{report['memory_run']}; population probes, knn-routed, exact match %",
             f"{'group':<14}{'cities':>8}{'before':>9}{'after':>9}"]
    for g in GROUPS:
        r = report["groups"][g]
        lines.append(f"{g:<14}{r['n']:>8}{r['before']:>9.1f}{r['after']:>9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hiermem_experiments.longtail.unlearn",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("out", help="a finished `hiermem demo` output folder")
    args = ap.parse_args(argv)
    try:
        report = unlearn(args.out)
    except HiermemError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(format_report(report))
    print(f"\nwrote {Path(args.out) / 'unlearn' / 'report.json'}, {Path(args.out) / 'unlearn' / 'report.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
