"""Bank files: positional reads and writes, checksums, .npy headers of format-1/2 banks, and the crash hook.

Banks of format 3 (memory/store.py) are raw record files read and written with pread/pwrite, so that what
sits in RAM is exactly what the block cache holds (no memory map whose pages the kernel keeps). Big records
are read in IO_CHUNK pieces with up to two reads in flight while the previous piece is checksummed.
"""

from __future__ import annotations

import os
import signal
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from hiermem.errors import HiermemError

CHUNK_BYTES = 64 << 20  # whole-part copies (loading a bank into RAM, verify) go about this many bytes at a time
IO_CHUNK = 4 << 20  # one read of a big record: checksummed while the next piece is read
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hiermem-read")


def crc32(a: np.ndarray, value: int = 0) -> int:
    return zlib.crc32(np.ascontiguousarray(a), value)  # zlib releases the GIL on buffers over 5 KiB


def rows_per_chunk(row_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(1, row_bytes))


def _pread(fd: int, buf: np.ndarray, offset: int) -> None:
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(f"short read at offset {offset + done} (file truncated?)")
        done += n


def read_checked(fd: int, buf: np.ndarray, offset: int, spans: list[tuple[int, int]]) -> list[int]:
    """Fill buf (uint8) from fd at offset and return the crc32 of each [start, end) span of it.

    Pieces of IO_CHUNK bytes are read by a small thread pool, two ahead of the checksum, so that reading and
    checksumming a big block overlap (both release the GIL)."""
    if len(buf) <= IO_CHUNK:
        _pread(fd, buf, offset)
        return [crc32(buf[a:b]) for a, b in spans]
    cuts = sorted({0, len(buf), *(p for span in spans for p in span)})  # no piece straddles a span's end
    pieces = [(lo, min(b, lo + IO_CHUNK)) for a, b in zip(cuts, cuts[1:]) for lo in range(a, b, IO_CHUNK)]
    futures = [_POOL.submit(_pread, fd, buf[lo:hi], offset + lo) for lo, hi in pieces[:2]]
    crcs = [0] * len(spans)
    for n, (lo, hi) in enumerate(pieces):
        futures[n].result()
        if n + 2 < len(pieces):
            a, b = pieces[n + 2]
            futures.append(_POOL.submit(_pread, fd, buf[a:b], offset + a))
        for j, (a, b) in enumerate(spans):
            if a <= lo and hi <= b:
                crcs[j] = crc32(buf[lo:hi], crcs[j])
    return crcs


def pwrite_all(fd: int, buf: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(buf)).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def open_npy(path: Path, shape: tuple[int, ...], dtype: Any, what: str) -> int:
    """Validate a format-1/2 level file (shape, dtype) and return the byte offset of its data."""
    if not path.is_file():
        raise HiermemError(f"{path}: missing ({what})")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise HiermemError(f"{path}: not a readable .npy file ({e})") from None
    if a.shape != tuple(shape):
        raise HiermemError(f"{path}: shape {a.shape} does not match {what}'s {tuple(shape)}")
    if a.dtype != np.dtype(dtype):
        raise HiermemError(f"{path}: dtype {a.dtype} does not match {what}'s {np.dtype(dtype)}")
    if not a.flags.c_contiguous:
        raise HiermemError(f"{path}: not a C-ordered array ({what})")
    return int(a.offset)


_crash_counts: dict[str, int] = {}  # events of the current checkpoint, and "checkpoint": how many started


def crash_point(event: str) -> None:
    """Test hook for crash safety. With HIERMEM_TEST_CRASH="<n>:<event>:<k>" in the environment the process
    kills itself with SIGKILL (no cleanup runs, as in a power cut) at the k-th `event` of its n-th checkpoint.
    Events: "checkpoint" (a checkpoint starts), "block" (one bank block is written by the checkpoint's commit),
    "state" (the checkpoint's files are written, its state.json not yet replaced), "publish" (state.json is
    replaced, the bank's manifest.json not yet)."""
    spec = os.environ.get("HIERMEM_TEST_CRASH")
    if not spec:
        return
    if event == "checkpoint":
        started = _crash_counts.get("checkpoint", 0)
        _crash_counts.clear()
        _crash_counts["checkpoint"] = started
    _crash_counts[event] = _crash_counts.get(event, 0) + 1
    n, target, k = spec.split(":")
    if _crash_counts.get("checkpoint") == int(n) and event == target and _crash_counts[event] == int(k):
        os.kill(os.getpid(), signal.SIGKILL)
