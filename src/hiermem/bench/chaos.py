"""`hiermem bench --suite chaos`: `hiermem train` SIGKILLed at random instants and resumed, until it finishes; the
result must be bitwise the uninterrupted run's.

A tiny data dir and tree are built once. Per mode (anchor; memory with the bank on disk, memory.mmap=true, behind
a cache small enough to evict, so blocks are written back between and inside checkpoints) an uninterrupted
reference run gives the expected wall time T. Each trial then starts `hiermem train` as a subprocess and kills
it; every next launch is the same command with --resume (or without, while the run has not yet written its
config.yaml: before that there is nothing on disk to resume), until one finishes. Launches rotate over three
ways of killing: SIGKILL at a uniform instant in [0, T]; a crash point armed through HIERMEM_TEST_CRASH
(memory/files.py: inside the bank's write-back, before state.json, before the bank's manifest); SIGKILL as soon
as a checkpoint's temp file or uncommitted generation shows on disk. Whether a kill landed inside a checkpoint
is read from the disk after it (inside_checkpoint), or known for an armed crash point. A finished trial passes
when the per-step losses, gradient norms, learning rates and token counts of metrics.jsonl equal the
reference's, each step exactly once, the final anchor, its AdamW state, every bank block's weights and moments
and the bank's step counts are bitwise equal, and every file of the run reads back. Writes <out>/chaos.json and
prints a table.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from hiermem.bench.table import print_rows

SHAPE = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.head_dim=16", "model.d_ff=128",
         "model.max_seq_len=64", "data.seq_len=64", "data.vocab_size=512", "routing.encoder=wordllama",
         "memory.ranks=[8,8]", "train.batch_size=8", "train.warmup_steps=2", "train.log_every=1",
         "train.device=cpu", "train.threads=1", "train.ckpt_every=3"]
MODES = {"anchor": ["train.mode=anchor"],
         "memory": ["train.mode=scratch", "memory.mmap=true", "memory.cache_bytes=400000"]}
KILLS = ("armed", "poll", "random")  # trial i's launches go round these, from the i-th
TOPICS = ["ship harbour sail wave anchor captain tide coast", "peak snow glacier climb ridge summit valley rock",
          "street tram market square tower bridge cafe office", "wheat barn cattle harvest tractor field orchard"]
METRICS = ("step", "loss", "grad_norm", "lr", "tokens_seen")


def build_data(work: Path) -> list[str]:
    """A four-topic corpus, prepared and clustered; returns the overrides that point at it."""
    from hiermem.config import load_config
    from hiermem.data.prepare import prepare
    from hiermem.routing.clustering import ensure_clustered

    rng = random.Random(0)
    rows = [{"id": f"d{i}", "text": " ".join(rng.choice(TOPICS[i % 4].split()) for _ in range(rng.randint(6, 16)))}
            for i in range(240)]
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    overrides = [f"data.corpus={corpus}", f"data.dir={work / 'data'}", *SHAPE]
    cfg = load_config("tiny", overrides)
    ensure_clustered(cfg, prepare(cfg), progress=False)
    return overrides


def _command(overrides: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "hiermem", "train", "--quiet", *overrides, f"train.run_dir={run_dir}"]


def _env(crash: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HIERMEM_TEST_CRASH"}
    env["OMP_NUM_THREADS"] = "1"
    if crash:
        env["HIERMEM_TEST_CRASH"] = crash
    return env


def _generation(state_path: Path) -> int:
    from hiermem.errors import HiermemError
    from hiermem.train.checkpoint import load_state

    try:
        return load_state(state_path.parent)["generation"] if state_path.is_file() else -1
    except HiermemError:
        return -2  # unreadable: reported by check_files


def inside_checkpoint(run_dir: Path) -> bool:
    """Whether the disk shows a checkpoint in progress: a temp file in checkpoint/ or bank/, a bank generation
    committed beyond state.json's, a bank manifest not yet published to it, or checkpoint files state.json does
    not name (new ones written, or old ones not yet removed)."""
    ckpt, bank = run_dir / "checkpoint", run_dir / "bank"
    for d in (ckpt, bank):
        if d.is_dir() and any(p.name.endswith(".tmp") for p in d.iterdir()):
            return True
    g = _generation(ckpt / "state.json")
    if bank.is_dir() and any(int(p.stem.split("-")[1]) > g for p in bank.glob("gen-*.json")):
        return True
    if g >= 0:
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
        named = {"state.json", *state.get("files", {}).values()}
        if any(p.name not in named for p in ckpt.iterdir() if not p.name.startswith(".")):
            return True
        if (bank / "manifest.json").is_file():
            from hiermem.memory.store import open_store

            if open_store(bank).generation < g:
                return True
    return False


def _temp_files(run_dir: Path) -> bool:
    """A checkpoint's atomic write in progress (the cheap test, polled)."""
    for d in (run_dir / "checkpoint", run_dir / "bank"):
        try:
            with os.scandir(d) as entries:  # closed even when any() stops early
                if any(e.name.endswith(".tmp") for e in entries):
                    return True
        except OSError:
            pass
    return False


