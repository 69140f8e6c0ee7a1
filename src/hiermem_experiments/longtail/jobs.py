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
from hiermem.errors import HiermemError, last_line
from hiermem.io_utils import atomic_write_json

if TYPE_CHECKING:
    from hiermem_experiments.longtail.demo import DemoSpec

def trainings(spec: DemoSpec) -> tuple[str, ...]:
    """The spec's trainings: anchor_staged (a control costing two anchor epochs) only when it asks for it."""
    return ("anchor", "phase1", *(("anchor_staged",) if spec.staged_control else ()), "memory", "dense2x")


def evals(spec: DemoSpec) -> dict[str, str]:
    """Evaluation job -> the training it evaluates (phase1 is a stage, not a model of the report)."""
    return {f"eval_{n}": n for n in trainings(spec) if n != "phase1"}


def depends(spec: DemoSpec) -> dict[str, list[str]]:
    """Every job of the spec -> the jobs it waits for."""
    after = {"memory": ["phase1", "cluster"], "anchor_staged": ["phase1"]}
    evals_after = {"eval_anchor": ["cluster"]}  # its "rag" row retrieves from the data dir's knn index (rag_rows.py)
    return {"cluster": [], **{n: after.get(n, []) for n in trainings(spec)},
            **{e: [n, *evals_after.get(e, [])] for e, n in evals(spec).items()}}


def job_costs(spec: DemoSpec) -> dict[str, float]:
    """Relative CPU cost of each job (1 = one anchor epoch, measured: docs/results/demo_report.json job_cpu_s),
    for scheduling and the progress bar."""
    p2 = spec.epochs - spec.phase1_epochs
    cost = {"cluster": 0.8, "anchor": spec.epochs, "phase1": spec.phase1_epochs, "anchor_staged": p2,
            "memory": 1.15 * p2, "dense2x": 1.5 * spec.epochs, "eval_anchor": 0.15, "eval_anchor_staged": 0.15,
            "eval_dense2x": 0.2, "eval_memory": 0.85}
    return {n: cost[n] for n in depends(spec)}


def job_entry(name: str, out: str) -> int:
    """A worker's exit code: 0, or a HiermemError's, its message printed as the command line prints it (the
    scheduler reports the log's last line; a stop by SIGTERM is 143, not a traceback)."""
    from hiermem.cli import print_error

    try:
        _job_main(name, out)
    except HiermemError as e:
        return print_error(e)
    return 0


def _job_main(name: str, out: str) -> None:
    """Entry point of a worker process (one thread): the clustering stage, a training or an evaluation."""
    import torch

    torch.set_num_threads(1)
    out_path = Path(out)
    spec_fields = json.loads((out_path / "spec.json").read_text())
    configs = {p.stem: read_config(p) for p in sorted((out_path / "configs").glob("*.yaml"))}
    if name == "cluster":
        from hiermem.data.prepare import DataDir
        from hiermem.routing.clustering import ensure_clustered

        ensure_clustered(configs["memory"], DataDir(configs["memory"].data_dir), progress=False)
    elif name.startswith("eval_"):
        from hiermem_experiments.longtail.demo import DemoSpec, evaluate_job

        spec = DemoSpec(**{k: v for k, v in spec_fields.items() if k != "corpus"})
        run = name.removeprefix("eval_")
        result = evaluate_job(run, configs, out_path, spec)
        result["run_config"] = to_dict(configs[run])
        atomic_write_json(out_path / "eval" / f"{run}.json", result)
    else:
        from hiermem.train.loop import train

        train(configs[name], progress=False)


def _done(name: str, configs: dict[str, Config], out: Path) -> bool:
    if name == "cluster":
        from hiermem.data.prepare import DataDir
        from hiermem.routing.clustering import load_clustering

        cfg = configs["memory"]
        return load_clustering(DataDir(cfg.data_dir), cfg, required=False) is not None
    if name.startswith("eval_"):
        run = name.removeprefix("eval_")
        path = out / "eval" / f"{run}.json"
        summary = configs[run].run_dir / "train_summary.json"
        return (path.is_file() and summary.is_file() and path.stat().st_mtime >= summary.stat().st_mtime
                and json.loads(path.read_text()).get("run_config") == to_dict(configs[run]))
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


