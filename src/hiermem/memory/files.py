"""Bank files: .npy arrays written atomically and copied in chunks, and one crc32 per block.

A bank folder holds level{l}.npy (levels with r_l > 0), generic.npy and manifest.json (format version, spec,
shapes and one crc32 per block). Big arrays are never loaded whole: copies go CHUNK_BYTES at a time.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_path

CHUNK_BYTES = 64 << 20  # copy/initialise big arrays in pieces of about this size, never whole


def crc32(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a))


def rows_per_chunk(shape: tuple[int, ...], itemsize: int = 4) -> int:
    return max(1, CHUNK_BYTES // max(1, int(np.prod(shape[1:])) * itemsize))


def save_npy(path: Path, src: np.ndarray) -> None:
    """Atomically write src as .npy; memory-mapped sources are copied in chunks, never loaded whole."""
    with atomic_path(path) as tmp:
        if isinstance(src, np.memmap):
            dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=src.shape)
            step = rows_per_chunk(src.shape, src.dtype.itemsize)
            for lo in range(0, src.shape[0], step):
                dst[lo:lo + step] = src[lo:lo + step]
            dst.flush()
            del dst
        else:
            with open(tmp, "wb") as f:
                np.save(f, src)


def open_npy(path: Path, shape: tuple[int, ...], dtype: Any, mode: str | None, what: str) -> np.ndarray:
    """np.load with mmap_mode=mode, refusing (one line) a missing, unreadable or mis-shaped file."""
    if not path.is_file():
        raise HiermemError(f"{path}: missing ({what})")
    try:
        a = np.load(path, mmap_mode=mode, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise HiermemError(f"{path}: not a readable .npy file ({e})") from None
    if a.shape != tuple(shape):
        raise HiermemError(f"{path}: shape {a.shape} does not match {what}'s {tuple(shape)}")
    if a.dtype != np.dtype(dtype):
        raise HiermemError(f"{path}: dtype {a.dtype} does not match {what}'s {np.dtype(dtype)}")
    return a