def _poll_then_kill(proc: subprocess.Popen, run_dir: Path, limit: float) -> None:
    """SIGKILL as soon as a checkpoint's temp file shows on disk (or at `limit` seconds)."""
    start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < limit:
        if _temp_files(run_dir):
            break
        time.sleep(0.0005)
    if proc.poll() is None:
        proc.kill()


def _armed(rng: random.Random, memory: bool) -> str:
    events = ["block", "state", "publish"] if memory else ["state"]
    event = rng.choice(events)
    return f"1:{event}:{rng.randint(1, 3) if event == 'block' else 1}"


def run_trial(overrides: list[str], run_dir: Path, wall: float, rng: random.Random, first_kind: int,
              max_kills: int, memory: bool) -> dict:
    """Launch, kill, relaunch until the run finishes; what happened."""
    kills = inside = armed = launches = 0
    log = run_dir.parent / f"{run_dir.name}.stderr"
    while True:
        resume = (run_dir / "config.yaml").is_file()
        kind = KILLS[(first_kind + launches) % len(KILLS)] if kills < max_kills else "none"
        crash = _armed(rng, memory) if kind == "armed" else None
        with open(log, "w") as err:
            proc = subprocess.Popen(_command(overrides, run_dir) + (["--resume"] if resume else []), env=_env(crash),
                                    stdout=subprocess.DEVNULL, stderr=err)
            launches += 1
            if kind == "random":
                try:
                    proc.wait(timeout=rng.uniform(0, wall))
                except subprocess.TimeoutExpired:
                    proc.kill()
            elif kind == "poll":
                _poll_then_kill(proc, run_dir, limit=wall)
            proc.wait()
        if proc.returncode == 0:
            return {"finished": True, "kills": kills, "inside_checkpoint": inside, "armed": armed,
                    "launches": launches}
        if proc.returncode != -signal.SIGKILL:
            return {"finished": False, "kills": kills, "inside_checkpoint": inside, "armed": armed,
                    "launches": launches, "error": log.read_text()[-2000:]}
        kills += 1
        if crash:  # it killed itself at the crash point: inside a checkpoint by construction
            armed += 1
            inside += 1
        elif inside_checkpoint(run_dir):
            inside += 1
        if (run_dir / "train_summary.json").is_file():  # killed after the last write
            return {"finished": True, "kills": kills, "inside_checkpoint": inside, "armed": armed,
                    "launches": launches}


