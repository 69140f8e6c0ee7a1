"""The block cache: bank blocks in RAM under a byte budget (memory.cache_bytes), for training and serving alike.

An entry is one block's record as the store keeps it (memory/store.py: weights in the storage dtype, then m and
v when the bank trains), an immutable uint8 array: put() replaces an entry's array and never writes into it, so
a caller may keep an array it was given, and a background write-back needs no lock while it writes. The budget
counts every entry resident or being loaded; nothing else the cache keeps is large. The parts named pinned (the
generic block and the shallow levels, which nearly every batch uses; see pinned_parts) are never evicted: their
whole size is reserved out of the budget, and the rest is an LRU over the deeper levels. Evicting a dirty entry
writes it back first, and flush() writes back every dirty entry (a checkpoint). What is resident changes only
the I/O, never a value (tested against a bank without a cache).

Two threads share it: the trainer's (get, put, protect, flush) and one background worker (memory/prefetch.py:
prefetch, clean). The worker evicts only clean entries, never the blocks the current step holds (protect), and
never waits on the disk while holding the lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import numpy as np

from hiermem.errors import HiermemError
from hiermem.memory.spec import GENERIC, BankSpec

Load = Callable[[str, np.ndarray], list]  # (part, block ids) -> their records, read from disk
Write = Callable[[str, int, np.ndarray], None]  # (part, block id, record) -> written back


def pinned_parts(spec: BankSpec, part_bytes: dict[str, int], budget: int) -> list[str]:
    """The generic block, then the shallowest levels, as long as all of them together fit in half the budget."""
    order = ([GENERIC] if GENERIC in part_bytes else []) + [key for key, *_ in spec.level_parts()]
    out, total = [], 0
    for key in order:
        if total + part_bytes[key] > budget // 2:
            break
        out.append(key)
        total += part_bytes[key]
    return out


class _Entry:
    __slots__ = ("buf", "dirty", "loading", "writing")

    def __init__(self) -> None:
        self.buf: np.ndarray | None = None
        self.dirty = self.writing = False
        self.loading = True


class BlockCache:
    def __init__(self, load: Load, write: Write | None, budget: int, record_bytes: dict[str, int],
                 n_blocks: dict[str, int], pinned: list[str]):
        self._load, self._write = load, write
        self.budget, self.record_bytes, self.pinned = int(budget), dict(record_bytes), frozenset(pinned)
        self.pinned_bytes = sum(n_blocks[k] * record_bytes[k] for k in self.pinned)
        self._lru_limit = self.budget - self.pinned_bytes
        self._lru: OrderedDict[tuple[str, int], _Entry] = OrderedDict()  # oldest first
        self._pin: dict[tuple[str, int], _Entry] = {}
        self._lru_bytes = self._pin_bytes = self.peak_bytes = 0
        self._protected: frozenset[tuple[str, int]] = frozenset()
        self._cond = threading.Condition()
        self._stats = dict(hits=0, misses=0, read_bytes=0, written_bytes=0, evictions=0)

    @property
    def resident_bytes(self) -> int:
        return self._lru_bytes + self._pin_bytes

    def stats(self) -> dict[str, int]:
        with self._cond:
            return dict(self._stats, resident_bytes=self.resident_bytes, peak_bytes=self.peak_bytes)

    # -- the trainer's (or server's) side ----------------------------------------------------------------
    def get(self, key: str, ids) -> list[np.ndarray]:
        """The records of blocks ids (distinct), reading the missing ones from disk."""
        ids = [int(i) for i in ids]
        found: dict[int, np.ndarray] = {}
        seen: set[int] = set()
        while len(found) < len(ids):  # more than one round if the request is larger than the cache
            todo, waiting, full = [], False, False
            with self._cond:
                for i in ids:
                    if i in found:
                        continue
                    e = self._entry(key, i)
                    if i not in seen:
                        seen.add(i)
                        self._stats["misses" if e is None else "hits"] += 1
                    if e is None:
                        if full or self._reserve(key, i, worker=False) is None:
                            full = True  # the rest once these are read (and may be evicted again)
                        else:
                            todo.append(i)
                    elif e.loading:  # the worker is reading it
                        waiting = True
                    else:
                        found[i] = e.buf
                        self._touch(key, i)
                if not todo and len(found) < len(ids):
                    if not waiting and not self._busy():
                        raise self._too_small(key)
                    self._cond.wait()
            if todo:
                found.update(zip(todo, self._fill(key, todo)))
        return [found[i] for i in ids]

    def put(self, key: str, ids, records: list[np.ndarray]) -> None:
        """New contents for blocks ids (each record a fresh array the caller no longer writes into): dirty."""
        with self._cond:
            for i, rec in zip((int(i) for i in ids), records):
                e = self._entry(key, i)  # if the worker is reading it, its stale read is dropped (_fill)
                while e is None:  # evicted since it was read (a request larger than the cache)
                    e = self._reserve(key, i, worker=False)
                    if e is None:
                        if not self._busy():
                            raise self._too_small(key)
                        self._cond.wait()
                        e = self._entry(key, i)
                e.buf, e.loading, e.dirty = rec, False, True
                self._touch(key, i)
            self._cond.notify_all()

    def protect(self, blocks: dict[str, np.ndarray]) -> None:
        """The blocks of the current step: the worker will not evict them (the step reads them again)."""
        with self._cond:
            self._protected = frozenset((k, int(i)) for k, ids in blocks.items() for i in ids)

    def flush(self, before_each: Callable[[], None] | None = None) -> int:
        """Write every dirty entry back (the worker must be idle); returns how many were written."""
        n = 0
        with self._cond:
            while any(e.writing for e in self._entries()):
                self._cond.wait()
            for (key, i), e in [*self._pin.items(), *self._lru.items()]:
                if e.dirty:
                    if before_each is not None:
                        before_each()
                    self._write(key, i, e.buf)
                    e.dirty = False
                    self._stats["written_bytes"] += len(e.buf)
                    n += 1
        return n

    # -- the worker's side ---------------------------------------------------------------------------------
    def prefetch(self, key: str, ids) -> int:
        """Read blocks ids into the cache if room can be made without I/O; returns how many were read."""
        todo = []
        with self._cond:
            for i in (int(i) for i in ids):
                if self._entry(key, i) is not None:
                    continue
                if self._reserve(key, i, worker=True) is None:
                    break
                todo.append(i)
        if todo:
            self._fill(key, todo)
        return len(todo)

    def clean(self, reserve: int) -> int:
        """Write back the oldest dirty entries until free plus clean evictable room reaches `reserve` bytes, so
        that the next misses evict without waiting on the disk; returns how many were written."""
        picks = []
        with self._cond:
            room = self._lru_limit - self._lru_bytes
            for k, e in self._lru.items():
                if room >= reserve:
                    break
                if e.loading or e.writing or k in self._protected:
                    continue
                if e.dirty:
                    e.writing = True
                    picks.append((k, e, e.buf))
                room += self.record_bytes[k[0]]
        try:
            for (key, i), _, buf in picks:
                self._write(key, i, buf)
        finally:
            with self._cond:
                for (key, _), e, buf in picks:
                    e.writing = False
                    if e.buf is buf:  # not replaced while it was being written
                        e.dirty = False
                        self._stats["written_bytes"] += len(buf)
                self._cond.notify_all()
        return len(picks)

    # -- inside the lock -----------------------------------------------------------------------------------
    def _busy(self) -> bool:
        """Some entry is being read or written: room will free up."""
        return any(e.loading or e.writing for e in self._entries())

    def _too_small(self, key: str) -> HiermemError:
        return HiermemError(f"memory.cache_bytes={self.budget}: too small, a block of {key} needs "
                            f"{self.record_bytes[key]} bytes beyond the {self.pinned_bytes} reserved for the pinned "
                            f"parts ({', '.join(sorted(self.pinned)) or 'none'})")

    def _entries(self):
        return [*self._pin.values(), *self._lru.values()]

    def _entry(self, key: str, i: int) -> _Entry | None:
        return (self._pin if key in self.pinned else self._lru).get((key, i))

    def _touch(self, key: str, i: int) -> None:
        if key not in self.pinned:
            self._lru.move_to_end((key, i))

    def _reserve(self, key: str, i: int, worker: bool) -> _Entry | None:
        """A loading entry for (key, i), evicting as needed; None when no room can be made now."""
        size = self.record_bytes[key]
        if key in self.pinned:
            e = self._pin[(key, i)] = _Entry()
            self._pin_bytes += size
        else:
            while self._lru_bytes + size > self._lru_limit:
                victim = self._victim(worker)
                if victim is None:
                    if worker or not any(e.writing for e in self._lru.values()):
                        return None  # everything left is being loaded (or, for the worker, dirty or held)
                    self._cond.wait()
                    continue
                self._evict(victim)
            e = self._lru[(key, i)] = _Entry()
            self._lru_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)
        return e

    def _victim(self, worker: bool) -> tuple[str, int] | None:
        for k, e in self._lru.items():
            if e.loading or e.writing or (worker and (e.dirty or k in self._protected)):
                continue
            return k
        return None

    def _evict(self, k: tuple[str, int]) -> None:
        e = self._lru.pop(k)
        if e.dirty:  # the trainer's thread only: written back before it goes
            self._write(k[0], k[1], e.buf)
            self._stats["written_bytes"] += len(e.buf)
        self._lru_bytes -= self.record_bytes[k[0]]
        self._stats["evictions"] += 1

    # -- outside the lock ----------------------------------------------------------------------------------
    def _fill(self, key: str, todo: list[int]) -> list[np.ndarray]:
        """Read the reserved entries todo from disk and hand them to any waiting thread."""
        try:
            recs = self._load(key, np.asarray(todo, np.int64))
        except BaseException:
            with self._cond:
                table = self._pin if key in self.pinned else self._lru
                for i in todo:
                    e = table.get((key, i))
                    if e is not None and e.loading:  # still our placeholder (a put may have taken it over)
                        del table[(key, i)]
                        if key in self.pinned:
                            self._pin_bytes -= self.record_bytes[key]
                        else:
                            self._lru_bytes -= self.record_bytes[key]
                self._cond.notify_all()
            raise
        with self._cond:
            for i, rec in zip(todo, recs):
                e = self._entry(key, i)
                if e is not None and e.loading:
                    e.buf, e.loading = rec, False
                self._stats["read_bytes"] += len(rec)
            self._cond.notify_all()
        return recs
