"""Suite `train`: tokens/s of the trainer's own step (train/step.py), anchor alone vs anchor + memory.

Each variant builds the model, optimizers and bank that `hiermem train` builds for the same config and times
TrainStep on synthetic batches (random tokens; consistent random root-to-leaf paths; documents of `doc_len`
tokens packed into each row, or one document per row with doc_len 0). Only data loading differs from a real
run. Variants, measured in the same process: anchor (train.mode=anchor) and memory (train.mode=scratch, the
bank fetched and updated every step), each eager and, on CUDA, with train.compile=true.

FLOPs, MFU and the FLOP-bound ratio follow train/flops.py (the trainer's log uses the same model). Shapes: on CUDA the paper's 160M anchor with (256, 64, 16)
memory over its 4.6B-parameter bank (the largest branching that fits), on CPU a small shape.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from hiermem.config import Config, load_config
from hiermem.memory.bank import MemoryBank
from hiermem.memory.spec import BankSpec, bank_param_counts, spec_from_config
from hiermem.model.transformer import Transformer, count_parameters
from hiermem.bench.table import print_rows
from hiermem.train.flops import flops_per_token, peak_flops
from hiermem.train.step import TrainStep, anchor_optimizer, bank_optimizer

# (model, batch, seq, ranks, branching)
SHAPES = {
    "gpu": (dict(vocab_size=50432, n_layers=35, d_model=512, n_heads=12, head_dim=32, d_ff=2048), 16, 2048,
            [256, 64, 16], 16),
    "cpu": (dict(vocab_size=8192, n_layers=6, d_model=256, n_heads=8, head_dim=32, d_ff=1024), 8, 128,
            [64, 16, 4], 16),
    "cpu-quick": (dict(vocab_size=4096, n_layers=4, d_model=128, n_heads=4, head_dim=32, d_ff=512), 16, 128,
                  [32, 8, 2], 16),
    "tiny": (dict(vocab_size=256, n_layers=2, d_model=32, n_heads=2, head_dim=16, d_ff=64), 8, 16, [8, 4, 2], 4),
}


def shape_config(shape: str, mode: str, device: str, compile: bool = False, branching: int | None = None) -> Config:
    model, batch, seq, ranks, k = SHAPES[shape]
    overrides = [f"model.{key}={v}" for key, v in model.items()] + [
        f"model.max_seq_len={seq}", f"data.seq_len={seq}", f"train.batch_size={batch}", f"train.mode={mode}",
        f"train.device={device}", f"train.compile={str(compile).lower()}", f"routing.depth={len(ranks)}",
        f"routing.branching={branching or k}", f"memory.ranks=[{','.join(map(str, ranks))}]",
        "train.warmup_steps=2", "train.lr=1e-4", "memory.lr=1e-4"]
    return load_config(None, overrides)


def random_bank(spec: BankSpec, device: torch.device, seed: int = 0) -> MemoryBank:
    """A bank filled straight on the device (MemoryBank.create initialises block by block on the CPU, far too
    slow for billions of parameters). The matrices a fresh bank zeroes (ffn down rows, LoRA B, kv values) are
    small but non-zero, as in a trained bank, so every block gets a gradient. Its checksums are not computed:
    benchmark only."""
    g = torch.Generator(device=device).manual_seed(seed)
    zeroed = [m for m in spec.memory_kind.matrices(spec.d) if m.init == "zero"]
    arrays, crcs = {}, {}
    for key in spec.part_keys():
        t = torch.empty(spec.part_shape(key), device=device)
        t.normal_(0.0, spec.std, generator=g)
        for m in zeroed:
            t[:, :, m.first:m.first + m.n_slabs].mul_(0.1)
        arrays[key], crcs[key] = t, np.zeros(t.shape[0], np.uint32)
    return MemoryBank(spec, arrays, crcs, verified=True)


def synthetic_batch(cfg: Config, step: int, doc_len: int) -> dict[str, torch.Tensor]:
    """Random tokens, documents of doc_len tokens (0: one per row), consistent random root-to-leaf paths."""
    B, T, V = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    pos = torch.arange(T).expand(B, T)
    seg = torch.zeros(B, T, dtype=torch.long)
    if doc_len > 0:
        seg, pos = (pos // doc_len).contiguous(), (pos % doc_len).contiguous()
    k, depth = cfg.routing.branching, cfg.routing.depth
    leaves = np.random.default_rng(step).integers(0, k ** depth, B)
    paths = np.stack([leaves // k ** (depth - 1 - l) for l in range(depth)], axis=1).astype(np.int64)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "positions": pos, "segment_ids": seg,
            "paths": torch.from_numpy(paths)}


def pick_branching(cfg: Config, device: torch.device, anchor_peak: int) -> int:
    """Largest branching <= the shape's whose bank (weights + Adam m, v: 12 bytes a parameter) fits in the
    device memory next to the anchor's peak plus the memory path's own activations (CUDA only)."""
    for k in range(cfg.routing.branching, 1, -1):
        cfg.routing.branching = k
        need = bank_param_counts(spec_from_config(cfg))["bank"] * 12 + anchor_peak + (12 << 30)
        if need < torch.cuda.mem_get_info(device)[1]:
            return k
    return 2


def build_step(cfg: Config, device: torch.device) -> TrainStep:
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device)
    bank = bank_opt = None
    if cfg.uses_memory:
        bank = random_bank(spec_from_config(cfg), device)
        bank_opt = bank_optimizer(bank, cfg)
    return TrainStep(cfg, model, device, total_steps=10_000, anchor_opt=anchor_optimizer(model, cfg),
                     bank=bank, bank_opt=bank_opt)


def time_steps(step: TrainStep, cfg: Config, warmup: int, steps: int, doc_len: int) -> dict:
    device = step.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = [synthetic_batch(cfg, i, doc_len) for i in range(warmup + steps)]
    t0 = time.perf_counter()
    for i in range(warmup):
        step(batches[i], i)
    sync()
    t1 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        out = step(batches[i], i)
    loss = float(out["loss"])  # waits for the device
    t2 = time.perf_counter()
    dt = (t2 - t1) / steps
    res = {"tok_per_s": cfg.train.batch_size * cfg.data.seq_len / dt, "ms_per_step": 1e3 * dt,
           "warmup_s": t1 - t0, "loss": loss}
    if device.type == "cuda":
        res["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return res


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(out: str = "runs/bench", quick: bool = False, device: str | None = None, shape: str | None = None,
        steps: int | None = None, warmup: int | None = None, compile: bool | None = None,
        branching: int | None = None, rounds: int | None = None, doc_len: int = 0) -> dict:
    """Measure, print a table, write train.json and train.png into out; returns the results."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    shape = shape or ("gpu" if cuda else "cpu-quick" if quick else "cpu")
    # CPU: the first steps touch fresh pages of the bank's optimizer state, so warm up a few
    warmup = warmup if warmup is not None else 2 if cuda else 1 if quick else 3
    steps = steps if steps is not None else 2 if quick else 6 if cuda else 8
    compile = cuda if compile is None else compile
    rounds = rounds if rounds is not None else 1 if cuda or quick else 2
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    anchor_cfg = shape_config(shape, "anchor", dev.type)
    res: dict = {"suite": "train", "device": device_name(dev), "torch": torch.__version__, "shape": shape,
                 "model": dataclasses.asdict(anchor_cfg.model), "batch": anchor_cfg.train.batch_size,
                 "seq": anchor_cfg.data.seq_len, "doc_len": doc_len, "anchor_params": count_parameters(anchor_cfg.model),
                 "steps": steps, "warmup": warmup, "rounds": rounds, "variants": {},
                 "dtype": "bf16 autocast, fp32 master weights and bank" if cuda else "fp32"}

    def save() -> None:
        (out_dir / "train.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")

    def measure(label: str, cfg: Config) -> None:
        try:
            r = time_steps(build_step(cfg, dev), cfg, warmup + (4 if cfg.train.compile else 0), steps, doc_len)
        except Exception as e:  # noqa: BLE001 - a failed variant is reported, the others still run
            res["variants"][label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"  {label}: failed ({res['variants'][label]['error']})", flush=True)
            return
        r.update(mode=cfg.train.mode, compiled=cfg.train.compile)
        print(f"  {label:<18} {r['tok_per_s']:>12,.0f} tok/s  {r['ms_per_step']:8.1f} ms/step", flush=True)
        res.setdefault("rounds_tok_per_s", {}).setdefault(label, []).append(round(r["tok_per_s"], 1))
        old = res["variants"].get(label, {})
        if old.get("tok_per_s", 0) > r["tok_per_s"]:  # another round: the table keeps the least disturbed one
            r = old
        res["variants"][label] = r
        save()

    print(f"hiermem bench --suite train on {res['device']}: {shape}, batch {res['batch']} x {res['seq']}", flush=True)
    measure("anchor", anchor_cfg)
    mem_cfg = shape_config(shape, "scratch", dev.type)
    if branching or cuda:
        peak = int(res["variants"]["anchor"].get("peak_mem_gb", 0) * 2**30)
        mem_cfg = shape_config(shape, "scratch", dev.type, branching=branching or pick_branching(mem_cfg, dev, peak))
    spec = spec_from_config(mem_cfg)
    counts = bank_param_counts(spec)
    res["bank"] = {"ranks": list(spec.ranks), "branching": spec.branching, "params": counts["bank"],
                   "fetched_params": counts["fetched"], "where": "device memory" if cuda else "RAM"}
    res["flops_per_token"] = flops_per_token(mem_cfg.model, mem_cfg.data.seq_len, spec)
    for round_ in range(rounds):  # interleaved rounds, best of each: a shared CPU's load comes and goes
        if round_:
            measure("anchor", anchor_cfg)
        measure("memory", mem_cfg)
    if compile:
        measure("anchor+compile", shape_config(shape, "anchor", dev.type, compile=True))
        measure("memory+compile", shape_config(shape, "scratch", dev.type, compile=True, branching=spec.branching))
    summarize(res)
    save()
    print_table(res)
    plot(res, out_dir / "train.png")
    return res


