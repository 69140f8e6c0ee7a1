"""The prefetcher: one background thread that reads the blocks of the next batches into the block cache while
the current step computes, and writes dirty blocks back so that the next evictions need not wait on the disk.

The trainer knows its next batches (the sampler is deterministic), so it asks for their blocks a few steps
ahead (memory.prefetch). The thread only moves blocks between disk and RAM and never changes a value, so a run
is bit-identical with and without it (tested). It starts on the first request and ends after IDLE_S seconds
without one, so a bank that is no longer used leaves no thread behind. An error in the thread (a failed write,
a corrupted block) is raised in the caller's thread at its next request or drain.
"""

from __future__ import annotations

import queue
import threading

import numpy as np

from hiermem.memory.cache import BlockCache

IDLE_S = 0.5


class Prefetcher:
    def __init__(self, cache: BlockCache, reserve: int):
        """reserve: bytes of clean or free cache room the thread keeps available by writing back dirty blocks."""
        self.cache, self.reserve = cache, reserve
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def request(self, blocks: dict[str, np.ndarray]) -> None:
        """Read these blocks (per part, block ids) into the cache in the background."""
        self._raise()
        with self._lock:
            self._queue.put(blocks)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hiermem-prefetch", daemon=True)
                self._thread.start()

    def drain(self) -> None:
        """Wait until every request so far is done (before a checkpoint flushes the cache)."""
        self._queue.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            try:
                blocks = self._queue.get(timeout=IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            try:
                if self._error is None:
                    for key, ids in blocks.items():
                        self.cache.prefetch(key, ids)
                    self.cache.clean(self.reserve)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                self._error = e
            finally:
                self._queue.task_done()
