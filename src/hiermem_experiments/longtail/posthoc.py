"""The post-hoc result: memories added to the quick demo's anchor through transformers, next to the native run.

    python -m hiermem_experiments.longtail.posthoc --out runs/posthoc [--demo runs/demo-quick]

The claim checked: adding memories post hoc (`model.hf=CHECKPOINT train.mode=frozen`) to an exported anchor is
the native frozen-mode run, not an approximation of it. Steps, each cached in OUT (or DEMO):
  1. the quick demo (`hiermem demo --quick --out DEMO`), run only when DEMO holds no report: its corpus, data,
     clustering, trained anchor and the anchor's evaluation (the frozen base alone)
  2. `hiermem export DEMO/runs/anchor OUT/export` (export_run)
  3. two trainings of the demo's memory run's shape, memory LRs, phase-2 schedule, seed and data, the base frozen:
     native   train.mode=frozen train.init_from=DEMO/runs/anchor
     posthoc  model.hf=OUT/export train.mode=frozen
  4. both evaluated by the demo's own evaluate_job (rows memory_off, generic, fetched_{centroid,knn,oracle})
  5. report.json + report.txt: population accuracy by bucket, the accuracy gaps against one binomial standard
     error, and the largest gap between the two loss curves (same steps)
Trainings and evaluations run as two single-thread processes side by side (as the demo's jobs do).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from hiermem.config import Config, from_dict, read_config, save_config, to_dict
from hiermem.io_utils import atomic_write_json, atomic_write_text
from hiermem_experiments.longtail.demo import default_out, job_configs, load_spec, run_demo
from hiermem_experiments.longtail.jobs import _done

PRESET = "demo-quick"
PATHS = ("native", "posthoc")
REPORT_ROWS = {  # report row -> (source, row of its evaluation)
    "frozen base (anchor)": ("anchor", "anchor"),
    "posthoc, memory off": ("posthoc", "memory_off"),
    "native + fetched knn": ("native", "fetched_knn"),
    "posthoc + fetched knn": ("posthoc", "fetched_knn"),
    "native + oracle leaf": ("native", "fetched_oracle"),
    "posthoc + oracle leaf": ("posthoc", "fetched_oracle"),
    "demo cotrain + knn": ("demo", "fetched_knn"),
}


def path_configs(demo: Path, out: Path) -> dict[str, Config]:
    """The two trainings: the demo's memory run with the base frozen, natively and through transformers."""
    from hiermem.model.hf.causal_lm import checkpoint_shape

    memory = to_dict(job_configs(load_spec(PRESET), demo)["memory"])
    configs = {}
    for name in PATHS:
        d = json.loads(json.dumps(memory))
        d["name"] = f"posthoc_{name}"
        d["train"].update(mode="frozen", run_dir=str(out / "runs" / name),
                          init_from=str(demo / "runs" / "anchor") if name == "native" else "")
        if name == "posthoc":
            d["model"]["hf"] = str(out / "export")
        configs[name] = from_dict(d)
    # the checkpoint's shape up front (the trainer would apply it anyway): the saved config then matches,
    # so a finished run is reused, and the two configs differ in model.hf and train.init_from only
    configs["posthoc"].model = checkpoint_shape(configs["posthoc"].model)[0]
    configs["posthoc"].model.vocab_size = configs["native"].model.vocab_size = configs["posthoc"].model.vocab_size
    return configs


def _job(name: str, out: str, demo: str) -> None:
    """A worker process (one thread): `train_<path>` or `eval_<path>`, configs read from OUT/configs."""
    import torch

    torch.set_num_threads(1)
    kind, path = name.split("_", 1)
    cfg = read_config(Path(out) / "configs" / f"{path}.yaml")
    if kind == "train":
        from hiermem.train.loop import train

        train(cfg, progress=False)
        return
    from hiermem_experiments.longtail.demo import evaluate_job

    result = evaluate_job("memory", {"memory": cfg}, Path(demo), load_spec(PRESET))
    result["run_config"] = to_dict(cfg)
    atomic_write_json(Path(out) / "eval" / f"{path}.json", result)


def _run_parallel(names: list[str], out: Path, demo: Path) -> None:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch thread pool inherited
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        for f in [pool.submit(_job, n, str(out), str(demo)) for n in names]:
            f.result()


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def _export(demo: Path, out: Path) -> None:
    """The demo's anchor as a transformers checkpoint; redone when the anchor was retrained since."""
    import shutil

    from hiermem.hf.export import EXPORT_DIR, export_run

    meta, summary = out / "export" / EXPORT_DIR / "export.json", demo / "runs" / "anchor" / "train_summary.json"
    if meta.is_file() and meta.stat().st_mtime >= summary.stat().st_mtime:
        return
    shutil.rmtree(out / "export", ignore_errors=True)
    export_run(demo / "runs" / "anchor", out / "export")