def summarize(res: dict) -> None:
    fl, v = res["flops_per_token"], res["variants"]
    peak = peak_flops(res["device"])
    for label, r in v.items():
        if "tok_per_s" not in r:
            continue
        base = v.get("anchor+compile" if r["compiled"] else "anchor", {})
        if "tok_per_s" in base:
            r["ratio_vs_anchor"] = r["tok_per_s"] / base["tok_per_s"]
        total = fl["anchor"] + (fl["memory"] if r["mode"] != "anchor" else 0.0)
        r["tflops"] = r["tok_per_s"] * total / 1e12
        if peak:
            r["mfu"] = r["tok_per_s"] * total / peak
    res["flop_bound_ratio"] = fl["flop_bound_ratio"]


def print_table(res: dict) -> None:
    rows = [("variant", "tok/s", "ms/step", "ratio", "MFU", "peak GB")]
    for label, r in res["variants"].items():
        if "tok_per_s" not in r:
            rows.append((label, "failed", "", "", "", ""))
            continue
        rows.append((label, f"{r['tok_per_s']:,.0f}", f"{r['ms_per_step']:.1f}",
                     f"{r['ratio_vs_anchor']:.3f}" if "ratio_vs_anchor" in r else "-",
                     f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-",
                     f"{r['peak_mem_gb']:.1f}" if "peak_mem_gb" in r else "-"))
    print_rows(rows)
    bank = res["bank"]
    print(f"\nFLOP bound of memory/anchor: {res['flop_bound_ratio']:.3f}  (bank: {bank['params'] / 1e9:.3f}B "
          f"params, branching {bank['branching']}; device: {res['device']})")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(k, r) for k, r in res["variants"].items() if "tok_per_s" in r]
    if not items:
        return
    fig, ax = plt.subplots(figsize=(1.6 * len(items) + 2, 4))
    bars = ax.bar([k for k, _ in items], [r["tok_per_s"] for _, r in items],
                  color=["#777777" if r["mode"] == "anchor" else "#3a7bd0" for _, r in items])
    for bar, (_, r) in zip(bars, items):
        if "ratio_vs_anchor" in r:
            ax.annotate(f"{r['ratio_vs_anchor']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("training tokens / s (TrainStep)")
    ax.set_title(f"{res['device']}  (FLOP bound of memory/anchor {res['flop_bound_ratio']:.2f})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["SHAPES", "random_bank", "run", "shape_config", "synthetic_batch"]
