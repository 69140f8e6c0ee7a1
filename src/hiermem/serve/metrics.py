"""GET /metrics: counters, gauges and histograms in Prometheus' text format (version 0.0.4), hand-written.

Every metric is declared once in METRICS (type, help, histogram buckets). Counters and histograms are
updated from the event loop and the engine thread (one lock); gauges, and the bank's block-cache counters,
are read when scraped, from callbacks, so they cannot drift from their source.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

METRICS = {
    "hiermem_requests_total": ("counter", "HTTP requests answered, by endpoint and status code"),
    "hiermem_request_duration_seconds": ("histogram", "time from a request's arrival to its last byte", LATENCY_BUCKETS),
    "hiermem_stage_seconds": ("histogram", "per generation request, time to its first token by stage: queue, "
                              "embed, route, fetch, prefill, and ttft in all", LATENCY_BUCKETS),
    "hiermem_batch_sequences": ("histogram", "sequences decoded together, per decoding step", BATCH_BUCKETS),
    "hiermem_prompt_tokens_total": ("counter", "prompt tokens of admitted requests"),
    "hiermem_generation_tokens_total": ("counter", "tokens generated"),
    "hiermem_bank_fetched_bytes_total": ("counter", "bytes of memory blocks fetched for requests (as stored)"),
    "hiermem_sequences_running": ("gauge", "sequences in the decoding batch"),
    "hiermem_sequences_waiting": ("gauge", "sequences queued for the batch"),
    "hiermem_block_cache_hits_total": ("counter", "block reads served from the bank's block cache (bank on disk)"),
    "hiermem_block_cache_misses_total": ("counter", "block reads that went to disk (bank on disk)"),
    "hiermem_bank_read_bytes_total": ("counter", "bytes read from the bank's files into the block cache"),
    "hiermem_block_cache_evictions_total": ("counter", "blocks evicted from the block cache"),
    "hiermem_block_cache_resident_bytes": ("gauge", "bytes held by the block cache"),
    "hiermem_block_cache_peak_bytes": ("gauge", "the most bytes the block cache has held (within memory.cache_bytes)"),
}

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = [*labels, *extra]
    if not items:
        return ""
    esc = lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in items) + "}"


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[str, dict[Labels, float]] = {}
        self._hists: dict[str, dict[Labels, list]] = {}  # [bucket counts..., sum, count]
        self._sources: dict[str, Callable[[], float | None]] = {}

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values.setdefault(name, {})
            series[key] = series.get(key, 0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        buckets = METRICS[name][2]
        key = tuple(sorted(labels.items()))
        with self._lock:
            h = self._hists.setdefault(name, {}).setdefault(key, [0] * len(buckets) + [0.0, 0])
            i = bisect.bisect_left(buckets, value)  # le is inclusive
            if i < len(buckets):  # above the last bound: counted in +Inf (the count) only
                h[i] += 1
            h[-2] += value
            h[-1] += 1

    def source(self, name: str, read: Callable[[], float | None]) -> None:
        """A gauge or counter read at scrape time (None: not exported now)."""
        self._sources[name] = read

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (for tests and the benchmark)."""
        if name in self._sources:
            return self._sources[name]() or 0
        with self._lock:
            return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0)

    def render(self) -> str:
        out = []
        with self._lock:
            values = {k: dict(v) for k, v in self._values.items()}
            hists = {k: {lk: list(h) for lk, h in v.items()} for k, v in self._hists.items()}
        for name, (kind, help, *rest) in METRICS.items():
            if name in self._sources:
                v = self._sources[name]()
                if v is None:
                    continue
                series = {(): v}
            else:
                series = values.get(name, {}) if kind != "histogram" else hists.get(name, {})
            out += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
            if kind != "histogram":
                for labels, v in sorted(series.items()):
                    out.append(f"{name}{_labels(labels)} {_num(v)}")
                continue
            for labels, h in sorted(series.items()):
                cumulative = 0
                for bound, n in zip(rest[0], h):
                    cumulative += n
                    out.append(f"{name}_bucket{_labels(labels, (('le', _num(bound)),))} {cumulative}")
                out.append(f"{name}_bucket{_labels(labels, (('le', '+Inf'),))} {h[-1]}")
                out.append(f"{name}_sum{_labels(labels)} {_num(h[-2])}")
                out.append(f"{name}_count{_labels(labels)} {h[-1]}")
        return "\n".join(out) + "\n"


__all__ = ["METRICS", "Metrics"]