def build_report(demo: Path, out: Path, configs: dict[str, Config], wall_s: float) -> dict:
    demo_report = json.loads((demo / "report.json").read_text())
    evals = {p: json.loads((out / "eval" / f"{p}.json").read_text())["rows"] for p in PATHS}
    source = {"anchor": demo_report["models"], "demo": demo_report["models"], **evals}
    rows = {label: source[src]["anchor" if src == "anchor" else row] for label, (src, row) in REPORT_ROWS.items()}
    n_probes = sum(demo_report["bucket_entities"])
    gaps = {}
    for row in ("memory_off", "fetched_knn", "fetched_oracle"):
        a, b = evals["native"][row]["overall"], evals["posthoc"][row]["overall"]
        p = (a + b) / 200
        gaps[row] = {"native": a, "posthoc": b, "gap": b - a,
                     "stderr": 100 * math.sqrt(max(p * (1 - p), 1e-12) / n_probes)}
    curves = {p: _losses(configs[p].run_dir) for p in PATHS}
    steps = sorted(curves["native"].keys() & curves["posthoc"].keys())
    diffs = [abs(curves["native"][s] - curves["posthoc"][s]) for s in steps]
    return {"buckets": demo_report["buckets"], "bucket_entities": demo_report["bucket_entities"],
            "n_population_probes": n_probes, "rows": rows, "path_gaps": gaps,
            "loss_curves": {"steps": steps, **{p: [curves[p][s] for s in steps] for p in PATHS},
                            "max_abs_diff": max(diffs), "final": {p: curves[p][steps[-1]] for p in PATHS}},
            "configs": {p: to_dict(c) for p, c in configs.items()}, "wall_time_s": round(wall_s, 1)}


def format_report(report: dict) -> str:
    b = report["buckets"]
    head = f"{'model':<24}" + "".join(f"{x:>8}" for x in b) + f"{'all':>8}{'ppl-wiki':>10}{'ppl-facts':>10}"
    lines = ["city -> population, exact match % by training mentions (rarest first); cities per bucket: "
             + ", ".join(f"{x} {n}" for x, n in zip(b, report["bucket_entities"])), head, "-" * len(head)]
    for name, m in report["rows"].items():
        lines.append(f"{name:<24}" + "".join(f"{x:>8.1f}" for x in m["accuracy"]) + f"{m['overall']:>8.1f}"
                     f"{m['perplexity_real_text']:>10.2f}{m['perplexity_facts']:>10.2f}")
    lines.append("")
    for row, g in report["path_gaps"].items():
        lines.append(f"{row}: posthoc - native = {g['gap']:+.1f} points (one binomial standard error "
                     f"{g['stderr']:.1f}, {report['n_population_probes']} probes)")
    c = report["loss_curves"]
    lines.append(f"loss curves: max |native - posthoc| = {c['max_abs_diff']:.2e} over {len(c['steps'])} logged steps; "
                 f"final loss native {c['final']['native']:.4f}, posthoc {c['final']['posthoc']:.4f}")
    lines.append(f"wall time {report['wall_time_s']:.0f}s")
    return "\n".join(lines)


def run_posthoc(out: str | Path, demo: str | Path | None = None) -> dict:
    t0 = time.perf_counter()
    out, demo = Path(out), Path(demo) if demo else default_out(PRESET)
    if not (demo / "report.json").is_file():
        run_demo(PRESET, out=str(demo), progress=False)
    _export(demo, out)
    configs = path_configs(demo, out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for name, cfg in configs.items():
        save_config(cfg, out / "configs" / f"{name}.yaml")
    _run_parallel([f"train_{p}" for p in PATHS if not _done(p, configs, out)], out, demo)
    _run_parallel([f"eval_{p}" for p in PATHS if not _done(f"eval_{p}", configs, out)], out, demo)
    report = build_report(demo, out, configs, time.perf_counter() - t0)
    atomic_write_json(out / "report.json", report)
    text = format_report(report)
    atomic_write_text(out / "report.txt", text + "\n")
    print(text)
    print(f"\nwrote {out / 'report.json'}, {out / 'report.txt'}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hiermem_experiments.longtail.posthoc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/posthoc", help="output folder (default: runs/posthoc)")
    parser.add_argument("--demo", help=f"the quick demo's output, made there if absent (default: {default_out(PRESET)})")
    args = parser.parse_args(argv)
    run_posthoc(args.out, args.demo)


if __name__ == "__main__":
    main()
