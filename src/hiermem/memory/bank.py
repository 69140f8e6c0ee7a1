"""The memory bank: one parameter block per tree node, stored level by level.

Level l is one float32 array [n_nodes(l), n_mem_layers, 3, r_l, d], so a block is one contiguous extent in RAM
and on disk (index 2 of the "3" axis: GATE rows A, UP rows B, DOWN rows of C^T, as in model/fetched.py).
A bank folder holds level{l}.npy (levels with r_l > 0), generic.npy and manifest.json (spec, shapes and one
crc32 per block). Banks larger than RAM are memory-mapped: blocks are read on demand and written in place.

Inside the package every array is a "part" named by its file stem: "level0", "level1", ..., "generic".
Paths hold, per level, the node's index within that level (0 <= id < branching**(level+1)).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_path, atomic_write_json
from hiermem.memory.dispatch import GroupedMemory, MemoryPart
from hiermem.model.fetched import DOWN, FetchedMemory

GENERIC = "generic"
MANIFEST = "manifest.json"
FORMAT = "hiermem-bank/1"
CHUNK_BYTES = 64 << 20  # copy/initialise big arrays in pieces of about this size, never whole


# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BankSpec:
    d: int
    n_layers: int
    ranks: tuple[int, ...]  # r_l per tree level (paper's (r1, r2, r3, r4)); 0 = no memory at that level
    branching: int
    layers: tuple[int, int] | None = None  # [start, end) of model layers carrying memory; None = all
    generic: bool = True  # an extra non-retrieved block of size sum(ranks): the generic-memory control
    init_std: float | None = None  # None -> 1/sqrt(d) (OpenLM), truncated at ±3σ

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if self.d <= 0 or self.n_layers <= 0:
            raise HiermemError(f"memory: d and n_layers must be positive, got d={self.d}, n_layers={self.n_layers}")
        if not self.ranks or any(r < 0 for r in self.ranks) or sum(self.ranks) == 0:
            raise HiermemError(f"memory.ranks: need one rank >= 0 per tree level and at least one > 0, "
                               f"got {self.ranks}")
        if self.branching < 1:
            raise HiermemError(f"memory.branching: must be >= 1, got {self.branching}")
        if self.layers is not None:
            lo, hi = self.layers if len(self.layers) == 2 else (-1, -1)
            if not 0 <= lo < hi <= self.n_layers:
                raise HiermemError(f"memory.layers: need [start, end) with 0 <= start < end <= {self.n_layers}, "
                                   f"got {self.layers}")
        if self.init_std is not None and not self.init_std > 0:
            raise HiermemError(f"memory.init_std: must be > 0, got {self.init_std}")

    @property
    def depth(self) -> int:
        return len(self.ranks)

    @property
    def first_layer(self) -> int:
        return 0 if self.layers is None else self.layers[0]

    @property
    def n_mem_layers(self) -> int:
        return self.n_layers if self.layers is None else self.layers[1] - self.layers[0]

    @property
    def fetched_rank(self) -> int:
        return sum(self.ranks)

    @property
    def std(self) -> float:
        return self.init_std if self.init_std is not None else self.d ** -0.5

    def n_nodes(self, level: int) -> int:
        return self.branching ** (level + 1)

    def level_parts(self) -> list[tuple[str, int, int, int]]:
        """(key, level, offset, rank) for each level that has memory; offset = its start along the fetched R."""
        out, off = [], 0
        for level, r in enumerate(self.ranks):
            if r > 0:
                out.append((f"level{level}", level, off, r))
            off += r
        return out

    def part_keys(self) -> list[str]:
        return [p[0] for p in self.level_parts()] + ([GENERIC] if self.generic else [])

    def part_shape(self, key: str) -> tuple[int, ...]:
        if key == GENERIC:
            return (1, self.n_mem_layers, 3, self.fetched_rank, self.d)
        level = int(key.removeprefix("level"))
        return (self.n_nodes(level), self.n_mem_layers, 3, self.ranks[level], self.d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ranks"] = list(self.ranks)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BankSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise HiermemError(f"bank spec: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise HiermemError(f"bank spec: {e}") from None


def bank_param_counts(spec: BankSpec) -> dict[str, Any]:
    """Parameter counts, arithmetically (nothing is allocated): a block of rank r holds 3·r·n_mem_layers·d."""
    per_block = 3 * spec.n_mem_layers * spec.d
    per_level = [per_block * r * spec.n_nodes(level) for level, r in enumerate(spec.ranks)]
    fetched = per_block * spec.fetched_rank
    return {"fetched": fetched, "bank": sum(per_level), "generic": fetched if spec.generic else 0,
            "per_level": per_level}


# ---------------------------------------------------------------------------------------------------------
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


def _block_seed(seed: int, key: str, i: int) -> int:
    # one generator per block: values do not depend on chunking, so RAM and on-disk banks are identical
    h = hashlib.blake2b(f"{seed}/{key}/{i}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def _init_block(spec: BankSpec, seed: int, key: str, i: int) -> np.ndarray:
    block = torch.zeros(spec.part_shape(key)[1:])  # down rows stay zero: an untrained memory has no effect
    g = torch.Generator().manual_seed(_block_seed(seed, key, i))
    s = spec.std
    torch.nn.init.trunc_normal_(block.narrow(1, 0, DOWN), std=s, a=-3 * s, b=3 * s, generator=g)  # gate + up
    return block.numpy()


# ---------------------------------------------------------------------------------------------------------
@dataclass
class Fetch:
    """One batch's fetched memory plus what block_grads/refresh need to map rows back to blocks.
    memory is a FetchedMemory (fetch: per-sequence copies) or a GroupedMemory (fetch_grouped)."""

    memory: FetchedMemory | GroupedMemory
    paths: torch.Tensor  # [B, depth] int64 (cpu)
    path_rows: torch.Tensor  # batch rows that use their path's blocks
    generic_rows: torch.Tensor  # batch rows that use the generic block
    node_ids: dict[str, torch.Tensor]  # per level part: the distinct node ids fetched (sorted)
    inverse: dict[str, torch.Tensor]  # per level part: for each path row, its index into node_ids
    versions: dict[str, np.ndarray]  # block write counters when read: tells refresh what went stale

    @property
    def weights(self) -> torch.Tensor:
        return self.memory.weights


@dataclass
class BlockGrads:
    """One gradient per distinct fetched block: ids[key] [U] (cpu int64) and grads[key] [U, *block shape]."""

    ids: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]

    def norm_sq(self) -> torch.Tensor:
        sq = [g.float().pow(2).sum() for g in self.grads.values()]
        return torch.stack(sq).sum() if sq else torch.zeros(())

    def scale_(self, factor: float | torch.Tensor) -> "BlockGrads":
        for g in self.grads.values():
            g.mul_(factor)
        return self


class MemoryBank:
    """Level arrays (torch tensors; memory-mapped files or RAM) with fetch, checksums and save/load."""

    def __init__(self, spec: BankSpec, arrays: dict[str, torch.Tensor], checksums: dict[str, np.ndarray], *,
                 dir: Path | None = None, maps: dict[str, np.memmap] | None = None, verified: bool = True,
                 writable: bool = True):
        self.spec = spec
        self.dir = dir  # the folder the bank was created in / loaded from (in-place saves go there)
        self.writable = writable
        self._t = arrays
        self._maps = maps or {}  # parts backed by a memory-mapped file
        self._crc = checksums  # crc32 of every clean block
        n = {k: spec.part_shape(k)[0] for k in arrays}
        self._dirty = {k: np.zeros(n[k], bool) for k in arrays}  # written since the checksums were taken
        self._unsaved: set[str] = set()  # parts written since the last save into the bank's own folder
        self._verified = {k: np.full(n[k], verified) for k in arrays}
        self._version = {k: np.zeros(n[k], np.int64) for k in arrays}
        self.fetch_counts = [np.zeros(spec.n_nodes(l), np.int64) for l in range(spec.depth)]
        self.generic_fetch_count = 0

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def create(cls, spec: BankSpec, seed: int, dir: str | Path | None = None) -> "MemoryBank":
        """Fresh bank: gate/up rows trunc-normal(std, ±3σ), down rows zero; deterministic per seed.

        With dir, each level is created as a memory-mapped file and initialised block by block.
        """
        arrays, maps, crcs = {}, {}, {}
        if dir is not None:
            dir = Path(dir)
            if (dir / MANIFEST).exists():
                raise HiermemError(f"{dir}: already holds a memory bank; refusing to overwrite it")
            dir.mkdir(parents=True, exist_ok=True)
        for key in spec.part_keys():
            shape = spec.part_shape(key)
            crcs[key] = np.zeros(shape[0], np.uint32)
            if dir is None:
                a = np.empty(shape, np.float32)
                for i in range(shape[0]):
                    a[i] = _init_block(spec, seed, key, i)
                    crcs[key][i] = crc32(a[i])
                arrays[key] = torch.from_numpy(a)
                continue
            path = dir / f"{key}.npy"
            with atomic_path(path) as tmp:
                mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
                for i in range(shape[0]):
                    block = _init_block(spec, seed, key, i)
                    mm[i] = block
                    crcs[key][i] = crc32(block)
                mm.flush()
                del mm
            maps[key] = np.load(path, mmap_mode="r+")
            arrays[key] = torch.from_numpy(maps[key])
        bank = cls(spec, arrays, crcs, dir=dir, maps=maps)
        if dir is not None:
            atomic_write_json(dir / MANIFEST, bank._manifest())
        return bank

    @classmethod
    def load(cls, dir: str | Path, mmap: bool = True, verify: str = "fetch", cache_levels: int = 1,
             writable: bool = True) -> "MemoryBank":
        """Open a saved bank. mmap: deep levels stay on disk; the first cache_levels levels and the generic
        block are copied to RAM. verify: "fetch" checks each block the first time it is fetched, "all" checks
        everything now, "none" trusts the files."""
        if verify not in ("fetch", "all", "none"):
            raise ValueError(f"verify must be 'fetch', 'all' or 'none', got {verify!r}")
        dir = Path(dir)
        mpath = dir / MANIFEST
        if not mpath.is_file():
            raise HiermemError(f"{mpath}: missing ({dir} is not a saved memory bank)")
        try:
            man = json.loads(mpath.read_text(encoding="utf-8"))
            if man.get("format") != FORMAT:
                raise HiermemError(f"{mpath}: not a hiermem bank manifest (format {man.get('format')!r})")
            spec = BankSpec.from_dict(man["spec"])
            parts = man["parts"]
            dtype = man["dtype"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise HiermemError(f"{mpath}: unreadable manifest ({type(e).__name__}: {e})") from None
        if dtype != "float32":
            raise HiermemError(f"{mpath}: dtype {dtype!r} is not supported (float32)")
        if sorted(parts) != sorted(spec.part_keys()):
            raise HiermemError(f"{mpath}: lists parts {sorted(parts)}, its spec needs {sorted(spec.part_keys())}")
        arrays, maps, crcs = {}, {}, {}
        for key in spec.part_keys():
            shape = spec.part_shape(key)
            if tuple(parts[key]["shape"]) != shape:
                raise HiermemError(f"{mpath}: {key} has shape {tuple(parts[key]['shape'])}, its spec needs {shape}")
            crcs[key] = np.asarray(parts[key]["checksums"], dtype=np.uint32)
            if crcs[key].shape != (shape[0],):
                raise HiermemError(f"{mpath}: {key} lists {crcs[key].size} checksums for {shape[0]} blocks")
            level = None if key == GENERIC else int(key.removeprefix("level"))
            in_ram = not mmap or level is None or level < cache_levels  # shallow levels are small and hot
            a = open_npy(dir / f"{key}.npy", shape, np.float32, "r+" if writable else "r", f"{mpath}")
            if in_ram:
                arrays[key] = torch.from_numpy(np.array(a))
            else:
                maps[key] = a
                with warnings.catch_warnings():  # read-only maps: writes are refused by write_blocks instead
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    arrays[key] = torch.from_numpy(a)
        bank = cls(spec, arrays, crcs, dir=dir, maps=maps, verified=verify == "none", writable=writable)
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
    def levels(self) -> list[torch.Tensor | None]:
        return [self._t.get(f"level{l}") for l in range(self.spec.depth)]

    @property
    def generic(self) -> torch.Tensor | None:
        return self._t.get(GENERIC)

    def parts(self) -> list[str]:
        return list(self._t)

    def part(self, key: str) -> torch.Tensor:
        return self._t[key]

    def is_mapped(self, key: str) -> bool:
        return key in self._maps

    def read_blocks(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        """Copy of blocks ids (distinct, cpu int64) of a part, checked against the manifest on first read."""
        t = self._t[key]
        blocks = t.index_select(0, ids.to(t.device))
        ids_np = ids.numpy()
        todo = np.nonzero(~self._verified[key][ids_np])[0]
        for j in todo.tolist():
            i = int(ids_np[j])
            if crc32(blocks[j].cpu().numpy()) != self._crc[key][i]:
                where = "the generic block" if key == GENERIC else f"block {i} of level {key[5:]}"
                raise HiermemError(f"{self._file(key)}: {where} is corrupted (checksum mismatch)")
            self._verified[key][i] = True
        return blocks

    def write_blocks(self, key: str, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite blocks ids of a part (the optimizer's only way in): marks them dirty and bumps versions."""
        if not self.writable:
            raise HiermemError(f"{self.dir}: bank was opened read-only")
        t = self._t[key]
        t.index_copy_(0, ids.to(t.device), values.to(t.device, t.dtype))
        ids_np = ids.numpy()
        self._dirty[key][ids_np] = True
        self._unsaved.add(key)
        self._verified[key][ids_np] = True  # the content is now ours, not the manifest's
        self._version[key][ids_np] += 1  # after the write: a concurrent reader compares and re-reads

    def verify(self) -> None:
        """Check every not-yet-verified block now (chunk by chunk)."""
        for key, t in self._t.items():
            todo = np.nonzero(~self._verified[key])[0]
            step = rows_per_chunk(tuple(t.shape))
            for lo in range(0, len(todo), step):
                self.read_blocks(key, torch.from_numpy(todo[lo:lo + step]))

    def to(self, device: str | torch.device) -> "MemoryBank":
        """Move an in-RAM bank (e.g. onto the GPU, where fetch is a device gather). Verifies it first."""
        if self._maps:
            raise HiermemError(f"{self.dir}: a memory-mapped bank stays on the CPU; load it with mmap=False "
                               f"to move it to {device}")
        self.verify()
        self._t = {k: t.to(device) for k, t in self._t.items()}
        return self

    # -- fetch -----------------------------------------------------------------------------------------------
    def fetch(self, paths: np.ndarray | torch.Tensor, use_generic: torch.Tensor | None = None,
              device: str | torch.device = "cpu", requires_grad: bool = False) -> Fetch:
        """Gather each sequence's path blocks, concatenated along the rank axis in level order
        (or the generic block where use_generic is True) -> FetchedMemory weights [B, n_mem_layers, 3, R, d]."""
        spec = self.spec
        paths, path_rows, generic_rows = self._rows(paths, use_generic)
        B = paths.shape[0]
        src, out = self.device, torch.device(device)
        pin = src.type == "cpu" and out.type == "cuda"  # pinned staging -> asynchronous host-to-device copy
        w = torch.empty((B, spec.n_mem_layers, 3, spec.fetched_rank, spec.d), device=src, pin_memory=pin)
        f = Fetch(FetchedMemory(w, spec.first_layer), paths, path_rows, generic_rows, {}, {}, {})
        for key, level, off, r in spec.level_parts():
            uniq, inv = torch.unique(paths[path_rows, level], return_inverse=True)
            f.node_ids[key], f.inverse[key] = uniq, inv
            f.versions[key] = self._version[key][uniq.numpy()].copy()  # before reading (see write_blocks)
            blocks = self.read_blocks(key, uniq)
            for b, j in zip(path_rows.tolist(), inv.tolist()):  # one copy per row, no [B, ...] temporary
                w[b, :, :, off:off + r].copy_(blocks[j])
        if len(generic_rows):
            f.versions[GENERIC] = self._version[GENERIC].copy()
            block = self.read_blocks(GENERIC, torch.zeros(1, dtype=torch.long))[0]
            for b in generic_rows.tolist():
                w[b].copy_(block)
        f.memory.weights = w.to(out, non_blocking=pin)
        if requires_grad:
            f.memory.weights.requires_grad_(True)
        return f

    def _rows(self, paths, use_generic) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Checked paths [B, depth] (cpu int64), the rows using their path and the rows using the generic block."""
        paths = self._check_paths(paths)
        B = paths.shape[0]
        gen = torch.zeros(B, dtype=torch.bool) if use_generic is None else torch.as_tensor(use_generic).cpu()
        if gen.shape != (B,):
            raise HiermemError(f"use_generic: expected shape [{B}], got {tuple(gen.shape)}")
        gen = gen.bool()
        if gen.any() and not self.spec.generic:
            raise HiermemError("use_generic: this bank has no generic block (memory.generic is false)")
        return paths, (~gen).nonzero().squeeze(1), gen.nonzero().squeeze(1)

    def fetch_grouped(self, paths: np.ndarray | torch.Tensor, use_generic: torch.Tensor | None = None,
                      device: str | torch.device = "cpu", requires_grad: bool = False) -> Fetch:
        """Like fetch, but grouped by node (memory/dispatch.py): each distinct block is read once, as one leaf
        [U_l, n_mem_layers, 3, r_l, d] per level (+ the generic block [1, ...] if some row uses it), with each
        row's index into it. No [B, ...] copy is made; block_grads reads the leaves' gradients directly."""
        spec = self.spec
        paths, path_rows, generic_rows = self._rows(paths, use_generic)
        B, out = paths.shape[0], torch.device(device)
        f = Fetch(None, paths, path_rows, generic_rows, {}, {}, {})  # type: ignore[arg-type]
        parts = []
        for key, level, off, r in spec.level_parts():
            uniq, inv = torch.unique(paths[path_rows, level], return_inverse=True)
            f.node_ids[key], f.inverse[key] = uniq, inv
            f.versions[key] = self._version[key][uniq.numpy()].copy()  # before reading (see write_blocks)
            index = torch.full((B,), -1, dtype=torch.int64)
            index[path_rows] = inv
            parts.append(MemoryPart(self.read_blocks(key, uniq).to(out), index, off, key))  # index stays on cpu
        if len(generic_rows):
            f.versions[GENERIC] = self._version[GENERIC].copy()
            index = torch.full((B,), -1, dtype=torch.int64)
            index[generic_rows] = 0
            block = self.read_blocks(GENERIC, torch.zeros(1, dtype=torch.long))
            parts.append(MemoryPart(block.to(out), index, 0, GENERIC))
        if requires_grad:
            for p in parts:
                p.weights.requires_grad_(True)
        f.memory = GroupedMemory(parts, spec.fetched_rank, spec.first_layer)
        return f

    def refresh(self, f: Fetch) -> Fetch:
        """Re-read, in place, any block of f written since f was gathered (a prefetch that raced a step)."""
        if isinstance(f.memory, GroupedMemory):
            with torch.no_grad():
                for p in f.memory.parts:
                    ids = f.node_ids[p.name] if p.name != GENERIC else torch.zeros(1, dtype=torch.long)
                    stale = np.nonzero(self._version[p.name][ids.numpy()] != f.versions[p.name])[0]
                    for j in stale.tolist():
                        f.versions[p.name][j] = self._version[p.name][int(ids[j])]
                        p.weights[j] = self.read_blocks(p.name, ids[j:j + 1])[0].to(p.weights.device)
            return f
        w = f.memory.weights
        with torch.no_grad():
            for key, level, off, r in self.spec.level_parts():
                uniq = f.node_ids[key]
                stale = np.nonzero(self._version[key][uniq.numpy()] != f.versions[key])[0]
                for j in stale.tolist():
                    f.versions[key][j] = self._version[key][int(uniq[j])]
                    block = self.read_blocks(key, uniq[j:j + 1]).to(w.device)
                    rows = f.path_rows[f.inverse[key] == j].to(w.device)
                    w[rows, :, :, off:off + r] = block
            if len(f.generic_rows) and (self._version[GENERIC] != f.versions[GENERIC]).any():
                f.versions[GENERIC] = self._version[GENERIC].copy()
                block = self.read_blocks(GENERIC, torch.zeros(1, dtype=torch.long)).to(w.device)
                w[f.generic_rows.to(w.device)] = block
        return f

    def record(self, f: Fetch) -> None:
        """Count, per node, how many sequences fetched it (training logs)."""
        for key, level, _, _ in self.spec.level_parts():
            counts = torch.bincount(f.inverse[key], minlength=len(f.node_ids[key]))
            self.fetch_counts[level][f.node_ids[key].numpy()] += counts.numpy()
        self.generic_fetch_count += len(f.generic_rows)

    def block_grads(self, f: Fetch) -> BlockGrads:
        """Sum f.weights.grad over the sequences that share a block: one gradient per distinct block.
        For a grouped fetch the leaves' gradients already are per distinct block."""
        if isinstance(f.memory, GroupedMemory):
            return self._block_grads_grouped(f)
        g = f.memory.weights.grad
        if g is None:
            raise RuntimeError("block_grads: fetch.memory.weights has no .grad "
                               "(fetch with requires_grad=True and call backward first)")
        out = BlockGrads({}, {})
        rows = f.path_rows.to(g.device)
        g_path = g if len(rows) == g.shape[0] else g.index_select(0, rows)
        for key, _, off, r in self.spec.level_parts():
            uniq = f.node_ids[key]
            if not len(uniq):
                continue
            gl = g_path[:, :, :, off:off + r].float()
            agg = torch.zeros((len(uniq),) + tuple(gl.shape[1:]), device=g.device)
            agg.index_add_(0, f.inverse[key].to(g.device), gl)
            out.ids[key], out.grads[key] = uniq, agg.to(self.device)
        if len(f.generic_rows):
            gg = g.index_select(0, f.generic_rows.to(g.device)).float().sum(0, keepdim=True)
            out.ids[GENERIC], out.grads[GENERIC] = torch.zeros(1, dtype=torch.long), gg.to(self.device)
        return out

    def _block_grads_grouped(self, f: Fetch) -> BlockGrads:
        out = BlockGrads({}, {})
        for p in f.memory.parts:
            if not len(p.weights):
                continue
            g = p.weights.grad
            if g is None:
                if not p.weights.requires_grad:
                    raise RuntimeError("block_grads: the grouped fetch has no gradients "
                                       "(fetch_grouped with requires_grad=True and call backward first)")
                g = torch.zeros_like(p.weights)  # fetched but unused by the forward (e.g. no row reached it)
            out.ids[p.name] = f.node_ids[p.name] if p.name != GENERIC else torch.zeros(1, dtype=torch.long)
            out.grads[p.name] = g.float().to(self.device)
        return out

    def _check_paths(self, paths: np.ndarray | torch.Tensor) -> torch.Tensor:
        p = torch.as_tensor(paths)
        if p.dim() != 2 or p.shape[1] != self.spec.depth:
            raise HiermemError(f"paths: expected shape [B, {self.spec.depth}] (one node id per tree level), "
                               f"got {tuple(p.shape)}")
        if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
            raise HiermemError(f"paths: expected integer node ids, got {p.dtype}")
        p = p.to("cpu", torch.int64)
        for _, level, _, _ in self.spec.level_parts():
            col, n = p[:, level], self.spec.n_nodes(level)
            bad = col[(col < 0) | (col >= n)]
            if len(bad):
                raise HiermemError(f"paths: level {level} node ids must be in [0, {n}), got {int(bad[0])}")
        return p

    # -- persistence -----------------------------------------------------------------------------------------
    def _file(self, key: str) -> Path:
        return (self.dir if self.dir is not None else Path(".")) / f"{key}.npy"

    def _manifest(self) -> dict[str, Any]:
        parts = {k: {"file": f"{k}.npy", "shape": list(self.spec.part_shape(k)), "checksums": self._crc[k].tolist()}
                 for k in self._t}
        return {"format": FORMAT, "spec": self.spec.to_dict(), "dtype": "float32", "checksum": "crc32",
                "parts": parts}

    def flush(self) -> None:
        for mm in self._maps.values():
            mm.flush()

    def save(self, dir: str | Path | None = None) -> None:
        """Write level files + manifest.json (each atomically, manifest last). Saving a bank into its own
        folder flushes memory-mapped levels in place and re-checksums only the blocks written since the
        last save; any other folder gets a full copy (chunked for memory-mapped levels)."""
        if dir is None and self.dir is None:
            raise ValueError("save: this bank has no folder; pass one")
        dir = Path(dir) if dir is not None else self.dir
        in_place = self.dir is not None and dir.resolve() == self.dir.resolve()
        dir.mkdir(parents=True, exist_ok=True)
        for key, t in self._t.items():
            changed = np.nonzero(self._dirty[key])[0]
            for i in changed.tolist():
                self._crc[key][i] = crc32(t[i].cpu().numpy())
            self._dirty[key][:] = False
            path = dir / f"{key}.npy"
            if in_place and key in self._maps:
                self._maps[key].flush()
            elif not in_place or key in self._unsaved or not path.is_file():
                # (not `changed`: a save into another folder, e.g. a checkpoint, has cleared it meanwhile)
                save_npy(path, self._maps[key] if key in self._maps else t.cpu().numpy())
            if in_place:
                self._unsaved.discard(key)
        atomic_write_json(dir / MANIFEST, self._manifest())

    def __repr__(self) -> str:
        s = self.spec
        return (f"MemoryBank(ranks={s.ranks}, branching={s.branching}, d={s.d}, layers={s.first_layer}.."
                f"{s.first_layer + s.n_mem_layers - 1}, dir={self.dir}, mapped={sorted(self._maps)})")


