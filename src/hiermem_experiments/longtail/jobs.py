"""The demo's job graph and scheduler: clustering, trainings and evaluations as single-thread subprocesses.

Two single-thread jobs side by side beat two-thread jobs in sequence on a 2-core machine (docs/method.md §9,
lesson 6). Every stage is cached in the output folder: a training whose run directory holds another config
(or an unfinished run) is retrained from scratch; an evaluation is redone when its run changed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from tqdm import tqdm

from hiermem.config import Config, read_config, resolve_paths, save_config, to_dict
from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_write_json

if TYPE_CHECKING:
    from hiermem_experiments.longtail.demo import DemoSpec

TRAININGS = ("anchor", "phase1", "anchor_staged", "memory", "dense2x")
EVALS = {f"eval_{n}": n for n in ("anchor", "anchor_staged", "memory", "dense2x")}
DEPENDS = {"anchor": [], "phase1": [], "cluster": [], "dense2x": [], "anchor_staged": ["phase1"],
           "memory": ["phase1", "cluster"], **{e: [n] for e, n in EVALS.items()}}


def job_costs(spec: DemoSpec) -> dict[str, float]:
    """Relative cost of each job (1 = one anchor epoch) for scheduling and the progress bar."""
    p2 = spec.epochs - spec.phase1_epochs
    return {"cluster": 1.0, "anchor": spec.epochs, "phase1": spec.phase1_epochs, "anchor_staged": p2,
            "memory": 1.25 * p2, "dense2x": 2.2 * spec.epochs, "eval_anchor": 0.3, "eval_anchor_staged": 0.3,
            "eval_dense2x": 0.5, "eval_memory": 1.5}


def _job_main(name: str, out: str) -> None:
    """Entry point of a worker process (one thread): the clustering stage, a training or an evaluation."""
    import torch

    torch.set_num_threads(1)
    out_path = Path(out)
    configs = {n: read_config(out_path / "configs" / f"{n}.yaml") for n in TRAININGS}
    if name == "cluster":
        from hiermem.data.prepare import DataDir
        from hiermem.routing.clustering import ensure_clustered

        ensure_clustered(configs["memory"], DataDir(configs["memory"].data_dir), progress=False)
    elif name in EVALS:
        from hiermem_experiments.longtail.demo import DemoSpec, evaluate_job

        spec = DemoSpec(**{k: v for k, v in json.loads((out_path / "spec.json").read_text()).items()
                           if k != "corpus"})
        result = evaluate_job(EVALS[name], configs, out_path, spec)
        result["run_config"] = to_dict(configs[EVALS[name]])
        atomic_write_json(out_path / "eval" / f"{EVALS[name]}.json", result)
    else:
        from hiermem.train.loop import train

        train(configs[name], progress=False)


def _done(name: str, configs: dict[str, Config], out: Path) -> bool:
    if name == "cluster":
        from hiermem.data.prepare import DataDir
        from hiermem.routing.clustering import load_clustering

        cfg = configs["memory"]
        return load_clustering(DataDir(cfg.data_dir), cfg, required=False) is not None
    if name in EVALS:
        path = out / "eval" / f"{EVALS[name]}.json"
        summary = configs[EVALS[name]].run_dir / "train_summary.json"
        return (path.is_file() and summary.is_file() and path.stat().st_mtime >= summary.stat().st_mtime
                and json.loads(path.read_text()).get("run_config") == to_dict(configs[EVALS[name]]))
    cfg = configs[name]
    if not (cfg.run_dir / "train_summary.json").is_file():
        return False
    # the trainer saves its config with absolute paths: compare like with like
    return yaml.safe_load((cfg.run_dir / "config.yaml").read_text()) == to_dict(resolve_paths(cfg))


def _progress(name: str, configs: dict[str, Config]) -> float:
    """Fraction done of a running training, read from its metrics.jsonl."""
    if name not in configs:
        return 0.0
    path = configs[name].run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    if not lines:
        return 0.0
    last = json.loads(lines[-1])
    return min(1.0, last["step"] / max(1, last.get("total_steps", last["step"])))


def run_jobs(configs: dict[str, Config], out: Path, spec: DemoSpec, jobs: int, progress: bool) -> dict[str, float]:
    """Run clustering, trainings and evaluations as subprocesses, dependencies first, critical path first.
    A training whose run directory is stale (another config) is retrained from scratch."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for name, cfg in configs.items():
        save_config(cfg, out / "configs" / f"{name}.yaml")
    spec_dict = dataclasses.asdict(spec)
    atomic_write_json(out / "spec.json", json.loads(json.dumps(spec_dict, default=list)))
    cost = job_costs(spec)
    names = list(DEPENDS)
    done = {n for n in names if _done(n, configs, out)}
    for n in TRAININGS:
        if n not in done and configs[n].run_dir.exists():
            shutil.rmtree(configs[n].run_dir)  # stale or interrupted: start it again
    wall = {n: 0.0 for n in done}

    def chain(n: str) -> float:  # longest remaining path from n: schedule the critical path first
        return cost[n] + max((chain(m) for m in names if n in DEPENDS[m]), default=0.0)

    running: dict[str, tuple[subprocess.Popen, float]] = {}
    bar = tqdm(total=round(sum(cost.values()), 1), desc="demo jobs", unit="unit", disable=not progress,
               dynamic_ncols=True, mininterval=2.0,
               bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} [{elapsed}<{remaining}] {postfix}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    while len(done) < len(names):
        ready = [n for n in names if n not in done and n not in running and all(d in done for d in DEPENDS[n])]
        ready.sort(key=chain, reverse=True)
        while ready and len(running) < jobs:
            n = ready.pop(0)
            code = f"from hiermem_experiments.longtail.jobs import _job_main; _job_main({n!r}, {str(out)!r})"
            with open(logs / f"{n}.log", "w") as log:  # the child keeps its own copy of the file
                running[n] = (subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT,
                                               env=env), time.perf_counter())
        time.sleep(0.5)
        for n, (proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[n]
            if proc.returncode != 0:
                for other, _ in running.values():
                    other.kill()
                lines = (logs / f"{n}.log").read_text().strip().splitlines() or ["(no output)"]
                raise HiermemError(f"demo job {n} failed (log: {logs / (n + '.log')}): {lines[-1]}")
            done.add(n)
            wall[n] = time.perf_counter() - t0
        bar.n = round(sum(cost[n] for n in done) + sum(cost[n] * _progress(n, configs) for n in running), 1)
        bar.set_postfix_str("running: " + ", ".join(running) if running else "")
        bar.refresh()
    bar.close()
    return wall
