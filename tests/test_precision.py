"""memory/precision.py: storage dtypes and the bf16 rule (stochastic rounding: a neighbour, unbiased, seeded)."""

import pytest
import torch

from hiermem.errors import HiermemError
from hiermem.memory.precision import (as_bytes, from_bytes, itemsize, round_bf16, rounding_seed, storage_dtype,
                                      to_storage)


def neighbours(x):
    """The two bf16 values around each float32 x: towards zero and away from it."""
    down = x.view(torch.int32) & -65536
    return down.view(torch.float32), (down + 65536).view(torch.float32)


def test_a_value_becomes_one_of_its_two_bf16_neighbours_and_a_bf16_value_stays():
    x = torch.randn(3, 4000, generator=torch.Generator().manual_seed(0)) * 0.05
    r = round_bf16(x, [11, 12, 13])
    assert r.dtype == torch.bfloat16
    lower, upper = neighbours(x)
    assert ((r.float() == lower) | (r.float() == upper)).all()
    assert (r.float() == upper).any() and (r.float() == lower).any()
    exact = x.to(torch.bfloat16).float()
    assert torch.equal(round_bf16(exact, [1, 2, 3]).float(), exact)
    special = torch.tensor([[float("inf"), -float("inf"), 0.0, -0.0]])
    assert torch.equal(round_bf16(special, [5]).float(), special)
    assert round_bf16(torch.tensor([[float("nan")]]), [5]).isnan().all()


def test_the_rounding_is_unbiased_so_small_updates_add_up():
    """100 updates of 1e-5 each on weights of 0.05 (bf16 spacing there: 2.4e-4, 24x an update): round-to-nearest
    never moves, stochastic rounding ends where float32 does, on average."""
    sr = torch.full((1, 512), 0.05).to(torch.bfloat16)
    nearest = sr.clone()
    for n in range(100):
        sr = round_bf16(sr.float() + 1e-5, [rounding_seed("level1", 7, n)])
        nearest = (nearest.float() + 1e-5).to(torch.bfloat16)
    start = torch.tensor(0.05).to(torch.bfloat16).float()
    assert torch.equal(nearest.float(), start.expand(1, 512))  # stuck
    assert sr.float().mean().item() == pytest.approx(start.item() + 100 * 1e-5, abs=1e-4)


def test_the_random_bits_are_a_function_of_the_seed():
    x = torch.randn(2, 2000, generator=torch.Generator().manual_seed(1))
    a, b = round_bf16(x, [3, 4]), round_bf16(x, [3, 4])
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert not torch.equal(round_bf16(x, [3, 5])[1].view(torch.int16), a[1].view(torch.int16))
    assert rounding_seed("level0", 1, 2) == rounding_seed("level0", 1, 2) != rounding_seed("level0", 1, 3)


def test_storage_dtypes():
    assert storage_dtype("fp32") == storage_dtype("float32") == "float32"
    assert storage_dtype("bf16") == "bfloat16" and itemsize("bfloat16") == 2 and itemsize("float32") == 4
    with pytest.raises(HiermemError, match=r"^memory\.dtype: 'fp16' is not a bank storage dtype \(fp32, bf16\)$"):
        storage_dtype("fp16")
    x = torch.randn(2, 3, 4)
    assert to_storage(x, "float32", "level0", [0, 1], [1, 1]) is x  # float32 is stored as it is
    for dtype in ("float32", "bfloat16"):
        t = to_storage(x, dtype, "level0", [0, 1], [1, 1])
        assert torch.equal(from_bytes(as_bytes(t), dtype, (2, 3, 4)).float(), t.float())
