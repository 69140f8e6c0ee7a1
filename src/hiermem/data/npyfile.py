"""A 1-d .npy file written by appending, finalised in place, resumable after a crash.

The file starts with the header numpy writes for shape (0,); data is appended behind it and `finalize`
rewrites the header with the final length. numpy pads a 1-d header with room for the length to grow
(GROWTH_AXIS_MAX_DIGITS), so the data never moves and the finished file is byte-identical to
np.save(path, array). `count=None` creates the file; reopening with `count=n` truncates it to the first n
items (what a progress record said was durable) and appends from there. Only a bounded buffer is in RAM.
"""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path

import numpy as np

BUFFER_ITEMS = 1 << 16  # appended items held before they are written
MMAP_ORDER_ROWS = 1 << 22  # permutation(): from this many items on (with a work_dir), in a memory-mapped file
_names = itertools.count()


class CannotResume(ValueError):
    """The file is missing or holds fewer items than a resume asked for."""


class NpyAppender:
    def __init__(self, path: str | Path, dtype, count: int | None = None):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self._header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False}
        self._pending: list[np.ndarray] = []
        self._n_pending = 0
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, {**self._header, "shape": (0,)})
        self._start = head.tell()  # the same for any length (growth padding)
        if count is None:
            count = 0
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "wb+")
        else:  # the header may be anything (even half-rewritten by a finalize that was killed): rewrite it
            try:
                self._f = open(self.path, "rb+")
            except FileNotFoundError:
                raise CannotResume(f"{self.path}: cannot resume at {count} items (no such file)") from None
            size = os.fstat(self._f.fileno()).st_size
            if size < self._start + count * self.dtype.itemsize:
                self._f.close()
                raise CannotResume(f"{self.path}: cannot resume at {count} items (the file holds fewer)")
            self._f.truncate(self._start + count * self.dtype.itemsize)
        self._f.write(head.getvalue())
        self._f.seek(0, os.SEEK_END)
        self.count = count

    def append(self, values) -> None:
        arr = np.asarray(values)
        if arr.dtype != self.dtype:
            arr = arr.astype(self.dtype)
        arr = arr.reshape(-1)
        self._pending.append(arr)
        self._n_pending += arr.size
        self.count += arr.size
        if self._n_pending >= BUFFER_ITEMS:
            self._write()

    def _write(self) -> None:
        for arr in self._pending:
            self._f.write(arr.tobytes())
        self._pending, self._n_pending = [], 0

    def flush(self, fsync: bool = True) -> None:
        """Make every appended item durable (what a progress record may then claim)."""
        self._write()
        self._f.flush()
        if fsync:
            os.fsync(self._f.fileno())

    def finalize(self) -> None:
        """Write the header for the final length and close: a complete .npy file."""
        self._write()
        self._f.seek(0)
        np.lib.format.write_array_header_1_0(self._f, {**self._header, "shape": (self.count,)})
        if self._f.tell() != self._start:  # cannot happen with numpy >= 1.24 (growth padding)
            raise RuntimeError(f"{self.path}: npy header size changed; cannot finalise in place")
        self.flush()
        self._f.close()

    def close(self) -> None:
        """Close without finalising (a crash path: the file stays resumable)."""
        if not self._f.closed:
            self._f.close()


def counting_sort(chunks, counts: np.ndarray, path: str | Path) -> np.ndarray:
    """Items grouped by group, in a memory-mapped int64 .npy at path: chunks() yields (items, their group
    positions in 0 .. len(counts) - 1) and counts[g] is how many items it yields for group g in all; inside a
    group the items keep the order they come in. Holds one chunk at a time, whatever the number of items."""
    counts = np.asarray(counts, np.int64)
    order = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(int(counts.sum()),))
    cursor = np.cumsum(counts) - counts  # next free position of each group
    for items, at in chunks():
        by = np.argsort(at, kind="stable")
        at_sorted = at[by]
        run_start = np.searchsorted(at_sorted, at_sorted)  # first entry of each entry's group in the chunk
        order[cursor[at_sorted] + np.arange(len(by)) - run_start] = items[by]
        cursor += np.bincount(at, minlength=len(counts))
    return order


def shuffled_arange(n: int, rng: np.random.Generator, path: str | Path, chunk: int = 1 << 16) -> np.ndarray:
    """rng.permutation(n), the same draws (Generator.permutation(n) is Generator.shuffle(arange(n))), in a
    memory-mapped int64 file at path that is unlinked as soon as it is mapped: the map lives as long as the array,
    its pages are file-backed (reclaimable) instead of anonymous memory, and a process killed mid-shuffle leaves
    nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    perm = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(n,))
    path.unlink()  # the mapping keeps the unnamed file until the array is dropped
    for a in range(0, n, chunk):
        perm[a : a + chunk] = np.arange(a, min(n, a + chunk))
    # shuffle a plain-ndarray view of the map: Generator.shuffle takes a per-element Python path on a subclass
    rng.shuffle(np.asarray(perm))
    return perm


def permutation(n: int, rng: np.random.Generator, work_dir: str | Path | None = None) -> np.ndarray:
    """rng.permutation(n): in RAM, or with a work_dir and from MMAP_ORDER_ROWS items on, shuffled_arange in a
    hidden file there (8 bytes an item that are not anonymous memory; the same order either way)."""
    if work_dir is None or n < MMAP_ORDER_ROWS:
        return rng.permutation(n)
    return shuffled_arange(n, rng, Path(work_dir) / f".order-{os.getpid()}-{next(_names)}.npy")