class Prefetcher:
    """Fetches the next batch's blocks in a background thread while the current batch computes.

    result() re-reads any block that was written (by the optimizer step) after it was gathered, so it returns
    exactly what bank.fetch would return at that moment.
    """

    def __init__(self, bank: MemoryBank, device: str | torch.device = "cpu", requires_grad: bool = False,
                 grouped: bool = False):
        self.bank, self.device, self.requires_grad = bank, device, requires_grad
        self._fetch = bank.fetch_grouped if grouped else bank.fetch
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hiermem-prefetch")
        self._pending: concurrent.futures.Future | None = None

    def submit(self, paths: np.ndarray | torch.Tensor, use_generic: torch.Tensor | None = None) -> None:
        if self._pending is not None:
            raise RuntimeError("Prefetcher.submit: collect the previous batch with result() first")
        paths = torch.as_tensor(paths).clone()  # the caller may reuse its buffer
        use_generic = None if use_generic is None else torch.as_tensor(use_generic).clone()
        self._pending = self._pool.submit(self._fetch, paths, use_generic, self.device)

    def result(self) -> Fetch:
        if self._pending is None:
            raise RuntimeError("Prefetcher.result: nothing was submitted")
        fut, self._pending = self._pending, None
        f = self.bank.refresh(fut.result())
        if self.requires_grad:
            for w in ([p.weights for p in f.memory.parts] if isinstance(f.memory, GroupedMemory)
                      else [f.memory.weights]):
                w.requires_grad_(True)
        return f

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