def _metrics(run_dir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [tuple(r.get(k) for k in METRICS) for r in rows]


def _final_state(run_dir: Path) -> dict[str, np.ndarray | torch.Tensor]:
    """Everything the run ends with: anchor, AdamW state, bank weights and moments, the bank's step counts."""
    from hiermem.memory.bank import MemoryBank
    from hiermem.train.checkpoint import load_state

    out: dict = {f"anchor.{k}": v for k, v in load_file(str(run_dir / "anchor.safetensors")).items()}
    state = load_state(run_dir / "checkpoint")
    files = state["files"]
    if "optimizer" in files:
        opt = torch.load(run_dir / "checkpoint" / files["optimizer"], weights_only=True)
        for i, s in opt["state"].items():
            out.update({f"adamw.{i}.{k}": v for k, v in s.items()})
    if "bank_optimizer" in files:
        with np.load(run_dir / "checkpoint" / files["bank_optimizer"]) as z:
            out.update({f"bank-adam.{k}": z[k] for k in z.files if k.startswith("steps.")})
        bank = MemoryBank.load(run_dir / "bank", mmap=False, generation=state["generation"])
        for key in bank.parts():
            out.update({f"bank.{key}.{f}": bank.read_part(key, f) for f in "wmv"})
    return out


def check_files(run_dir: Path) -> list[str]:
    """Problems reading the run's files back (none for a sound run)."""
    from hiermem.config import read_config
    from hiermem.errors import HiermemError
    from hiermem.memory.bank import MemoryBank

    problems = []
    try:
        read_config(run_dir / "config.yaml")
        for name in ("run.json", "train_summary.json", "tokenizer.json"):
            json.loads((run_dir / name).read_text(encoding="utf-8"))
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            json.loads(line)
        _final_state(run_dir)
        if (run_dir / "bank").is_dir():
            MemoryBank.load(run_dir / "bank", mmap=True, writable=False).verify()
            with np.load(run_dir / "tree.npz") as z:
                [z[k] for k in z.files]
    except (OSError, ValueError, KeyError, HiermemError) as e:
        problems.append(f"{type(e).__name__}: {e}")
    return problems


def compare(run_dir: Path, ref_dir: Path) -> list[str]:
    """How a finished trial differs from the reference (empty: bitwise the same)."""
    problems = check_files(run_dir)
    if problems:
        return problems
    mine, ref = _metrics(run_dir), _metrics(ref_dir)
    if [r[0] for r in mine] != [r[0] for r in ref]:
        problems.append(f"metrics steps {[r[0] for r in mine]} (expected each of 1..{len(ref)} once)")
    elif mine != ref:
        step = next(a[0] for a, b in zip(mine, ref) if a != b)
        problems.append(f"metrics differ from step {step}")
    a, b = _final_state(run_dir), _final_state(ref_dir)
    if a.keys() != b.keys():
        problems.append("final state: other keys")
    for k in sorted(a.keys() & b.keys()):
        x, y = (torch.as_tensor(a[k]), torch.as_tensor(b[k]))
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
            problems.append(f"final state differs: {k}")
            break
    return problems


def run(out: str, quick: bool = False, trials: int | None = None, seed: int = 0, **_options) -> dict:
    out_dir = Path(out)
    work = out_dir / "chaos"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    trials = trials if trials is not None else (2 if quick else 6)
    steps, max_kills = (12, 3) if quick else (24, 6)
    data = build_data(work)
    rng = random.Random(seed)
    report = {"trials_per_mode": trials, "steps": steps, "seed": seed, "modes": {}}
    for mode, extra in MODES.items():
        overrides = [*data, *extra, f"train.max_steps={steps}"]
        ref_dir = work / f"{mode}-reference"
        start = time.perf_counter()
        subprocess.run(_command(overrides, ref_dir), env=_env(), check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        results = []
        for i in range(trials):
            run_dir = work / f"{mode}-{i}"
            res = run_trial(overrides, run_dir, wall, rng, first_kind=i, max_kills=max_kills,
                            memory=mode == "memory")
            res["problems"] = compare(run_dir, ref_dir) if res["finished"] else [res.pop("error", "not finished")]
            res["passed"] = not res["problems"]
            results.append(res)
        report["modes"][mode] = {"reference_wall_s": round(wall, 2), "trials": results,
                                 "kills": sum(r["kills"] for r in results),
                                 "inside_checkpoint": sum(r["inside_checkpoint"] for r in results),
                                 "armed": sum(r["armed"] for r in results),
                                 "passed": sum(r["passed"] for r in results)}
    report["passed"] = all(m["passed"] == trials for m in report["modes"].values())
    (out_dir / "chaos.json").write_text(json.dumps(report, indent=1))
    rows = [("mode", "trials", "kills", "in checkpoint", "armed", "reference s", "passed")]
    for mode, m in report["modes"].items():
        rows.append((mode, str(trials), str(m["kills"]), str(m["inside_checkpoint"]), str(m["armed"]),
                     f"{m['reference_wall_s']:.1f}", f"{m['passed']}/{trials}"))
    print_rows(rows)
    for mode, m in report["modes"].items():
        for n, r in enumerate(m["trials"]):
            for p in r["problems"]:
                print(f"{mode} trial {n}: {p}")
    print(f"chaos: {'PASS' if report['passed'] else 'FAIL'} ({out_dir / 'chaos.json'})")
    return report


__all__ = ["check_files", "compare", "inside_checkpoint", "run", "run_trial"]
