"""`hiermem bench --suite NAME`: the benchmark suites. Each suite runs the code path a user's command runs
(the train suite calls the trainer's own TrainStep), writes <out>/<suite>.json and a PNG, and prints a table.
Speed lives here, never in tests."""

from __future__ import annotations

import importlib

SUITES = {"train": "hiermem.bench.train_throughput"}  # later suites (scale, serve, chaos, distributed) join here


def run_suite(name: str, out: str, quick: bool = False, **options) -> dict:
    return importlib.import_module(SUITES[name]).run(out=out, quick=quick, **options)


__all__ = ["SUITES", "run_suite"]
