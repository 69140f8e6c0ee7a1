"""`hiermem bench --suite NAME`: the benchmark suites. Each suite runs the code path a user's command runs
(the train suite calls the trainer's own TrainStep), writes <out>/<suite>.json and a PNG, and prints a table.
Speed lives here, never in tests."""

from __future__ import annotations

import importlib

# name -> "module" (its run()) or "module:function"; later suites (serve, chaos) join here
SUITES = {"train": "hiermem.bench.train_throughput", "scale": "hiermem.bench.bank_scale",
          "fetch": "hiermem.bench.bank_scale:run_fetch", "distributed": "hiermem.bench.distributed"}


def run_suite(name: str, out: str, quick: bool = False, **options) -> dict:
    module, _, function = SUITES[name].partition(":")
    return getattr(importlib.import_module(module), function or "run")(out=out, quick=quick, **options)


__all__ = ["SUITES", "run_suite"]
