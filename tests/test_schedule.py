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


def test_two_spans_continue_one_schedule():
    from hiermem.train.schedule import span_cosine

    whole = [warmup_cosine(s, 200, 2e-3, 2e-4, 20) for s in range(200)]
    first = [span_cosine(s, 100, 2e-3, 2e-4, 20, (0.0, 0.5)) for s in range(100)]
    second = [span_cosine(s, 100, 2e-3, 2e-4, 20, (0.5, 1.0)) for s in range(100)]
    assert first + second == whole
    assert [span_cosine(s, 37, 1.0, 0.1, 5, (0.0, 1.0)) for s in range(37)] == \
        [warmup_cosine(s, 37, 1.0, 0.1, 5) for s in range(37)]


def test_a_bad_span_is_refused():
    from hiermem.config import load_config
    from hiermem.errors import HiermemError

    with pytest.raises(HiermemError, match=r"train.lr_span must be \[a, b\] with 0 <= a < b <= 1 \(got \[0.5, 0.5\]\)"):
        load_config(None, ["train.lr_span=[0.5,0.5]"])
