"""`hiermem bench --suite distributed`: the trainer's step on 1 and 2 processes (torchrun, gloo on CPU), and the
bytes a step all-reduces with bank sharding (the anchor's gradients plus the shared blocks: here only the
generic block) against what a replicated bank would have to reduce (the anchor plus every block the global
batch fetched), and the bank bytes each rank holds in memory (weights and moments of its shard: the blocks it
fetches, memory/shard.py) against the whole bank's. Each process runs TrainStep with the same global batch
(per rank: its share, drawn from the subtrees it owns, data/sharding.py); tokens/s counts the global batch. The
GPU part (NCCL) runs only where there are two GPUs and is otherwise skipped, saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hiermem.bench.train_throughput import random_bank, shape_config
from hiermem.data.sharding import PathRuns, plan_shards, rank_pools
from hiermem.memory.bank import MemoryBank
from hiermem.memory.shard import ShardReducer, held_blocks
from hiermem.memory.spec import GENERIC, spec_from_config
from hiermem.model.transformer import Transformer
from hiermem.train.parallel import close_world, init_world, wrap_anchor
from hiermem.train.step import TrainStep, anchor_optimizer, bank_optimizer


def _batch(cfg, step: int, rows: np.ndarray) -> dict[str, torch.Tensor]:
    B, T, V = len(rows), cfg.data.seq_len, cfg.model.vocab_size
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "positions": torch.arange(T).expand(B, T).contiguous(),
            "segment_ids": torch.zeros(B, T, dtype=torch.long), "paths": torch.from_numpy(rows)}


def worker(shape: str, steps: int, warmup: int, out: str, device: str) -> None:
    cfg = shape_config(shape, "scratch", device)
    world = init_world(torch.device(device), 120)
    dev = world.device(torch.device(device))
    torch.manual_seed(0)
    k, depth = cfg.routing.branching, cfg.routing.depth
    leaves = np.arange(k ** depth)
    all_paths = np.stack([leaves // k ** (depth - 1 - l) for l in range(depth)], axis=1).astype(np.int64)
    runs = PathRuns.of(all_paths, np.ones(len(all_paths)))
    plan = plan_shards(runs, world.size)
    pools = [np.asarray(p) for p in rank_pools(plan, runs)]
    per_rank = cfg.train.batch_size // world.size

    def rows(step: int, rank: int) -> np.ndarray:
        pool = pools[rank]
        return all_paths[pool[np.random.default_rng([step, rank]).integers(0, len(pool), per_rank)]]

    model = Transformer(cfg.model).to(dev)
    module = wrap_anchor(model, world, "ddp")
    spec = spec_from_config(cfg)
    bank = random_bank(spec, dev)
    full_bytes = 3 * bank.resident_bytes()  # the whole bank's weights and both moments (float32)
    reducer = None
    if world.distributed:
        sharers = {f"level{l}": plan.sharers(l) for _, l, _, _ in spec.level_parts()}
        sharers[GENERIC] = {0: tuple(range(world.size))}
        reducer = ShardReducer(spec, sharers, world.rank, world.size, dev, world.comm_bytes)
        held = held_blocks(sharers, world.rank)  # this rank's shard, as the trainer holds it
        bank = MemoryBank(spec, {k: bank.part(k)[torch.from_numpy(h).to(dev)] for k, h in held.items()},
                          {k: np.zeros(spec.part_shape(k)[0], np.uint32) for k in held}, held=held)
    step_fn = TrainStep(cfg, model, dev, 10_000, anchor_optimizer(model, cfg), bank, bank_optimizer(bank, cfg),
                        world=world, module=module, reducer=reducer)
    for s in range(warmup):
        step_fn(_batch(cfg, s, rows(s, world.rank)), s)
    world.barrier()
    before = dict(world.comm_bytes)
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        out_s = step_fn(_batch(cfg, s, rows(s, world.rank)), s)
    float(out_s["loss"])
    world.barrier()
    dt = time.perf_counter() - t0
    resident = world.gather(bank.resident_bytes())
    union = {}  # what a replicated bank would all-reduce: every block the global batch fetched
    for s in range(warmup, warmup + steps):
        g = np.concatenate([rows(s, r) for r in range(world.size)])
        for key, level, _, _ in spec.level_parts():
            union[key] = union.get(key, 0) + len(np.unique(g[:, level])) * int(np.prod(spec.part_shape(key)[1:])) * 4
    replicated = sum(union.values()) / steps + int(np.prod(spec.part_shape(GENERIC)[1:])) * 4
    if world.is_main:
        anchor_bytes = sum(p.numel() * 4 for p in model.parameters())
        res = {"world_size": world.size, "tok_per_s": steps * cfg.train.batch_size * cfg.data.seq_len / dt,
               "allreduce_bytes_per_step": {k: (world.comm_bytes[k] - before[k]) / steps for k in before},
               "anchor_grad_bytes": anchor_bytes, "replicated_bank_memory_bytes_per_step": replicated,
               "bank_resident_bytes_per_rank": resident, "full_bank_bytes": full_bytes,
               "sharding": plan.report()}
        Path(out).write_text(json.dumps(res, indent=1))
    close_world(world)


def _launch(n: int, shape: str, steps: int, warmup: int, out: Path, device: str) -> dict:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(n), "-m", "hiermem.bench.distributed",
           "--shape", shape, "--steps", str(steps), "--warmup", str(warmup), "--out", str(out), "--device", device]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(f"bench distributed: {n} processes failed:\n{res.stderr[-2000:]}")
    return json.loads(out.read_text())


def run(out: str, quick: bool = False, **_options) -> dict:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shape, steps, warmup = ("tiny", 4, 1) if quick else ("cpu-quick", 8, 2)
    cpu = {n: _launch(n, shape, steps, warmup, out_dir / f"distributed_cpu_{n}.json", "cpu") for n in (1, 2)}
    report = {"shape": shape, "steps": steps, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
              "cpu": cpu, "cpu_speedup_2_over_1": cpu[2]["tok_per_s"] / cpu[1]["tok_per_s"]}
    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        report["gpu"] = {n: _launch(n, "cpu", steps, warmup, out_dir / f"distributed_gpu_{n}.json", "cuda")
                         for n in (1, 2)}
    else:
        report["gpu"] = "skipped: needs 2 CUDA devices"
    (out_dir / "distributed.json").write_text(json.dumps(report, indent=1))
    two = cpu[2]["allreduce_bytes_per_step"]
    print(f"distributed ({shape}, {steps} steps): tok/s 1 process {cpu[1]['tok_per_s']:,.0f}, 2 processes "
          f"{cpu[2]['tok_per_s']:,.0f} (ratio {report['cpu_speedup_2_over_1']:.2f})")
    print(f"all-reduced per step with bank sharding: anchor {two['anchor']:,.0f} B + memory {two['memory']:,.0f} B "
          f"(shared blocks only); a replicated bank: + {cpu[2]['replicated_bank_memory_bytes_per_step']:,.0f} B")
    print(f"bank in memory per rank (weights + moments): {cpu[2]['bank_resident_bytes_per_rank']} B of the whole "
          f"bank's {cpu[2]['full_bank_bytes']:,} B")
    print(f"gpu: {report['gpu'] if isinstance(report['gpu'], str) else 'measured'}")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description="one process of `hiermem bench --suite distributed`")
    ap.add_argument("--shape", default="cpu-quick")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(1)
    worker(a.shape, a.steps, a.warmup, a.out, a.device)


if __name__ == "__main__":
    main()
