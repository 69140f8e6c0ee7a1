"""Suite `decode`: decoding tokens/s of eval/generation.py, with and without the KV cache, with and without memory.

A batch of prompts, each with its own root-to-leaf path (so the batch holds as many distinct leaf blocks as
rows), is continued greedily by generate_ids, the function `hiermem generate`, `hiermem eval` and (through
BatchDecoder) `hiermem serve` run: with the KV cache (the prompt once, then one token per row per step) and
without it (the whole sequence recomputed every step, the reference), each with the fetched memory and with
none. The model is the train suite's shape (random weights, a random bank in RAM); every variant decodes
exactly max_new tokens (no eos). Best of `rounds` interleaved rounds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from hiermem.bench.train_throughput import device_name, random_bank, shape_config
from hiermem.eval.generation import generate_ids
from hiermem.io_utils import atomic_write_text
from hiermem.memory.fetch import fetch
from hiermem.memory.spec import spec_from_config
from hiermem.model.transformer import Transformer

VARIANTS = (("cache", True, True), ("cache, no memory", True, False), ("no cache", False, True),
            ("no cache, no memory", False, False))


def _paths(spec, batch: int, seed: int = 0) -> np.ndarray:
    """Distinct leaves, one per row, as full paths."""
    k, depth = spec.branching, spec.depth
    leaves = np.random.default_rng(seed).choice(k ** depth, size=batch, replace=False)
    return np.stack([leaves // k ** (depth - 1 - l) for l in range(depth)], axis=1).astype(np.int64)


@torch.no_grad()
def run(out: str = "runs/bench", quick: bool = False, shape: str | None = None, batch: int | None = None,
        prompt_len: int | None = None, max_new: int | None = None, rounds: int | None = None) -> dict:
    """Measure, print a table, write decode.json and decode.png into out; returns the results."""
    out_dir = Path(out)
    shape = shape or ("cpu-quick" if quick else "cpu")
    batch, rounds = batch or (4 if quick else 8), rounds or (1 if quick else 2)
    cfg = shape_config(shape, "scratch", "cpu")
    prompt_len = prompt_len or min(32, cfg.model.max_seq_len // 4)
    max_new = max_new or min(16 if quick else 64, cfg.model.max_seq_len - prompt_len)
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    spec = spec_from_config(cfg)
    bank = random_bank(spec, torch.device("cpu"))
    paths = _paths(spec, batch)
    memory = fetch(bank, paths).memory
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, cfg.model.vocab_size, (batch, prompt_len), generator=g).tolist()
    res = {"suite": "decode", "device": device_name(torch.device("cpu")), "torch": torch.__version__, "shape": shape,
           "batch": batch, "prompt_len": prompt_len, "max_new": max_new, "rounds": rounds,
           "ranks": list(spec.ranks), "branching": spec.branching, "variants": {}}
    print(f"hiermem bench --suite decode on {res['device']}: {shape}, {batch} prompts of {prompt_len} tokens "
          f"(distinct paths), {max_new} new tokens each", flush=True)
    generate_ids(model, prompts[:1], memory=memory.rows(slice(0, 1)), max_new_tokens=2)  # warm-up
    for _ in range(rounds):  # interleaved: a shared CPU's load comes and goes
        for label, cache, with_memory in VARIANTS:
            t = time.perf_counter()
            ids = generate_ids(model, prompts, memory=memory if with_memory else None, max_new_tokens=max_new,
                               use_cache=cache)
            seconds = time.perf_counter() - t
            assert all(len(x) == max_new for x in ids)
            tok_s = batch * max_new / seconds
            best = res["variants"].get(label, {}).get("tok_per_s", 0)
            if tok_s > best:
                res["variants"][label] = {"kv_cache": cache, "memory": with_memory, "seconds": seconds,
                                          "tok_per_s": tok_s}
    base = res["variants"]["no cache"]["tok_per_s"]
    for r in res["variants"].values():
        r["speedup_vs_no_cache"] = r["tok_per_s"] / base
    res["memory_over_anchor_cached"] = (res["variants"]["cache"]["tok_per_s"] /
                                        res["variants"]["cache, no memory"]["tok_per_s"])
    atomic_write_text(out_dir / "decode.json", json.dumps(res, indent=2) + "\n")
    print_table(res)
    plot(res, out_dir / "decode.png")
    return res


def print_table(res: dict) -> None:
    print(f"\n{'variant':<22}{'decode tok/s':>14}{'vs no cache':>13}")
    print("-" * 49)
    for label, r in res["variants"].items():
        print(f"{label:<22}{r['tok_per_s']:>14,.0f}{r['speedup_vs_no_cache']:>12.2f}x")
    print(f"\nwith the cache, memory/anchor {res['memory_over_anchor_cached']:.3f}  ({res['device']})")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(res["variants"].items())
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar([k for k, _ in items], [r["tok_per_s"] for _, r in items],
           color=["#3a7bd0" if r["memory"] else "#777777" for _, r in items])
    ax.set_ylabel("decode tokens / s (generate_ids)")
    ax.set_title(f"{res['shape']}, {res['batch']} prompts x {res['prompt_len']} tokens, {res['max_new']} new; "
                 f"{res['device']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["run"]
