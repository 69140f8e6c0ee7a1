"""The memory bank: the parameter blocks of every tree node, in RAM (or on the GPU) or on disk, checksummed.

A part (memory/spec.py) is one array [n_nodes, n_mem_layers, S, r, d] (S = 3 for ffn memory; memory.kind) in the
bank's storage dtype, float32 or bfloat16 (memory.dtype; memory/precision.py); blocks are always handed out and
taken back as float32. The bank also holds the lazy AdamW's moments of its blocks (memory/optim.py), so that a block
and its optimizer state are stored, cached and checkpointed together. MemoryBank keeps everything in RAM; DiskBank
(memory/disk.py, memory.mmap=true) keeps it in files behind a block cache with a byte budget, for a bank and
optimizer state larger than RAM. A MemoryBank may also be a shard (`held`): only the blocks one rank of a job
fetches (memory/shard.py), in rows of their own, addressed by their global ids like any bank's. Both offer the same
interface: read_blocks / write_blocks (weights), read_state / write_state (weights with their moments), update_state
(the optimizer's way in: in place in a float32 RAM bank, copies elsewhere), and commit / publish / save
(memory/store.py: format 3, incremental and crash-safe). Every block read from a file is checked against its crc32
(a RAM bank checks each block the first time it is read). Fetching a batch's blocks is memory/fetch.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch

from hiermem.errors import HiermemError
from hiermem.memory.files import crash_point, crc32, rows_per_chunk
from hiermem.memory.precision import TORCH_DTYPES, as_bytes, dtype_name, from_bytes, itemsize, storage_dtype, to_storage
from hiermem.memory.spec import GENERIC, BankSpec
from hiermem.memory.store import FORMAT, FORMAT_VERSION, MANIFEST, BlockStore, LegacyStore, block_name, open_store
from hiermem.model.fetched import DOWN
from hiermem.model.memory_kinds import init_layer

VERIFY = ("fetch", "all", "none")


def _block_seed(seed: int, key: str, i: int) -> int:
    # one generator per block: values do not depend on chunking, so RAM and on-disk banks are identical
    h = hashlib.blake2b(f"{seed}/{key}/{i}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def _init_block(spec: BankSpec, seed: int, key: str, i: int) -> torch.Tensor:
    """Block i of part key, from its own generator. ffn: gate and up rows trunc-normal, down rows zero; the other
    kinds layer by layer (model/memory_kinds.py: LoRA A Kaiming-uniform and B zero, kv keys trunc-normal and
    values zero). Either way an untrained memory has no effect."""
    block = torch.zeros(spec.part_shape(key)[1:])
    g = torch.Generator().manual_seed(_block_seed(seed, key, i))
    s = spec.std
    if spec.kind == "ffn":
        torch.nn.init.trunc_normal_(block.narrow(1, 0, DOWN), std=s, a=-3 * s, b=3 * s, generator=g)  # gate + up
        return block
    for layer in block:
        init_layer(spec.memory_kind, layer, s, g)
    return block


def _in_parallel(make, n: int, threads: int, window: int = 64):
    """(i, make(i)) for i in 0..n-1, in order, computed by `threads` threads (torch's kernels release the GIL).
    Each block has its own generator, so the values are a serial loop's; at most `window` blocks are in flight,
    so an on-disk bank is never held in RAM whole. (The paper's 4.6B-parameter bank takes about 3 minutes to
    initialise on one thread.)"""
    workers = max(1, min(threads, n))
    if workers == 1:
        yield from ((i, make(i)) for i in range(n))
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="hiermem-init") as pool:
        for a in range(0, n, window):
            ids = range(a, min(n, a + window))
            yield from zip(ids, pool.map(make, ids))


def _check_verify(verify: str) -> None:
    if verify not in VERIFY:
        raise ValueError(f"verify must be 'fetch', 'all' or 'none', got {verify!r}")


class MemoryBank:
    """A bank in RAM: one tensor per part (plus the moments once an optimizer is attached), checksums of what
    was read from a file, and the folder it was loaded from or last committed to (its own `dir`).

    held (a shard): per part, the ascending global ids of the blocks this bank holds; its tensors then have one
    row per held block, in that order, and every access by global id maps through it (a block not held is an
    error, never a silent zero). The per-block bookkeeping (checksum, write count, flags: a few bytes a block)
    stays global-sized, as the store's block table is; the blocks and their moments are the shard's only."""

    on_disk = False
    _held: dict[str, np.ndarray] | None = None  # None: every block, row i = block i

    def __init__(self, spec: BankSpec, arrays: dict[str, torch.Tensor], checksums: dict[str, np.ndarray], *,
                 dir: Path | None = None, verified: bool = True, writable: bool = True,
                 state: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 writes: dict[str, np.ndarray] | None = None, store: BlockStore | LegacyStore | None = None,
                 held: dict[str, np.ndarray] | None = None):
        self.spec, self.writable = spec, writable
        self._held = None if held is None else {k: np.asarray(held[k], np.int64) for k in arrays}
        self.dir = None if dir is None else Path(dir)
        self.dtype = dtype_name(next(iter(arrays.values())))
        self.store = store  # the store in dir that an in-place commit extends (None: none yet)
        self._t = arrays
        self._state = state  # part -> (m, v), float32 like the part; None until an optimizer is attached
        self._crc = checksums  # crc32 of every block as read from its file
        n = {k: spec.part_shape(k)[0] for k in arrays}
        self._dirty = {k: np.zeros(n[k], bool) for k in arrays}  # written since the last commit into dir
        self._verified = {k: np.full(n[k], verified) for k in arrays}
        self._writes = writes if writes is not None else {k: np.zeros(n[k], np.int64) for k in arrays}

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, spec: BankSpec, seed: int, dir: str | Path | None = None, *, dtype: str = "float32",
               weights_from: "MemoryBank | None" = None, cache_bytes: int | None = None,
               prefetch: bool = False) -> "MemoryBank":
        """Fresh bank: gate/up rows trunc-normal(std, ±3σ), down rows zero (other kinds: _init_block), deterministic
        per seed (or the
        weights of the bank weights_from, e.g. train.init_from's); no optimizer moments yet (zeros).

        With dir, the bank is made on disk block by block (a DiskBank with room for its moments) and committed
        and published as generation 0."""
        dtype = storage_dtype(dtype)
        if weights_from is not None:
            weights_from.check_compatible(spec)

        threads = 1 if weights_from is not None else torch.get_num_threads()  # (a bank's reads are not threaded)

        def block(key: str, i: int) -> torch.Tensor:  # [1, *block] in the storage dtype
            w = (weights_from.read_blocks(key, torch.tensor([i])) if weights_from is not None
                 else _init_block(spec, seed, key, i)[None])
            return to_storage(w, dtype, key, np.array([i]), np.zeros(1, np.int64))

        def blocks(key: str):  # (i, block(key, i)) for every block of part key, in order
            return _in_parallel(lambda i: block(key, i), spec.part_shape(key)[0], threads)

        if dir is None:
            arrays = {}
            for key in spec.part_keys():
                shape = spec.part_shape(key)
                arrays[key] = torch.empty(shape, dtype=TORCH_DTYPES[dtype])
                for i, b in blocks(key):
                    arrays[key][i] = b[0]
            return cls(spec, arrays, {k: np.zeros(len(a), np.uint32) for k, a in arrays.items()})
        from hiermem.memory.disk import DiskBank  # (disk.py builds on this module)

        dir = Path(dir)
        if (dir / MANIFEST).exists():
            raise HiermemError(f"{dir}: already holds a memory bank; refusing to overwrite it")
        store = BlockStore.create(dir, spec, dtype, state=True)
        for key in spec.part_keys():
            for i, b in blocks(key):
                store.write(key, i, as_bytes(b))  # weights only: the moments stay holes, zeros
        store.commit(0, store.writes)
        store.publish()
        return DiskBank(store, cache_bytes=cache_bytes, prefetch=prefetch)

    @classmethod
    def load(cls, dir: str | Path, mmap: bool = True, verify: str = "fetch", writable: bool = True,
             generation: int | None = None, cache_bytes: int | None = None, prefetch: bool = False,
             held: dict[str, np.ndarray] | None = None) -> "MemoryBank":
        """Open a saved bank at its published generation (or at `generation`, e.g. a checkpoint's).

        mmap: keep it on disk behind a block cache of cache_bytes (a DiskBank; prefetch: with a background
        reader), else read it into RAM. A writable bank comes with its optimizer moments (to resume); a
        read-only one with its weights only. verify: "fetch" checks each block when it is first read (on disk:
        every time it is read from disk), "all" checks everything now, "none" trusts the files.
        held (in RAM only): read just these blocks (per part, ascending global ids), a shard of the bank."""
        _check_verify(verify)
        if held is not None and mmap:
            raise ValueError("load: a bank on disk reads only the blocks it is asked for; held is for mmap=False")
        store = open_store(dir, generation, writable=writable)
        if mmap:
            if writable and isinstance(store, LegacyStore):
                raise HiermemError(f"{store.dir / MANIFEST}: a format-{store.version} bank opens on disk only "
                                   "read-only (writable=False); load it into RAM (mmap=False) to change it")
            from hiermem.memory.disk import DiskBank

            return DiskBank(store, cache_bytes=cache_bytes, verify=verify, writable=writable, prefetch=prefetch)
        with_state = writable and store.has_state
        arrays, state = {}, ({} if with_state else None)
        for key, lay in store.layouts.items():
            rows = np.arange(lay.n_blocks) if held is None else np.asarray(held[key], np.int64)
            n, wb, half = len(rows), lay.weight_bytes, lay.state_bytes // 2
            w = np.empty((n, wb), np.uint8)
            m = np.empty((n, half // 4), np.float32) if with_state else None
            v = np.empty_like(m) if with_state else None
            nbytes = wb + (lay.state_bytes if with_state else 0)
            step = rows_per_chunk(nbytes)
            shape = (n, *lay.shape[1:])
            for lo in range(0, n, step):
                ids = rows[lo:lo + step]
                for j, i, rec in zip(range(lo, lo + len(ids)), ids, store.read(key, ids, nbytes, check=False)):
                    w[j] = rec[:wb]
                    if with_state:
                        if verify != "none" and crc32(rec[wb:]) != store.crc_s[key][i]:
                            raise HiermemError(f"{store.file_of(key, int(i))}: the optimizer state of "
                                               f"{block_name(key, int(i))} is corrupted (checksum mismatch)")
                        m[j], v[j] = rec[wb:wb + half].view(np.float32), rec[wb + half:].view(np.float32)
            arrays[key] = from_bytes(w.reshape(-1), store.dtype, shape)
            if with_state:
                state[key] = (torch.from_numpy(m.reshape(shape)), torch.from_numpy(v.reshape(shape)))
        bank = cls(store.spec, arrays, dict(store.crc_w), dir=Path(dir), verified=verify == "none",
                   writable=writable, state=state, writes={k: a.copy() for k, a in store.writes.items()},
                   store=store, held=held)
        if verify == "all":
            bank.verify()
        return bank

    def check_compatible(self, spec: BankSpec, prefix: str = "memory") -> None:
        """Refuse a config whose memory shape differs from this bank's, naming the first differing field."""
        for f in dataclasses.fields(BankSpec):
            if f.name == "init_std":  # only matters at creation
                continue
            have, want = getattr(self.spec, f.name), getattr(spec, f.name)
            if have != want:
                raise HiermemError(f"{prefix}.{f.name}: bank has {have}, config has {want}")

    # -- access ----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(iter(self._t.values())).device

    @property
    def has_state(self) -> bool:
        return self._state is not None

    def parts(self) -> list[str]:
        return self.spec.part_keys()

    def n_blocks(self, key: str) -> int:
        return self.spec.part_shape(key)[0]

    def held(self, key: str) -> np.ndarray:
        """The global ids of the blocks of part `key` this bank holds, ascending (all of them unless a shard)."""
        return np.arange(self.n_blocks(key)) if self._held is None else self._held[key]

    def local_rows(self, key: str, ids: np.ndarray) -> np.ndarray:
        """The rows of blocks ids (global) in this bank's tensors; a block a shard does not hold is an error:
        its rank's sampler never fetches it, so asking for it is a bug, not a miss."""
        if self._held is None:
            return ids
        held = self._held[key]
        rows = np.minimum(np.searchsorted(held, ids), max(0, len(held) - 1))
        missing = (held[rows] != ids) if len(held) else np.ones(len(ids), bool)
        if missing.any():
            raise HiermemError(f"{block_name(key, int(ids[np.argmax(missing)]))} is not held by this bank shard "
                               "(a rank holds its own subtrees' blocks and the shared ones only)")
        return rows

    def _rows(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        """local_rows as an index tensor on the bank's device (copied without waiting for the device)."""
        if self._held is None:
            return ids.to(self.device, non_blocking=True)
        return torch.from_numpy(self.local_rows(key, ids.numpy())).to(self.device, non_blocking=True)

    def resident_bytes(self) -> int:
        """Bytes of the tensors this bank keeps in memory: its blocks' weights and, once attached, moments."""
        tensors = [*self._t.values(), *(t for mv in (self._state or {}).values() for t in mv)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def block_bytes(self, key: str) -> int:
        """Bytes of one block's weights as stored (what a fetch of it reads)."""
        return int(np.prod(self.spec.part_shape(key)[1:])) * itemsize(self.dtype)

    def part(self, key: str) -> torch.Tensor:
        """The live tensor of a part (storage dtype; a shard's: one row per held block)."""
        return self._t[key]

    def read_part(self, key: str, field: str = "w") -> torch.Tensor:
        """A float32 copy of a whole part: its weights ("w") or a moment ("m", "v")."""
        if self._held is not None:
            raise HiermemError(f"{self.dir}: this bank is a shard; read its blocks with read_blocks(held(key))")
        if field == "w":
            return self._t[key].float().clone()
        return self._state[key]["mv".index(field)].clone()

    def read_blocks(self, key: str, ids: torch.Tensor, copy: bool = True) -> torch.Tensor:
        """float32 blocks ids (distinct, cpu int64) of a part, checked on first read. A RAM bank always hands
        out a copy; copy=False lets a bank on disk hand out a view of a cached block (read-only use)."""
        t = self._t[key]
        blocks = t.index_select(0, self._rows(key, ids))
        ids_np = ids.numpy()
        for j in np.nonzero(~self._verified[key][ids_np])[0].tolist():
            i = int(ids_np[j])
            if crc32(as_bytes(blocks[j].cpu())) != self._crc[key][i]:
                raise HiermemError(f"{self.store.file_of(key, i)}: {block_name(key, i)} is corrupted "
                                   "(checksum mismatch)")
            self._verified[key][i] = True
        return blocks.float()

    def write_blocks(self, key: str, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite blocks ids of a part with float32 values (stored in the bank's dtype)."""
        if not self.writable:
            raise HiermemError(f"{self.dir}: bank was opened read-only")
        t = self._t[key]
        rows = self._rows(key, ids)  # before any bookkeeping: a block not held changes nothing
        ids_np = ids.numpy()
        counts = self._written(key, ids_np)
        t.index_copy_(0, rows, to_storage(values.to(t.device), self.dtype, key, ids_np, counts))

    def _written(self, key: str, ids_np: np.ndarray) -> np.ndarray:
        """Bookkeeping of a write of blocks ids: their write counts (returned: bf16 rounding seeds), dirty."""
        counts = self._writes[key][ids_np] + 1
        self._writes[key][ids_np] = counts
        self._dirty[key][ids_np] = True
        self._verified[key][ids_np] = True  # the content is now ours, not the file's
        return counts

    def enable_state(self) -> None:
        """Give every block optimizer moments (zeros) unless the bank already has them (e.g. loaded to resume)."""
        if self._state is None:
            self._state = {k: (torch.zeros(t.shape, device=t.device), torch.zeros(t.shape, device=t.device))
                           for k, t in self._t.items()}

    def read_state(self, key: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float32 copies of blocks ids and of their moments m and v."""
        m_all, v_all = self._state[key]
        idx = self._rows(key, ids)
        return self.read_blocks(key, ids), m_all.index_select(0, idx), v_all.index_select(0, idx)

    def write_state(self, key: str, ids: torch.Tensor, w: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
        m_all, v_all = self._state[key]
        idx = self._rows(key, ids)
        m_all.index_copy_(0, idx, m)
        v_all.index_copy_(0, idx, v)
        self.write_blocks(key, ids, w)

    def update_state(self, key: str, ids: torch.Tensor, update) -> None:
        """update(w, m, v) changes blocks ids (distinct, cpu int64) and their moments in place, given as three
        lists of float32 tensors, one per block. A float32 bank in RAM hands out views of its own rows: nothing
        is copied (on the GPU, no gather before the optimizer and no scatter after it). Any other bank hands out
        copies (read_state) and stores what update made of them (write_state)."""
        if self.on_disk or self.dtype != "float32":
            w, m, v = self.read_state(key, ids)
            update(list(w.unbind(0)), list(m.unbind(0)), list(v.unbind(0)))
            self.write_state(key, ids, w, m, v)
            return
        if not self.writable:
            raise HiermemError(f"{self.dir}: bank was opened read-only")
        ids_np = ids.numpy()
        rows = self.local_rows(key, ids_np).tolist()  # before any bookkeeping: a block not held changes nothing
        unverified = ~self._verified[key][ids_np]
        if unverified.any():  # a block read from a file is checked before it changes (fetch normally did)
            self.read_blocks(key, ids[torch.from_numpy(unverified)])
        t, (m_all, v_all) = self._t[key], self._state[key]
        update([t[r] for r in rows], [m_all[r] for r in rows], [v_all[r] for r in rows])
        self._written(key, ids_np)

    def hold(self, blocks: dict[str, torch.Tensor]) -> None:
        """The blocks the current training step uses (a bank on disk keeps them cached until it writes them)."""

    def prefetch(self, blocks: dict[str, torch.Tensor]) -> None:
        """Blocks an upcoming step will use (a bank on disk reads them in the background)."""

    def io_stats(self) -> dict[str, int]:
        """Disk traffic and cache counters of a bank on disk ({} in RAM)."""
        return {}

    def verify(self) -> None:
        """Check every not-yet-verified block now (chunk by chunk)."""
        for key in self.parts():
            held = self.held(key)
            todo = held[~self._verified[key][held]]
            step = rows_per_chunk(self.block_bytes(key))
            for lo in range(0, len(todo), step):
                self.read_blocks(key, torch.from_numpy(todo[lo:lo + step]))

    def to(self, device: str | torch.device) -> "MemoryBank":
        """Move the bank (and its moments) e.g. onto the GPU, where fetch is a device gather. Verifies it first."""
        self.verify()
        self._t = {k: t.to(device) for k, t in self._t.items()}
        if self._state is not None:
            self._state = {k: (m.to(device), v.to(device)) for k, (m, v) in self._state.items()}
        return self

    # -- persistence -----------------------------------------------------------------------------------------
    def _records(self, key: str, ids: np.ndarray) -> np.ndarray:
        """The stored records of blocks ids, [U, bytes]: weights in the storage dtype, then m and v if any."""
        idx = self._rows(key, torch.from_numpy(ids))
        parts = [self._t[key].index_select(0, idx).cpu()]
        if self._state is not None:
            parts += [s.index_select(0, idx).cpu() for s in self._state[key]]
        return np.concatenate([as_bytes(p).reshape(len(ids), -1) for p in parts], axis=1)

    def _write_records(self, store: BlockStore, blocks: dict[str, np.ndarray], checkpoint: bool) -> None:
        for key, ids in blocks.items():
            step = rows_per_chunk(store.layouts[key].record_bytes)
            for lo in range(0, len(ids), step):
                chunk = ids[lo:lo + step]
                for i, rec in zip(chunk.tolist(), self._records(key, chunk)):
                    if checkpoint:
                        crash_point("block")
                    store.write(key, i, rec)

    def _own_store(self, dir: Path) -> BlockStore | None:
        """The store an incremental commit into dir extends: the bank's own, if it is a writable format-3 store
        in dir with the bank's layout."""
        s = self.store
        if (isinstance(s, BlockStore) and s.writable and self.dir is not None and dir.resolve() == self.dir.resolve()
                and s.has_state == self.has_state):
            return s
        return None

    def commit(self, dir: str | Path | None = None, generation: int | None = None, gather=None) -> int:
        """Add a generation to the store in dir (default: the bank's own folder), unpublished, and return its
        number: the blocks written since the last commit there, or every block when dir is another folder,
        which then becomes the bank's own. The caller commits its own state, then calls publish().
        gather: the collective of a bank sharded over ranks (BlockStore.commit); its own store only."""
        if not self.writable:
            raise HiermemError(f"{self.dir}: bank was opened read-only")
        target = Path(dir) if dir is not None else self.dir
        if target is None:
            raise ValueError("commit: this bank has no folder; pass one")
        store = self._own_store(target)
        if store is None:
            if gather is not None or self._held is not None:
                raise ValueError("commit: a sharded bank commits into the store it was loaded from")
            store = BlockStore.create(target, self.spec, self.dtype, state=self.has_state)
            blocks = {k: np.arange(self.n_blocks(k)) for k in self.parts()}
        else:
            blocks = {k: np.flatnonzero(self._dirty[k]) for k in self.parts()}
        self._write_records(store, blocks, checkpoint=True)
        generation = store.generation + 1 if generation is None else generation
        store.commit(generation, self._writes, gather)
        self.store, self.dir = store, target
        for d in self._dirty.values():
            d[:] = False
        return generation

    def publish(self) -> None:
        """Make the last committed generation the one dir/manifest.json names (and drop older ones' tables)."""
        if not isinstance(self.store, BlockStore):
            raise ValueError("publish: nothing committed yet")
        self.store.publish()

    def save(self, dir: str | Path | None = None) -> None:
        """A complete, published bank in dir: in the bank's own folder a new generation (only the blocks written
        since the last commit); in any other folder a full copy (the bank's own folder stays what it was)."""
        target = Path(dir) if dir is not None else self.dir
        if target is None:
            raise ValueError("save: this bank has no folder; pass one")
        if self.dir is not None and target.resolve() == self.dir.resolve():
            self.commit()
            self.publish()
            return
        if self._held is not None:
            raise HiermemError(f"{target}: a bank shard cannot be saved as a whole bank (its ranks commit together)")
        store = BlockStore.create(target, self.spec, self.dtype, state=self.has_state)
        self._write_records(store, {k: np.arange(self.n_blocks(k)) for k in self.parts()}, checkpoint=False)
        store.commit(store.generation + 1, self._writes)
        store.publish()

    def __repr__(self) -> str:
        s = self.spec
        return (f"{type(self).__name__}(ranks={s.ranks}, branching={s.branching}, d={s.d}, layers={s.first_layer}.."
                f"{s.first_layer + s.n_mem_layers - 1}, dtype={self.dtype}, dir={self.dir})")


__all__ = ["FORMAT", "FORMAT_VERSION", "GENERIC", "MANIFEST", "MemoryBank", "VERIFY"]
