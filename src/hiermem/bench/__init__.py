"""`hiermem bench --suite NAME`: the benchmark suites. Each suite runs the code path a user's command runs
(the train suite calls the trainer's own TrainStep), writes <out>/<suite>.json and a PNG, and prints a table.
Speed lives here, never in tests."""

from __future__ import annotations

import importlib

# name -> "module" (its run()) or "module:function"
SUITES = {
    "train": "hiermem.bench.train_throughput",  # the trainer's step: anchor vs anchor + memory
    "loop": "hiermem.bench.train_loop",  # `hiermem train` itself at the paper-160m shape (CUDA): tok/s, MFU
    "data": "hiermem.bench.data_scale",  # prepare + cluster throughput and peak memory at 1x, 2x, 4x corpus
    "scale": "hiermem.bench.bank_scale",  # training with the bank + optimizer state on disk vs in RAM
    "fetch": "hiermem.bench.bank_scale:run_fetch",  # one path from disk, cold and warm, vs a raw read
    "distributed": "hiermem.bench.distributed",  # 1 vs 2 processes; bytes all-reduced per step
    "knn": "hiermem.bench.knn",  # the probing knn index (above routing.knn_ram_docs) against the exact one
    "decode": "hiermem.bench.decode",  # generation with and without the KV cache and memory
    "serve": "hiermem.bench.serve_load",  # concurrent OpenAI clients against hiermem serve
    "chaos": "hiermem.bench.chaos",  # training SIGKILLed at random instants, resumed: bitwise the uninterrupted run
    "fuzz": "hiermem.bench.fuzz",  # tests/test_fuzz.py's properties with 20x the examples; inputs and failures
}


def run_suite(name: str, out: str, quick: bool = False, **options) -> dict:
    module, _, function = SUITES[name].partition(":")
    return getattr(importlib.import_module(module), function or "run")(out=out, quick=quick, **options)


__all__ = ["SUITES", "run_suite"]