def _reap(proc: subprocess.Popen) -> float | None:
    """CPU seconds (user + system) of a finished child, None while it runs; sets its returncode."""
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def run_jobs(configs: dict[str, Config], out: Path, spec: DemoSpec, jobs: int,
             progress: bool, only: set[str] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Run clustering, trainings and evaluations as subprocesses, dependencies first, critical path first.
    A training whose run directory is stale (another config) is retrained from scratch. `only`: run just these
    jobs; another job one of them waits for must be done already. Returns each job's wall seconds and CPU
    seconds (0 for cached jobs)."""
    (out / "configs").mkdir(parents=True, exist_ok=True)
    for old in (out / "configs").glob("*.yaml"):  # a training the spec no longer has (e.g. anchor_staged)
        if old.stem not in configs:
            old.unlink()
    for name, cfg in configs.items():
        save_config(cfg, out / "configs" / f"{name}.yaml")
    spec_dict = dataclasses.asdict(spec)
    atomic_write_json(out / "spec.json", json.loads(json.dumps(spec_dict, default=list)))
    graph = depends(spec)
    done = {n for n in graph if _done(n, configs, out)}
    if only is not None:
        missing = sorted({d for n in only for d in graph[n] if d not in only and d not in done})
        if missing:
            raise HiermemError(f"demo: {out}: not clustered yet ({', '.join(missing)}): run `hiermem demo "
                               f"--stage data` with this --out first, where the encoder is")
        graph = {n: [d for d in graph[n] if d in only] for n in graph if n in only}
        done &= set(graph)
    for n in trainings(spec):
        if n in graph and n not in done and configs[n].run_dir.exists():
            shutil.rmtree(configs[n].run_dir)  # stale or interrupted: start it again

    def command(n: str) -> str:
        return (f"import sys; from hiermem_experiments.longtail.jobs import job_entry; "
                f"sys.exit(job_entry({n!r}, {str(out)!r}))")

    cost = {n: c for n, c in job_costs(spec).items() if n in graph}
    return schedule(graph, cost, done, command, lambda n: _progress(n, configs), out / "logs", jobs,
                    progress, "demo jobs")


def schedule(graph: dict[str, list[str]], cost: dict[str, float], done: set[str], command, progress_of,
             logs: Path, jobs: int, progress: bool, desc: str) -> tuple[dict[str, float], dict[str, float]]:
    """Run every job of `graph` (job -> the jobs it waits for) not in `done` as a one-thread subprocess
    executing `command(name)` (Python source), at most `jobs` at a time, the longest remaining chain first.
    The first failure stops the others and raises its log's last line. Returns wall and CPU seconds per job
    (0 for jobs already done)."""
    logs.mkdir(parents=True, exist_ok=True)
    names = list(graph)
    done = set(done)
    wall = {n: 0.0 for n in done}
    cpu = dict(wall)

    def chain(n: str) -> float:  # longest remaining path from n: schedule the critical path first
        return cost[n] + max((chain(m) for m in names if n in graph[m]), default=0.0)

    running: dict[str, tuple[subprocess.Popen, float]] = {}
    bar = tqdm(total=round(sum(cost.values()), 1), desc=desc, unit="unit", disable=not progress,
               dynamic_ncols=True, mininterval=2.0,
               bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} [{elapsed}<{remaining}] {postfix}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    while len(done) < len(names):
        ready = [n for n in names if n not in done and n not in running and all(d in done for d in graph[n])]
        ready.sort(key=chain, reverse=True)
        while ready and len(running) < jobs:
            n = ready.pop(0)
            with open(logs / f"{n}.log", "w") as log:  # the child keeps its own copy of the file
                running[n] = (subprocess.Popen([sys.executable, "-c", command(n)], stdout=log,
                                               stderr=subprocess.STDOUT, env=env), time.perf_counter())
        time.sleep(0.5)
        for n, (proc, t0) in list(running.items()):
            used = _reap(proc)
            if used is None:
                continue
            del running[n]
            if proc.returncode != 0:
                for other, _ in running.values():
                    other.kill()
                log = logs / f"{n}.log"
                raise HiermemError(f"{desc.split()[0]} job {n} failed (log: {log}): {last_line(log)}")
            done.add(n)
            wall[n], cpu[n] = time.perf_counter() - t0, used
        bar.n = round(sum(cost[n] for n in done) + sum(cost[n] * progress_of(n) for n in running), 1)
        bar.set_postfix_str("running: " + ", ".join(running) if running else "")
        bar.refresh()
    bar.close()
    return wall, cpu
