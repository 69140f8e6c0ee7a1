"""Learning-rate schedules: linear warmup then cosine decay to a floor (the paper's schedule shape)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, peak: float, floor: float, warmup: int) -> float:
    """LR for 0-based `step` of `total`: linear warmup to `peak` over `warmup` steps, cosine down to `floor`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if total <= warmup + 1:
        return floor if total > 1 else peak
    progress = min(1.0, (step - warmup) / (total - warmup - 1))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def span_cosine(step: int, total: int, peak: float, floor: float, warmup: int, span) -> float:
    """warmup_cosine over a longer virtual run of which this run of `total` steps covers the fraction
    span = [a, b]: two runs with spans [0, 0.5] and [0.5, 1] continue one schedule (the demo's memory run: its
    phase 1 and phase 2 follow the anchor's single cosine). span [0, 1] is warmup_cosine exactly."""
    a, b = span
    virtual = max(total, round(total / (b - a)))
    return warmup_cosine(round(a * virtual) + step, virtual, peak, floor, warmup)
