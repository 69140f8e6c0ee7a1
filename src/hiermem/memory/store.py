"""A bank's folder on disk. Format 3: block records in two slot files per part, one block table per generation,
and small manifests whose atomic rename commits a generation. Formats 1 and 2 are read by LegacyStore.

Record of block i of part P (level<l> or generic): its weights in the storage dtype (memory/precision.py),
then, in a store that holds optimizer state, the lazy AdamW's float32 moments m and v; records are padded to
4 KiB, so each starts on a page. P keeps two slot files, P.0.bin and P.1.bin, each with room for every block at
offset i * record_bytes; they are sparse, so a region never written costs no disk. The table of generation g
(table-<g>.npz) names, for every block, the slot file that holds its committed record, the crc32 of its weights
and of its moments, and its write count (the bf16 rounding counter).

Crash safety. Writes between two commits always go to a block's other slot, never onto a committed record, so
at every instant the last committed generation is complete on disk. commit(g) fsyncs the slot files written
since the previous commit and writes table-<g>.npz and gen-<g>.json (the manifest of generation g, small: it
names the table and its crc32), each atomically. Nothing refers to generation g yet: the caller's commit point
comes next (a training checkpoint's state.json names g; a plain save has none), and publish() then replaces
manifest.json (what a reader opens by default) and deletes the tables and manifests of older generations.
So a checkpoint costs the blocks written since the previous one plus one table, never a copy of the bank, and
disk use stays at most twice the bank (both slots of every block written since the store was created).

A bank sharded over the ranks of a job (memory/shard.py) is one store in one folder: every rank opens it, reads
the records of its own blocks only (an in-RAM shard; the table is read whole: a few bytes a block), and writes
the records of the blocks it updates (its own subtrees', and the shared blocks, whose replicas hold the same
bytes) into their slots, each block always by the same ranks, so no two ranks ever write different bytes
to one place. commit(g, gather=...) then fsyncs each rank's writes and gathers the table rows of the blocks it
wrote onto rank 0, which alone writes the merged table-<g>.npz and gen-<g>.json; the trainer's state.json and
publish() stay rank 0's, after every rank's rows have arrived. The layout is the one a single process writes,
so a checkpoint loads, re-shards and evaluates the same at any world size.

Formats 1 and 2 (hiermem 0.1.x: one float32 level<l>.npy per part, a crc32 per block in manifest.json) open
read-only; saving such a bank writes a format-3 store beside the old files, which publish() then removes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hiermem.errors import HiermemError, check_format_version
from hiermem.integrity import SEAL, unseal, write_sealed_json
from hiermem.io_utils import atomic_path
from hiermem.memory.files import crc32, open_npy, pwrite_all, read_checked
from hiermem.memory.precision import itemsize, storage_dtype
from hiermem.memory.spec import GENERIC, BankSpec

MANIFEST = "manifest.json"
FORMAT = "hiermem-bank"
FORMAT_VERSION = 3  # 1: hiermem 0.1.0 ("hiermem-bank/1"); 2: adds format_version; 3: slot files + block tables
PAGE = 4096


@dataclass(frozen=True)
class Layout:
    """Where a part's blocks are: n records of record_bytes, weight_bytes of weights then state_bytes of m, v."""

    shape: tuple[int, ...]  # the part's shape [n_blocks, n_mem_layers, S, r, d]
    weight_bytes: int
    state_bytes: int
    record_bytes: int

    @classmethod
    def of(cls, spec: BankSpec, key: str, dtype: str, state: bool, pad: bool = True) -> "Layout":
        shape = spec.part_shape(key)
        n = int(np.prod(shape[1:]))
        wb, sb = n * itemsize(dtype), 8 * n if state else 0
        rb = -(-(wb + sb) // PAGE) * PAGE if pad else wb + sb
        return cls(tuple(shape), wb, sb, rb)

    @property
    def n_blocks(self) -> int:
        return self.shape[0]


def block_name(key: str, i: int) -> str:
    return "the generic block" if key == GENERIC else f"block {i} of level {key.removeprefix('level')}"


def check_format(path: Path, manifest: dict) -> int:
    """The manifest's format version (1 for hiermem 0.1.0's "hiermem-bank/1"); newer than ours is refused."""
    fmt, version = manifest.get("format"), manifest.get("format_version")
    if fmt == "hiermem-bank/1" and version is None:
        return 1
    return check_format_version(path, fmt, version, FORMAT, FORMAT_VERSION, "bank", "hiermem bank manifest")


def _read_manifest(path: Path) -> tuple[dict, int, BankSpec]:
    if not path.is_file():
        raise HiermemError(f"{path}: missing ({path.parent} is not a saved memory bank)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        man = {k: v for k, v in raw.items() if k != SEAL}  # its seal is checked once the store opened (open_store)
        version = check_format(path, man)
        spec = BankSpec.from_dict(man["spec"])
        parts = man["parts"]
        man["dtype"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise HiermemError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
    if sorted(parts) != sorted(spec.part_keys()):
        raise HiermemError(f"{path}: lists parts {sorted(parts)}, its spec needs {sorted(spec.part_keys())}")
    for key in spec.part_keys():
        shape = tuple(parts[key]["shape"])
        if shape != spec.part_shape(key):
            raise HiermemError(f"{path}: {key} has shape {shape}, its spec needs {spec.part_shape(key)}")
    return man, version, spec, raw


def open_store(dir: str | Path, generation: int | None = None, writable: bool = False) -> "BlockStore | LegacyStore":
    """The bank in dir at its published generation (manifest.json) or at `generation` (gen-<g>.json)."""
    dir = Path(dir)
    path = dir / (MANIFEST if generation is None else gen_name(generation))
    man, version, spec, raw = _read_manifest(path)
    if version < 3:
        if generation is not None:
            raise HiermemError(f"{path}: a format-{version} bank has no generations")
        store = LegacyStore(dir, path, man, spec)
    else:
        store = BlockStore(dir, path, man, spec, writable)
    unseal(path, raw)  # last: a manifest edited by hand is refused by the check that names what is wrong
    return store


@contextlib.contextmanager
def naming(file: str | Path):
    """An OSError raised inside names `file` (os.pwrite, os.fsync and writes to an open file name none), so that a
    full disk is reported with the file it hit."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror or str(e), str(file)) from e


def gen_name(generation: int) -> str:
    return f"gen-{generation:06d}.json"


def table_name(generation: int) -> str:
    return f"table-{generation:06d}.npz"


class _Reader:
    """What both store formats share: reading checked records."""

    dir: Path
    spec: BankSpec
    dtype: str
    has_state: bool
    layouts: dict[str, Layout]
    crc_w: dict[str, np.ndarray]
    crc_s: dict[str, np.ndarray]

    def _where(self, key: str, i: int) -> tuple[int, int, Path]:  # (fd, offset, file)
        raise NotImplementedError

    def file_of(self, key: str, i: int) -> Path:
        """The file that holds block i's record."""
        return self._where(key, i)[2]

    def read(self, key: str, ids: np.ndarray, nbytes: int, check: bool) -> list[np.ndarray]:
        """The first nbytes of each block's record (weights, or weights and moments), as new uint8 arrays;
        with check, each checksum is verified (a mismatch names the file and the block)."""
        lay = self.layouts[key]
        spans = [(0, lay.weight_bytes)] + ([(lay.weight_bytes, nbytes)] if nbytes > lay.weight_bytes else [])
        spans = spans if check else []
        out = []
        for i in np.asarray(ids).tolist():
            fd, offset, file = self._where(key, i)
            buf = np.empty(nbytes, np.uint8)
            try:
                crcs = read_checked(fd, buf, offset, spans)
            except OSError as e:  # a truncated slot file ends before the record
                raise HiermemError(f"{file}: cannot read {block_name(key, i)} ({e})") from None
            if check:
                if crcs[0] != self.crc_w[key][i]:
                    raise HiermemError(f"{file}: {block_name(key, i)} is corrupted (checksum mismatch)")
                if len(crcs) > 1 and crcs[1] != self.crc_s[key][i]:
                    raise HiermemError(f"{file}: the optimizer state of {block_name(key, i)} is corrupted "
                                       "(checksum mismatch)")
            out.append(buf)
        return out

    def files(self) -> list[Path]:
        raise NotImplementedError


class LegacyStore(_Reader):
    """A format-1/2 bank (float32 weights in level<l>.npy, crc32s in manifest.json): read-only, no state."""

    has_state, writable, generation, dtype = False, False, None, "float32"

    def __init__(self, dir: Path, path: Path, man: dict, spec: BankSpec):
        if man["dtype"] != "float32":
            raise HiermemError(f"{path}: dtype {man['dtype']!r} is not supported (float32)")
        self.dir, self.spec, self.version = dir, spec, check_format(path, man)
        self.layouts, self.crc_w, self.crc_s, self.writes = {}, {}, {}, {}
        self._fds, self._offsets, self._files = {}, {}, {}
        for key in spec.part_keys():
            lay = Layout.of(spec, key, "float32", state=False, pad=False)
            try:
                crcs = np.asarray(man["parts"][key]["checksums"], dtype=np.uint32)
            except (KeyError, TypeError, ValueError) as e:
                raise HiermemError(f"{path}: unreadable checksums of {key} ({type(e).__name__}: {e})") from None
            if crcs.shape != (lay.n_blocks,):
                raise HiermemError(f"{path}: {key} lists {crcs.size} checksums for {lay.n_blocks} blocks")
            file = self._files[key] = dir / man["parts"][key].get("file", f"{key}.npy")
            self._offsets[key] = open_npy(file, lay.shape, np.float32, str(path))
            self._fds[key] = _open_fd(self, file, os.O_RDONLY)
            self.layouts[key], self.crc_w[key] = lay, crcs
            self.crc_s[key], self.writes[key] = np.zeros_like(crcs), np.zeros(lay.n_blocks, np.int64)

    def _where(self, key: str, i: int) -> tuple[int, int, Path]:
        return self._fds[key], self._offsets[key] + i * self.layouts[key].record_bytes, self._files[key]

    def files(self) -> list[Path]:
        """The level files (not manifest.json)."""
        return list(self._files.values())


def _open_fd(owner: Any, path: Path, flags: int) -> int:
    fd = os.open(path, flags)
    weakref.finalize(owner, os.close, fd)
    return fd


class BlockStore(_Reader):
    """A format-3 bank folder opened at one generation (see the module docstring)."""

    def __init__(self, dir: Path, path: Path, man: dict, spec: BankSpec, writable: bool):
        self.dir, self.spec, self.writable = dir, spec, writable
        try:
            self.dtype = storage_dtype(man["dtype"])
            self.has_state = bool(man["state"])
            self.generation = int(man["generation"])  # -1: created, nothing committed yet
            table = man.get("table")
        except (KeyError, TypeError, ValueError, HiermemError) as e:
            raise HiermemError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
        self._manifest = man
        self.layouts = {k: Layout.of(spec, k, self.dtype, self.has_state) for k in spec.part_keys()}
        for key, lay in self.layouts.items():
            if man["parts"][key].get("record_bytes") != lay.record_bytes:
                raise HiermemError(f"{path}: {key} records of {man['parts'][key].get('record_bytes')} bytes, "
                                   f"its spec and dtype need {lay.record_bytes}")
        arrays = self._read_table(path, table) if table else None
        self.slot, self.crc_w, self.crc_s, self.writes = {}, {}, {}, {}
        self.committed: dict[str, np.ndarray] = {}  # slot of each block's committed record
        self._fresh: dict[str, np.ndarray] = {}  # before the first commit: blocks not written yet
        flags = os.O_RDWR if writable else os.O_RDONLY
        self._fds: dict[tuple[str, int], int] = {}
        for key, lay in self.layouts.items():
            n = lay.n_blocks
            if arrays is None:  # a fresh store: records read as zeros (holes) until written into slot 0
                self.slot[key], self.committed[key] = np.zeros(n, np.uint8), np.ones(n, np.uint8)
                self.crc_w[key] = np.full(n, crc32(np.zeros(lay.weight_bytes, np.uint8)), np.uint32)
                self.crc_s[key] = np.full(n, crc32(np.zeros(lay.state_bytes, np.uint8)), np.uint32)
                self.writes[key], self._fresh[key] = np.zeros(n, np.int64), np.ones(n, bool)
            else:
                try:
                    self.slot[key] = arrays[f"{key}.slot"].astype(np.uint8)
                    self.crc_w[key] = arrays[f"{key}.crc_w"].astype(np.uint32)
                    self.crc_s[key] = arrays[f"{key}.crc_s"].astype(np.uint32)
                    self.writes[key] = arrays[f"{key}.writes"].astype(np.int64)
                except KeyError as e:
                    raise HiermemError(f"{self.dir / table['file']}: no {e.args[0]} table") from None
                if any(a.shape != (n,) for a in (self.slot[key], self.crc_w[key], self.crc_s[key], self.writes[key])):
                    raise HiermemError(f"{self.dir / table['file']}: {key} tables do not have {n} rows")
                self.committed[key] = self.slot[key].copy()
            for s in (0, 1):
                file = self.dir / f"{key}.{s}.bin"
                if not file.is_file():
                    raise HiermemError(f"{file}: missing ({path})")
                size, want = file.stat().st_size, lay.n_blocks * lay.record_bytes
                if size != want:  # cheap at open; each record's crc32 is checked when it is read
                    raise HiermemError(f"{file}: corrupted slot file ({size} bytes, {want} expected: truncated?)")
                self._fds[(key, s)] = _open_fd(self, file, flags)
        self._written: set[int] = set()  # fds written since the last commit, fsynced by the next
        self._pending = {k: np.zeros(lay.n_blocks, bool) for k, lay in self.layouts.items()}  # written since
        self._obsolete: list[Path] = []  # a format-1/2 bank's files, removed once this store is published

    @staticmethod
    def create(dir: str | Path, spec: BankSpec, dtype: str, state: bool) -> "BlockStore":
        """A store to write a bank into: a compatible format-3 store already in dir is reopened (its committed
        generation stays intact until the next commit); otherwise new, empty (sparse) slot files are made.
        A format-1/2 bank in dir is replaced when the new store is published."""
        dir, dtype = Path(dir), storage_dtype(dtype)
        obsolete: list[Path] = []
        if (dir / MANIFEST).is_file():
            old = open_store(dir)
            if isinstance(old, BlockStore):
                if old.spec != spec or old.dtype != dtype or old.has_state != state:
                    raise HiermemError(f"{dir}: already holds another memory bank (spec, dtype or optimizer "
                                       "state differ); refusing to overwrite it")
                return open_store(dir, old.generation, writable=True)
            obsolete = old.files()
        dir.mkdir(parents=True, exist_ok=True)
        man = {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": spec.to_dict(), "dtype": dtype,
               "state": state, "checksum": "crc32", "generation": -1, "table": None, "parts": {}}
        for key in spec.part_keys():
            lay = Layout.of(spec, key, dtype, state)
            man["parts"][key] = {"shape": list(lay.shape), "record_bytes": lay.record_bytes,
                                 "weight_bytes": lay.weight_bytes, "state_bytes": lay.state_bytes,
                                 "files": [f"{key}.0.bin", f"{key}.1.bin"]}
            for s in (0, 1):
                with open(dir / f"{key}.{s}.bin", "wb") as f:
                    f.truncate(lay.n_blocks * lay.record_bytes)
        store = BlockStore(dir, dir / MANIFEST, man, spec, writable=True)
        store._obsolete = obsolete
        return store

    def _read_table(self, path: Path, table: dict) -> dict[str, np.ndarray]:
        file = self.dir / table["file"]
        try:
            data = file.read_bytes()
        except OSError:
            raise HiermemError(f"{file}: missing (the block table of {path.name})") from None
        if crc32(np.frombuffer(data, np.uint8)) != table["crc32"]:
            raise HiermemError(f"{file}: corrupted block table (checksum mismatch)")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def _where(self, key: str, i: int) -> tuple[int, int, Path]:
        s = int(self.slot[key][i])
        return self._fds[(key, s)], i * self.layouts[key].record_bytes, self.dir / f"{key}.{s}.bin"

    def files(self) -> list[Path]:
        """The slot files (what the bank's bytes are in)."""
        return [self.dir / f"{k}.{s}.bin" for k in self.layouts for s in (0, 1)]

    # -- writing ---------------------------------------------------------------------------------------------
    def write(self, key: str, i: int, record: np.ndarray) -> None:
        """Write block i's record (uint8: weights then, with state, m and v) into the slot that does not hold
        its committed record. Before the first commit a record may be the weights alone: the moments of a
        block not written yet are holes, zeros."""
        if not self.writable:
            raise HiermemError(f"{self.dir}: bank was opened read-only")
        lay = self.layouts[key]
        wb = lay.weight_bytes
        weights_only = len(record) == wb and lay.state_bytes > 0
        if len(record) != wb + lay.state_bytes and not (weights_only and key in self._fresh
                                                         and self._fresh[key][i]):
            raise ValueError(f"BlockStore.write: {key} record of {len(record)} bytes, expected {wb + lay.state_bytes}")
        target = 1 - int(self.committed[key][i])
        fd = self._fds[(key, target)]
        with naming(self.dir / f"{key}.{target}.bin"):
            pwrite_all(fd, record, i * lay.record_bytes)
        self.crc_w[key][i] = crc32(record[:wb])
        if not weights_only:
            self.crc_s[key][i] = crc32(record[wb:])
        self.slot[key][i] = target
        self._pending[key][i] = True
        if key in self._fresh:
            self._fresh[key][i] = False
        self._written.add(fd)

    def commit(self, generation: int, writes: dict[str, np.ndarray], gather=None) -> None:
        """Make what was written so far generation `generation` (> the current one) on disk, unpublished.

        gather (a sharded bank, see the module docstring): a collective that returns every rank's argument on
        rank 0 (a list, in rank order) and None on the others; rank 0 then writes the merged table."""
        if not self.writable:
            raise HiermemError(f"{self.dir}: bank was opened read-only")
        if generation <= self.generation:
            raise ValueError(f"commit: generation {generation} after generation {self.generation}")
        for fd in self._written:
            with naming(next((self.dir / f"{k}.{s}.bin" for (k, s), f in self._fds.items() if f == fd), self.dir)):
                os.fsync(fd)
        self._written.clear()
        writes = {k: np.array(w, np.int64) for k, w in writes.items()}
        if gather is not None:
            rows = {}
            for key, pending in self._pending.items():
                ids = np.flatnonzero(pending)
                rows[key] = (ids, self.slot[key][ids], self.crc_w[key][ids], self.crc_s[key][ids], writes[key][ids])
            everyone = gather(rows)
            if everyone is None:  # another rank writes the table
                self._committed(dict(self._manifest, generation=generation), generation)
                return
            for theirs in everyone:
                for key, (ids, slot, crc_w, crc_s, w) in theirs.items():
                    self.slot[key][ids], self.crc_w[key][ids], self.crc_s[key][ids] = slot, crc_w, crc_s
                    writes[key][ids] = w
        arrays = {}
        for key in self.layouts:
            arrays.update({f"{key}.slot": self.slot[key], f"{key}.crc_w": self.crc_w[key],
                           f"{key}.crc_s": self.crc_s[key], f"{key}.writes": writes[key]})
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
        with atomic_path(self.dir / table_name(generation)) as tmp:
            with naming(self.dir / table_name(generation)):
                tmp.write_bytes(data)
        man = dict(self._manifest, generation=generation,
                   table={"file": table_name(generation), "crc32": crc32(np.frombuffer(data, np.uint8))})
        with naming(self.dir / gen_name(generation)):
            write_sealed_json(self.dir / gen_name(generation), man)
        self._committed(man, generation)

    def _committed(self, man: dict, generation: int) -> None:
        self._manifest, self.generation, self._fresh = man, generation, {}
        self.committed = {k: s.copy() for k, s in self.slot.items()}
        for p in self._pending.values():
            p[:] = False

    def publish(self) -> None:
        """manifest.json := the current generation; the tables and manifests of other generations are removed."""
        if self.generation < 0:
            raise ValueError("publish: nothing committed yet")
        write_sealed_json(self.dir / MANIFEST, self._manifest)
        keep = {gen_name(self.generation), table_name(self.generation)}
        for p in [*self.dir.glob("gen-*.json"), *self.dir.glob("table-*.npz"), *self._obsolete]:
            if p.name not in keep and p.parent == self.dir:
                p.unlink(missing_ok=True)
        self._obsolete = []
