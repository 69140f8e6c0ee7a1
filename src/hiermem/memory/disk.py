"""A bank on disk (memory.mmap=true): for a bank and its optimizer state larger than RAM.

Every block's record (weights, and for training its lazy-AdamW moments) lives in the store's files
(memory/store.py) and is read with pread into the block cache (memory/cache.py), whose byte budget is all the
RAM the bank takes: the generic block and the shallow levels stay pinned there, deeper blocks come and go
(LRU), and an updated block is written back when it is evicted and at every commit. With prefetch, a background
thread (memory/prefetch.py) reads the blocks of the next batches while the current step computes. Values are
the same as those of a MemoryBank with the same content, bit for bit: only where blocks sit differs (tested).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hiermem.config import default
from hiermem.errors import HiermemError
from hiermem.memory.bank import MemoryBank, _check_verify
from hiermem.memory.cache import BlockCache, pinned_parts
from hiermem.memory.files import crash_point, rows_per_chunk
from hiermem.memory.precision import as_bytes, from_bytes, to_storage
from hiermem.memory.prefetch import Prefetcher
from hiermem.memory.store import BlockStore, LegacyStore


class DiskBank(MemoryBank):
    """The MemoryBank interface over a store and a block cache (see the module docstring)."""

    on_disk = True

    def __init__(self, store: BlockStore | LegacyStore, cache_bytes: int | None = None, verify: str = "fetch",
                 writable: bool = True, prefetch: bool = False):
        _check_verify(verify)
        self.spec, self.dtype, self.dir, self.store = store.spec, store.dtype, store.dir, store
        self.writable = writable and store.writable
        self._with_state = self.writable and store.has_state  # a read-only bank serves: it never reads moments
        self._writes = {k: a.copy() for k, a in store.writes.items()}
        self._check = verify != "none"
        lay = store.layouts
        self._nbytes = {k: x.weight_bytes + (x.state_bytes if self._with_state else 0) for k, x in lay.items()}
        budget = int(cache_bytes if cache_bytes is not None else default("memory.cache_bytes"))
        part_bytes = {k: self._nbytes[k] * x.n_blocks for k, x in lay.items()}
        self.cache = BlockCache(self._load, store.write if self.writable else None, budget, self._nbytes,
                                {k: x.n_blocks for k, x in lay.items()}, pinned_parts(self.spec, part_bytes, budget))
        self.prefetcher = Prefetcher(self.cache, reserve=budget // 4) if prefetch else None
        if verify == "all":
            self.verify()

    def _load(self, key: str, ids: np.ndarray) -> list[np.ndarray]:
        return self.store.read(key, ids, self._nbytes[key], self._check)

    # -- access ----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def has_state(self) -> bool:
        return self._with_state

    def part(self, key: str) -> torch.Tensor:
        raise HiermemError(f"{self.dir}: {key} is on disk; read it with read_blocks or read_part")

    def read_part(self, key: str, field: str = "w") -> torch.Tensor:
        n = self.n_blocks(key)
        step = rows_per_chunk(self._nbytes[key])
        chunks = []
        for lo in range(0, n, step):
            ids = torch.arange(lo, min(n, lo + step))
            chunks.append(self.read_blocks(key, ids) if field == "w" else self.read_state(key, ids)["wmv".index(field)])
        return torch.cat(chunks)

    def _block_shape(self, key: str, n: int) -> tuple[int, ...]:
        return (n, *self.spec.part_shape(key)[1:])

    def read_blocks(self, key: str, ids: torch.Tensor, copy: bool = True) -> torch.Tensor:
        recs = self.cache.get(key, ids.numpy())
        wb = self.store.layouts[key].weight_bytes
        if len(recs) == 1 and not copy:
            w = recs[0][:wb]  # a cached record is never written into: a view of it is safe to read
        else:
            w = np.empty((len(recs), wb), np.uint8)
            for j, rec in enumerate(recs):
                w[j] = rec[:wb]
        return from_bytes(w, self.dtype, self._block_shape(key, len(recs))).float()

    def read_state(self, key: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._need_state()
        recs = self.cache.get(key, ids.numpy())
        lay = self.store.layouts[key]
        wb, half, n = lay.weight_bytes, lay.state_bytes // 2, len(recs)
        w = np.empty((n, wb), np.uint8)
        m = np.empty((n, half // 4), np.float32)
        v = np.empty_like(m)
        for j, rec in enumerate(recs):
            w[j], m[j], v[j] = rec[:wb], rec[wb:wb + half].view(np.float32), rec[wb + half:].view(np.float32)
        shape = self._block_shape(key, n)
        return (from_bytes(w, self.dtype, shape).float(), torch.from_numpy(m).view(shape),
                torch.from_numpy(v).view(shape))

    def write_blocks(self, key: str, ids: torch.Tensor, values: torch.Tensor) -> None:
        if self._with_state:
            _, m, v = self.read_state(key, ids)
            self.write_state(key, ids, values, m, v)
        else:
            self._put(key, ids, [values])

    def write_state(self, key: str, ids: torch.Tensor, w: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
        self._need_state()
        self._put(key, ids, [w, m, v])

    def _put(self, key: str, ids: torch.Tensor, fields: list[torch.Tensor]) -> None:
        if not self.writable:
            raise HiermemError(f"{self.dir}: bank was opened read-only")
        ids_np = ids.numpy()
        counts = self._writes[key][ids_np] + 1
        self._writes[key][ids_np] = counts
        fields = [to_storage(fields[0].cpu(), self.dtype, key, ids_np, counts)] + [f.cpu() for f in fields[1:]]
        rows = [as_bytes(f).reshape(len(ids_np), -1) for f in fields]
        self.cache.put(key, ids_np, [np.concatenate([r[j] for r in rows]) for j in range(len(ids_np))])

    def _need_state(self) -> None:
        if not self._with_state:
            why = "was opened read-only" if not self.writable else "was saved without optimizer state"
            raise HiermemError(f"{self.dir}: this bank on disk {why}; it cannot train")

    def enable_state(self) -> None:
        self._need_state()

    def hold(self, blocks: dict[str, torch.Tensor]) -> None:
        self.cache.protect({k: ids.numpy() for k, ids in blocks.items()})

    def prefetch(self, blocks: dict[str, torch.Tensor]) -> None:
        if self.prefetcher is not None:
            self.prefetcher.request({k: ids.numpy() for k, ids in blocks.items()})

    def io_stats(self) -> dict[str, int]:
        return self.cache.stats()

    def verify(self) -> None:
        """Read and check every block now, straight from disk (the cache is left as it is)."""
        for key in self.parts():
            n = self.n_blocks(key)
            step = rows_per_chunk(self._nbytes[key])
            for lo in range(0, n, step):
                self.store.read(key, np.arange(lo, min(n, lo + step)), self._nbytes[key], check=True)

    def to(self, device: str | torch.device) -> "MemoryBank":
        raise HiermemError(f"{self.dir}: a bank on disk stays on the CPU; load it with mmap=False to move it to "
                           f"{device}")

    # -- persistence -----------------------------------------------------------------------------------------
    def _records(self, key: str, ids: np.ndarray) -> np.ndarray:
        return np.stack(self.cache.get(key, ids))

    def commit(self, dir: str | Path | None = None, generation: int | None = None, gather=None) -> int:
        """Write every dirty cached block back and add a generation to the bank's store (unpublished)."""
        if not self.writable:
            raise HiermemError(f"{self.dir}: bank was opened read-only")
        if dir is not None and Path(dir).resolve() != self.dir.resolve():
            raise ValueError(f"commit: a bank on disk commits into its own folder {self.dir} (save() copies it)")
        if self.prefetcher is not None:
            self.prefetcher.drain()
        self.cache.flush(before_each=lambda: crash_point("block"))
        generation = self.store.generation + 1 if generation is None else generation
        self.store.commit(generation, self._writes, gather)
        return generation
