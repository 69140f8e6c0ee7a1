"""The memory bank: the parameter blocks of every tree node, in RAM or memory-mapped files, checksummed.

A part (memory/spec.py) is one float32 array [n_nodes, n_mem_layers, 3, r, d], so a block is one contiguous
extent in RAM and on disk. Banks larger than RAM are memory-mapped: blocks are read on demand and written in
place. Every block is checked against the manifest's crc32 the first time it is read; the optimizer writes
blocks back through write_blocks, the only way in. Fetching a batch's blocks is memory/fetch.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_path, atomic_write_json
from hiermem.memory.files import crc32, open_npy, rows_per_chunk, save_npy
from hiermem.memory.spec import GENERIC, BankSpec
from hiermem.model.fetched import DOWN

MANIFEST = "manifest.json"
FORMAT = "hiermem-bank"
FORMAT_VERSION = 2  # 1: hiermem 0.1.0 (no format_version field); 2: adds format_version


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



class MemoryBank:
    """Part arrays (torch tensors over RAM or memory-mapped files) with checksums, block I/O, save and load."""

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
            check_format(mpath, man)
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
        """Overwrite blocks ids of a part (the optimizer's only way in): marks them dirty."""
        if not self.writable:
            raise HiermemError(f"{self.dir}: bank was opened read-only")
        t = self._t[key]
        t.index_copy_(0, ids.to(t.device), values.to(t.device, t.dtype))
        ids_np = ids.numpy()
        self._dirty[key][ids_np] = True
        self._unsaved.add(key)
        self._verified[key][ids_np] = True  # the content is now ours, not the manifest's

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


    # -- persistence -----------------------------------------------------------------------------------------
    def _file(self, key: str) -> Path:
        return (self.dir if self.dir is not None else Path(".")) / f"{key}.npy"

    def _manifest(self) -> dict[str, Any]:
        parts = {k: {"file": f"{k}.npy", "shape": list(self.spec.part_shape(k)), "checksums": self._crc[k].tolist()}
                 for k in self._t}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": self.spec.to_dict(), "dtype": "float32", "checksum": "crc32",
                "parts": parts}

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



def check_format(path: Path, manifest: dict) -> None:
    """Accept this version and the previous one (hiermem 0.1.0 wrote "hiermem-bank/1" and no version)."""
    fmt, version = manifest.get("format"), manifest.get("format_version")
    if fmt == "hiermem-bank/1" and version is None:
        return
    if fmt != FORMAT or not isinstance(version, int):
        raise HiermemError(f"{path}: not a hiermem bank manifest (format {fmt!r})")
    if version > FORMAT_VERSION:
        raise HiermemError(f"{path}: bank format version {version} is newer than this hiermem reads "
                           f"({FORMAT_VERSION}); upgrade hiermem")
