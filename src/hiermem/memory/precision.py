"""The storage dtype of a bank's weights (memory.dtype) and the rounding rule for bfloat16.

Blocks are always computed on in float32, and the lazy AdamW's moments are always float32; only the stored
weights may be bfloat16 (half the bytes to read, write and keep). Reading bf16 into float32 is exact. Writing an
updated float32 block back into bf16 uses stochastic rounding: each value becomes one of its two neighbouring
bf16 values, the upper one with probability (x - lower) / (upper - lower), so the stored value is unbiased,
E[stored] = x. Round-to-nearest would be biased exactly where it matters: an update smaller than half a bf16
ulp (2^-9 of the weight: at the paper's memory LR of 1e-4 on weights near 1/sqrt(d), most Adam updates) would be
rounded away every time, and a block would stop learning. With stochastic rounding small updates accumulate in
expectation (the bf16 weight tracks the float32 trajectory with zero-mean noise of at most one ulp per write).

The random bits are a pure function of (part, block id, how often the block was written), drawn on the bank's
device, so training stays deterministic and resume-exact; the write counts are saved with the bank.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from hiermem.errors import HiermemError

CONFIG_NAMES = {"fp32": "float32", "bf16": "bfloat16"}  # memory.dtype -> the manifest's name
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_BITS = {"float32": np.float32, "bfloat16": np.int16}  # numpy has no bfloat16: its bytes travel as int16


def storage_dtype(name: str) -> str:
    """The manifest name of a storage dtype given as a config name (fp32, bf16) or a manifest name."""
    name = CONFIG_NAMES.get(name, name)
    if name not in TORCH_DTYPES:
        raise HiermemError(f"memory.dtype: {name!r} is not a bank storage dtype (fp32, bf16)")
    return name


def itemsize(dtype: str) -> int:
    return TORCH_DTYPES[dtype].itemsize


def dtype_name(t: torch.Tensor) -> str:
    return {v: k for k, v in TORCH_DTYPES.items()}[t.dtype]


def rounding_seed(key: str, block: int, count: int) -> int:
    h = hashlib.blake2b(f"round/{key}/{block}/{count}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def round_bf16(x: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Stochastic rounding of float32 blocks x[j] to bfloat16, block j's random bits seeded by seeds[j].

    Adding 16 uniform random bits below a float32's bf16 mantissa and truncating them rounds the magnitude up
    with probability equal to the dropped fraction (the bit patterns of floats are ordered like their
    magnitudes, so the carry is exactly "round up"). Non-finite values are left as they are."""
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    for j, seed in enumerate(seeds):
        bits = x[j].contiguous().view(torch.int32)
        g = torch.Generator(device=x.device).manual_seed(seed)
        noise = torch.randint(0, 1 << 16, bits.shape, generator=g, device=x.device, dtype=torch.int32)
        rounded = ((bits + noise) & -65536).view(torch.float32)  # low 16 bits zero: exact in bf16
        out[j] = torch.where(torch.isfinite(x[j]), rounded, x[j]).to(torch.bfloat16)
    return out


def to_storage(values: torch.Tensor, dtype: str, key: str, ids: np.ndarray, counts: np.ndarray) -> torch.Tensor:
    """float32 blocks `values` [U, ...] of blocks ids as they are stored; counts: each block's write count."""
    if dtype == "float32":
        return values.to(torch.float32)
    return round_bf16(values.to(torch.float32), [rounding_seed(key, int(i), int(c)) for i, c in zip(ids, counts)])


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a CPU tensor of a storage dtype (or float32), as a flat uint8 array (a view)."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().reshape(-1).view(np.uint8)


def from_bytes(buf: np.ndarray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of storage dtype over contiguous uint8 bytes buf (no copy)."""
    t = torch.from_numpy(buf.view(_BITS[dtype]).reshape(shape))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t
