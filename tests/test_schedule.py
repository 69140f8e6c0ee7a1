import math

import pytest

from hiermem.train.schedule import warmup_cosine


def test_warmup_then_cosine_endpoints():
    lrs = [warmup_cosine(s, 100, 1e-3, 1e-5, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    mid = warmup_cosine(10 + 89 // 2, 100, 1e-3, 1e-5, 10)
    assert mid == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * (44 / 89))))


def test_no_warmup_and_degenerate_lengths():
    assert warmup_cosine(0, 50, 2.0, 0.0, 0) == pytest.approx(2.0)
    assert warmup_cosine(0, 1, 2.0, 0.5, 0) == 2.0
