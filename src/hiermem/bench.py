"""`hiermem bench`: training-step throughput of the anchor alone and of the anchor with hierarchical memory.

One training step = bank fetch (gathered per sequence, or grouped by node) + forward + backward + global grad
clip (anchor and fetched blocks together) + the anchor's AdamW + the bank's lazy AdamW, exactly the work of
train/loop.py's train_step minus data loading. Variants, all measured in the same process on the same model:

  anchor           the plain transformer (no memory)
  memory-gather    + memory, per-sequence weights [B, layers, 3, R, d]   (memory.dispatch=gather)
  memory-grouped   + memory, distinct blocks per level + row index       (memory.dispatch=grouped)

and, on CUDA, the same three with every transformer block compiled (torch.compile per block; the memory
branch stays eager behind a graph break). Reported: tokens/s, ms/step, peak GPU memory, the ratio
memory/anchor within the same compile mode, MFU, and the FLOP bound of that ratio.

FLOP model (per trained token, forward + backward = 3 x forward; 2 FLOPs per multiply-add):
  anchor  = 6·(L·(4·d·w + 3·d·d_ff) + V·d)        matmul weights; the embedding lookup costs nothing
          + 6·L·T·w                              causal attention: QK^T and AV, 2·2·(T/2)·w forward per layer
  memory  = 6·L_mem·3·R·d                         the fetched neurons (R = r1 + r2 + ... ) in every memory layer
  FLOP-bound ratio = anchor / (anchor + memory): the best memory/anchor throughput ratio if both ran at the
  same FLOP rate. MFU = anchor FLOPs/s ÷ the card's dense bf16 peak (989 TFLOP/s for H100/H200 SXM).
Elementwise work, norms, softmax and the optimizers count as zero FLOPs: they are pure overhead here.

Shapes: on CUDA the paper's 160M anchor (35 layers, d 512, 12 heads x 32, d_ff 2048, vocab 50432, seq 2048,
batch 16, tied embeddings) with (256, 64, 16) memory over a 3-level bank of branching 16 (16 + 256 + 4096
blocks: the paper's 4.6B-parameter bank) when it fits beside the anchor's activations, else the largest
branching that does (bench.json says which). On CPU a small shape (quick: 2 timed steps), measured in two
interleaved rounds of which each variant keeps its best: a shared CPU's load comes and goes. breakdown_ms
splits a step into phases (synchronised after each); parity compares one step of the two memory paths.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hiermem.config import ModelConfig
from hiermem.memory.bank import BankSpec, MemoryBank, bank_param_counts
from hiermem.memory.optim import LazyAdamW
from hiermem.model.transformer import Transformer, count_parameters

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense bf16 tensor-core peaks


@dataclass
class Shape:
    model: ModelConfig
    batch: int
    seq: int
    ranks: tuple[int, ...]
    branching: int


SHAPES = {
    "gpu": Shape(ModelConfig(vocab_size=50432, n_layers=35, d_model=512, n_heads=12, head_dim=32, d_ff=2048,
                             max_seq_len=2048), batch=16, seq=2048, ranks=(256, 64, 16), branching=16),
    "cpu": Shape(ModelConfig(vocab_size=8192, n_layers=6, d_model=256, n_heads=8, head_dim=32, d_ff=1024,
                             max_seq_len=256), batch=8, seq=128, ranks=(64, 16, 4), branching=16),
    "cpu-quick": Shape(ModelConfig(vocab_size=4096, n_layers=4, d_model=128, n_heads=4, head_dim=32, d_ff=512,
                                   max_seq_len=128), batch=16, seq=128, ranks=(32, 8, 2), branching=16),
    "tiny": Shape(ModelConfig(vocab_size=256, n_layers=2, d_model=32, n_heads=2, head_dim=16, d_ff=64,
                              max_seq_len=16), batch=8, seq=16, ranks=(8, 4, 2), branching=4),
}


# ---------------------------------------------------------------------------------------------------------
def flops_per_token(cfg: ModelConfig, seq: int, spec: BankSpec | None) -> dict[str, float]:
    d, w, L = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_layers
    matmul = L * (4 * d * w + 3 * d * cfg.d_ff) + cfg.vocab_size * d
    anchor = 6.0 * matmul + 6.0 * L * seq * w
    memory = 0.0 if spec is None else 6.0 * spec.n_mem_layers * 3 * spec.fetched_rank * d
    return {"anchor": anchor, "memory": memory, "flop_bound_ratio": anchor / (anchor + memory)}


def random_bank(spec: BankSpec, device: torch.device, seed: int = 0) -> MemoryBank:
    """A bank filled straight on the device (MemoryBank.create initialises block by block on the CPU, far too
    slow for billions of parameters). Down rows are small but non-zero, as in a trained bank, so every block
    gets a gradient. Not checksummed: benchmark only."""
    g = torch.Generator(device=device).manual_seed(seed)
    arrays, crcs = {}, {}
    for key in spec.part_keys():
        shape = spec.part_shape(key)
        t = torch.empty(shape, device=device)
        t.normal_(0.0, spec.std, generator=g)
        t[:, :, 2].mul_(0.1)
        arrays[key], crcs[key] = t, np.zeros(shape[0], np.uint32)
    return MemoryBank(spec, arrays, crcs, verified=True)


def pick_branching(shape: Shape, device: torch.device, anchor_peak: int) -> int:
    """Largest branching <= shape.branching whose bank (weights + Adam m, v: 12 bytes a parameter) fits in
    the free device memory next to the anchor's peak plus the memory path's own activations."""
    if device.type != "cuda":
        return shape.branching
    _, total = torch.cuda.mem_get_info(device)
    reserve = anchor_peak + (12 << 30)  # the memory path adds a few GB (gathered weights, their grads, acts)
    for k in range(shape.branching, 1, -1):
        spec = _spec(shape, k)
        if bank_param_counts(spec)["bank"] * 12 + reserve < total:
            return k
    return 2


def _spec(shape: Shape, branching: int) -> BankSpec:
    return BankSpec(d=shape.model.d_model, n_layers=shape.model.n_layers, ranks=shape.ranks, branching=branching,
                    generic=True)


class Bench:
    def __init__(self, shape: Shape, device: torch.device, seed: int = 0):
        self.shape, self.device = shape, device
        self.cuda = device.type == "cuda"
        torch.manual_seed(seed)
        self.model = Transformer(shape.model).to(device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        rest = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                     lr=1e-4, betas=(0.9, 0.95), **({"fused": True} if self.cuda else {}))
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, shape.model.vocab_size, (shape.batch, shape.seq + 1), generator=g)
        self.inputs, self.targets = ids[:, :-1].to(device), ids[:, 1:].to(device)
        self.bank: MemoryBank | None = None
        self.bank_opt: LazyAdamW | None = None
        self.step_no = 0

    def make_bank(self, branching: int) -> None:
        spec = _spec(self.shape, branching)
        self.bank = random_bank(spec, self.device)
        self.bank_opt = LazyAdamW(self.bank, lr=1e-4, weight_decay=1e-3)

    def draw(self, step: int) -> tuple[np.ndarray, torch.Tensor]:
        """Consistent root-to-leaf paths of random leaves and the generic draw (p = 1/(k+1)), seeded by step."""
        spec = self.bank.spec
        rng = np.random.default_rng(1000 + step)
        leaves = rng.integers(0, spec.n_nodes(spec.depth - 1), self.shape.batch)
        k, p = spec.branching, spec.depth
        paths = np.stack([leaves // k ** (p - 1 - l) for l in range(p)], axis=1).astype(np.int64)
        use_generic = torch.from_numpy(rng.random(self.shape.batch) < 1.0 / (k + 1))
        return paths, use_generic

    def fetch(self, mode: str, step: int):
        paths, use_generic = self.draw(step)
        fn = self.bank.fetch_grouped if mode == "grouped" else self.bank.fetch
        return fn(paths, use_generic, device=self.device, requires_grad=True)

    def train_step(self, mode: str | None, phases: dict | None = None) -> torch.Tensor:
        """mode None = anchor alone; "gather" / "grouped" = with memory through that path.
        phases: if given, synchronise after each phase and add its seconds there (a breakdown, not a timing)."""
        t = [time.perf_counter()]

        def lap(name):
            if phases is not None:
                self.sync()
                t.append(time.perf_counter())
                phases[name] = phases.get(name, 0.0) + t[-1] - t[-2]

        f = None
        if mode is not None:
            f = self.fetch(mode, self.step_no)
            self.bank.record(f)
        lap("fetch")
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
            _, loss = self.model(self.inputs, self.targets, memory=None if f is None else f.memory)
        loss.backward()
        lap("forward_backward")
        params = [p for p in self.model.parameters() if p.grad is not None]
        sq = torch.stack(torch._foreach_norm([p.grad for p in params])).pow(2).sum()
        bg = None
        if f is not None:
            bg = self.bank.block_grads(f)
            sq = sq + bg.norm_sq().to(sq.device)
        lap("block_grads_and_norm")
        scale = (1.0 / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # clip the global norm at 1.0, without a host sync
        torch._foreach_mul_([p.grad for p in params], scale)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        lap("anchor_adamw")
        if bg is not None:
            bg.scale_(scale.to(next(iter(bg.grads.values())).device))
            self.bank_opt.step(bg)
        lap("bank_lazy_adamw")
        self.step_no += 1
        return loss.detach()

    def breakdown(self, mode: str | None, steps: int = 2) -> dict:
        """Milliseconds per step in each phase (synchronised after each, so slightly slower than a real step)."""
        phases: dict = {}
        self.step_no = 0
        for _ in range(steps):
            self.train_step(mode, phases)
        return {k: 1e3 * v / steps for k, v in phases.items()}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, mode: str | None, warmup: int, steps: int) -> dict:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        self.step_no = 0  # every variant sees the same paths and generic draws
        t0 = time.perf_counter()
        for _ in range(warmup):
            self.train_step(mode)
        self.sync()
        t1 = time.perf_counter()
        for _ in range(steps):
            loss = self.train_step(mode)
        self.sync()
        t2 = time.perf_counter()
        dt = (t2 - t1) / steps
        tokens = self.shape.batch * self.shape.seq
        out = {"tok_per_s": tokens / dt, "ms_per_step": dt * 1e3, "warmup_s": t1 - t0, "loss": float(loss)}
        if self.cuda:
            out["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out

    def compile_blocks(self) -> None:
        for block in self.model.blocks:
            block.compile()

    def parity(self) -> dict:
        """One forward/backward of both memory paths on the same batch and paths (no update): largest
        relative differences of the loss and of the per-block gradients."""
        res = {}
        for mode in ("gather", "grouped"):
            f = self.fetch(mode, 10_000)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
                _, loss = self.model(self.inputs, self.targets, memory=f.memory)
            loss.backward()
            self.model.zero_grad(set_to_none=True)
            res[mode] = (float(loss.detach()), self.bank.block_grads(f))
        (la, ga), (lb, gb) = res["gather"], res["grouped"]
        rel = max(float((gb.grads[k] - ga.grads[k]).norm() / ga.grads[k].norm().clamp(min=1e-30)) for k in ga.ids)
        return {"loss_gather": la, "loss_grouped": lb, "loss_rel_diff": abs(la - lb) / max(abs(la), 1e-30),
                "block_grad_max_rel_diff": rel, "dtype": "bf16 autocast" if self.cuda else "fp32"}


# ---------------------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_flops(name: str) -> float | None:
    for key, v in PEAK_BF16.items():
        if key in name:
            return v
    return None


def run_bench(out: str | Path = "runs/bench", quick: bool = False, device: str | None = None,
              steps: int | None = None, warmup: int | None = None, compile: bool | None = None,
              shape: str | None = None, branching: int | None = None, budget_s: float | None = None,
              parity: bool = True, rounds: int | None = None) -> dict:
    """Measure, print a table, write bench.json and bench.png into out; returns the results."""
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    sh = SHAPES[shape or ("gpu" if cuda else "cpu-quick" if quick else "cpu")]
    warmup = warmup if warmup is not None else (2 if cuda else 1)
    steps = steps if steps is not None else (2 if quick else 6 if cuda else 4)
    compile = cuda if compile is None else compile
    rounds = rounds if rounds is not None else (1 if cuda or quick else 2)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    bench = Bench(sh, dev)
    name = device_name(dev)
    res: dict = {"device": name, "torch": torch.__version__, "shape": {**asdict(sh.model), "batch": sh.batch,
                 "seq": sh.seq, "ranks": list(sh.ranks)},
                 "anchor_params": count_parameters(sh.model), "steps": steps, "warmup": warmup, "rounds": rounds,
                 "dtype": "bf16 autocast, fp32 master weights and bank" if cuda else "fp32",
                 "anchor_optimizer": "AdamW fused" if cuda else "AdamW (foreach)", "variants": {}}

    def save():
        res["elapsed_s"] = time.perf_counter() - t_start
        (out / "bench.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")

    def measure(label: str, mode: str | None, compiled: bool) -> None:
        try:
            r = bench.time(mode, warmup + (4 if compiled else 0), steps)  # compiled: recompiles for U sizes
        except Exception as e:  # noqa: BLE001 - a failed variant is reported, the others still run
            res["variants"][label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"  {label}: failed ({res['variants'][label]['error']})", flush=True)
            if cuda:
                torch.cuda.empty_cache()
            save()
            return
        r.update(mode=mode or "anchor", compiled=compiled)
        old = res["variants"].get(label, {})
        if "tok_per_s" in old:  # another round: keep the best (least disturbed) one
            r["rounds"] = old.get("rounds", 1) + 1
            if old["tok_per_s"] > r["tok_per_s"]:
                r = {**old, "rounds": r["rounds"]}
        res["variants"][label] = r
        print(f"  {label:<24} {r['tok_per_s']:>12,.0f} tok/s  {r['ms_per_step']:8.1f} ms/step", flush=True)
        save()

    print(f"hiermem bench on {name}: batch {sh.batch} x {sh.seq}, {sh.model.n_layers} layers, d {sh.model.d_model}",
          flush=True)
    measure("anchor", None, False)
    anchor_peak = int(res["variants"]["anchor"].get("peak_mem_gb", 0) * 2**30)
    k = branching or pick_branching(sh, dev, anchor_peak)
    bench.make_bank(k)
    spec = bench.bank.spec
    counts = bank_param_counts(spec)
    res["bank"] = {"ranks": list(spec.ranks), "branching": k, "depth": spec.depth,
                   "nodes_per_level": [spec.n_nodes(l) for l in range(spec.depth)], "params": counts["bank"],
                   "fetched_params": counts["fetched"], "generic": True,
                   "generic_prob": 1.0 / (k + 1), "where": "device memory" if cuda else "RAM"}
    res["flops_per_token"] = flops_per_token(sh.model, sh.seq, spec)
    print(f"  bank: ranks {spec.ranks}, branching {k}, {counts['bank'] / 1e9:.3f}B params "
          f"(fetched {counts['fetched'] / 1e6:.1f}M per sequence)", flush=True)
    for round_ in range(rounds):  # interleaved rounds, best of each: a shared CPU's load comes and goes
        if round_:
            measure("anchor", None, False)
        measure("memory-gather", "gather", False)
        measure("memory-grouped", "grouped", False)
    try:
        res["breakdown_ms"] = {m or "anchor": bench.breakdown(m) for m in (None, "gather", "grouped")}
    except Exception as e:  # noqa: BLE001
        res["breakdown_ms"] = {"error": f"{type(e).__name__}: {e}"}
    save()
    if parity:
        try:
            res["parity"] = bench.parity()
        except Exception as e:  # noqa: BLE001
            res["parity"] = {"error": f"{type(e).__name__}: {e}"}
        save()
    if compile:
        if budget_s is not None and time.perf_counter() - t_start > 0.5 * budget_s:
            res["compile_skipped"] = "time budget"
        else:
            try:
                bench.compile_blocks()
                for label, mode in (("anchor+compile", None), ("memory-grouped+compile", "grouped"),
                                    ("memory-gather+compile", "gather")):
                    if budget_s is not None and time.perf_counter() - t_start > 0.85 * budget_s:
                        res.setdefault("compile_skipped", []).append(label)
                        continue
                    measure(label, mode, True)
            except Exception as e:  # noqa: BLE001
                res["compile_error"] = f"{type(e).__name__}: {e}"
    summarize(res, dev)
    save()
    print_table(res)
    plot(res, out / "bench.png")
    return res


def summarize(res: dict, dev: torch.device) -> None:
    fl = res.get("flops_per_token", {})
    peak = peak_flops(res["device"]) if dev.type == "cuda" else None
    v = res["variants"]
    for label, r in v.items():
        if "tok_per_s" not in r:
            continue
        base = v.get("anchor+compile" if r["compiled"] else "anchor", {})
        if "tok_per_s" in base:
            r["ratio_vs_anchor"] = r["tok_per_s"] / base["tok_per_s"]
        if fl:
            total = fl["anchor"] + (fl["memory"] if r["mode"] != "anchor" else 0.0)
            r["tflops"] = r["tok_per_s"] * total / 1e12
            if peak:
                r["mfu"] = r["tok_per_s"] * total / peak  # model FLOPs (anchor [+ memory]) over the peak
    if fl:
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for n, row in enumerate(rows):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    if "flop_bound_ratio" in res:
        bank = res["bank"]
        print(f"\nFLOP bound of memory/anchor: {res['flop_bound_ratio']:.3f}  (bank: {bank['params'] / 1e9:.3f}B "
              f"params, branching {bank['branching']}; device: {res['device']})")
    for mode, ph in res.get("breakdown_ms", {}).items():
        if isinstance(ph, dict):
            print(f"breakdown {mode:<8} " + "  ".join(f"{k} {v:.1f}" for k, v in ph.items()) + "  (ms/step)")
    if "parity" in res and "loss_rel_diff" in res["parity"]:
        p = res["parity"]
        print(f"gather vs grouped ({p['dtype']}): loss rel diff {p['loss_rel_diff']:.2e}, "
              f"block-gradient rel diff {p['block_grad_max_rel_diff']:.2e}")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(k, r) for k, r in res["variants"].items() if "tok_per_s" in r]
    if not items:
        return
    fig, ax = plt.subplots(figsize=(1.6 * len(items) + 2, 4))
    colors = {"anchor": "#777777", "gather": "#d08c3a", "grouped": "#3a7bd0"}
    bars = ax.bar([k for k, _ in items], [r["tok_per_s"] for _, r in items],
                  color=[colors[r["mode"]] for _, r in items])
    for bar, (_, r) in zip(bars, items):
        if "ratio_vs_anchor" in r:
            ax.annotate(f"{r['ratio_vs_anchor']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("training tokens / s")
    fb = res.get("flop_bound_ratio")
    ax.set_title(f"{res['device']}" + (f"  (FLOP bound of memory/anchor {fb:.2f})" if fb else ""), fontsize=9)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["run_bench", "flops_per_token", "random_bank", "SHAPES"]
