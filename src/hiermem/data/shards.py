"""The document index of a prepared data directory: where every document lies in the corpus shards.

<data dir>/index/
  shards.json     every shard: resolved path, size, mtime_ns (a shard that changed since is refused),
                  format, id name, first document and document count
  shard.npy       uint32 per document: its shard
  offset.npy      int64 per document: byte offset of its line/block in the (decompressed) shard; .parquet: row
  length.npy      int64 per document: byte length of that line/block; .parquet: 1
  ids.npy         uint8: every id's UTF-8 bytes, concatenated
  id_offsets.npy  int64, n_docs + 1: id i is ids[id_offsets[i]:id_offsets[i + 1]]
Every array is memory-mapped, so reading texts or ids never loads the corpus or the whole id list.

Duplicate ids (`find_duplicate`) are found exactly, in bounded memory: each id's 8-byte blake2b digest
and its document number go to disk; the digests are split into at most MAX_BUCKETS buckets by value,
each bucket is read DUP_CHUNK entries at a time against the sorted digests seen so far in it, and every
digest match is confirmed on the ids themselves (so a digest collision is never reported as a duplicate
and never hides one). Disk: 32 bytes per document, in the work folder. RAM: about 150 bytes x DUP_CHUNK
(some 150 MB) for corpora up to MAX_BUCKETS x DUP_CHUNK (about 270 million) documents; beyond, each
bucket's distinct digests grow with the corpus, by 16 bytes x (documents / MAX_BUCKETS) (about 60 MB more
per billion documents).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from hiermem.data.npyfile import NpyAppender
from hiermem.data.readers import Record, Shard, decode_raw, read_raw
from hiermem.errors import HiermemError
from hiermem.integrity import check_files, read_json, write_sealed_json

DUP_CHUNK = 1 << 20  # entries of a duplicate-check bucket read at once
MAX_BUCKETS = 256  # open bucket files while splitting the digests
READ_CHUNK = 1 << 16  # index entries read at once when streaming texts
FLUSH_DOCS = 8192  # documents buffered by IndexWriter before they are appended to the arrays
_BUCKET = np.dtype([("d", "<u8"), ("i", "<i8")])


def shard_stat(path: Path) -> dict:
    """What identifies a shard's content cheaply: resolved path, size, modification time (ns)."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def id_digest(doc_id: bytes) -> bytes:
    return hashlib.blake2b(doc_id, digest_size=8).digest()


# --- writing -------------------------------------------------------------------------------------------


class IndexWriter:
    """Appends documents to the index arrays (plus, in work_dir, each document's line for messages and its
    id digest for the duplicate check). `counts()` after `flush()` is what a resume may truncate back to."""

    def __init__(self, index_dir: Path, work_dir: Path, counts: dict | None = None):
        fresh = counts is None
        n, n_bytes = (0, 0) if fresh else (counts["docs"], counts["id_bytes"])
        self.index_dir, self.work_dir = Path(index_dir), Path(work_dir)

        self._arrays: dict[str, NpyAppender] = {}
        try:
            for key, folder, dtype, count in [
                ("shard", self.index_dir, np.uint32, n), ("offset", self.index_dir, np.int64, n),
                ("length", self.index_dir, np.int64, n), ("line", self.work_dir, np.int64, n),
                ("digest", self.work_dir, np.uint8, n * 8), ("ids", self.index_dir, np.uint8, n_bytes),
                ("id_offsets", self.index_dir, np.int64, n + 1),
            ]:
                self._arrays[key] = NpyAppender(folder / f"{key}.npy", dtype, None if fresh else count)
        except BaseException:
            self.close()
            raise
        if fresh:
            self._arrays["id_offsets"].append([0])
        self._id_end = n_bytes
        self._clear()

    def _clear(self) -> None:
        self._rows: list[tuple[int, int, int, int]] = []
        self._ids: list[bytes] = []
        self._id_ends: list[int] = []

    def add(self, shard_no: int, rec: Record) -> None:
        b = rec.doc.id.encode("utf-8")
        self._rows.append((shard_no, rec.offset, rec.length, rec.line))
        self._ids.append(b)
        self._id_end += len(b)
        self._id_ends.append(self._id_end)
        if len(self._rows) >= FLUSH_DOCS:
            self._write()

    def _write(self) -> None:
        if not self._rows:
            return
        rows = np.array(self._rows, dtype=np.int64)
        a = self._arrays
        a["shard"].append(rows[:, 0])
        a["offset"].append(rows[:, 1])
        a["length"].append(rows[:, 2])
        a["line"].append(rows[:, 3])
        a["digest"].append(np.frombuffer(b"".join(id_digest(x) for x in self._ids), np.uint8))
        a["ids"].append(np.frombuffer(b"".join(self._ids), np.uint8))
        a["id_offsets"].append(self._id_ends)
        self._clear()

    def flush(self) -> dict:
        self._write()
        for arr in self._arrays.values():
            arr.flush()
        return self.counts()

    def counts(self) -> dict:
        return {"docs": self._arrays["shard"].count, "id_bytes": self._arrays["ids"].count}

    def finalize(self) -> None:
        self._write()
        for arr in self._arrays.values():
            arr.finalize()

    def close(self) -> None:
        for arr in self._arrays.values():
            arr.close()


def write_shard_list(index_dir: Path, shards: Sequence[Shard], stats: Sequence[dict], counts: Sequence[int]) -> None:
    first = np.concatenate([[0], np.cumsum(counts)]).tolist()
    rows = [{**st, "fmt": sh.fmt, "name": sh.name, "first": int(first[i]), "n_docs": int(counts[i])}
            for i, (sh, st) in enumerate(zip(shards, stats))]
    write_sealed_json(index_dir / "shards.json", {"shards": rows})


# --- duplicate ids --------------------------------------------------------------------------------------


def find_duplicate(digest_file: Path, id_at: Callable[[int], str], work_dir: Path) -> tuple[int, int] | None:
    """(first, repeat): the earliest document whose id an earlier document has, and that earlier one;
    None if every id is unique. digest_file: .npy of 8 uint8 per document (id_digest of its id)."""
    digests = np.load(digest_file, mmap_mode="r").view("<u8")
    n = len(digests)
    n_buckets = min(MAX_BUCKETS, max(1, -(-n // DUP_CHUNK)))
    if n_buckets == 1:
        return _earliest_repeat(_chunks_in_memory(digests), id_at)
    folder = Path(work_dir) / "dup"
    folder.mkdir(parents=True, exist_ok=True)
    files = [open(folder / f"{b:03d}.bin", "wb", buffering=0) for b in range(n_buckets)]
    try:
        for a in range(0, n, DUP_CHUNK):
            d = np.asarray(digests[a : a + DUP_CHUNK])
            rec = np.empty(len(d), _BUCKET)
            rec["d"], rec["i"] = d, np.arange(a, a + len(d))
            bucket = d % np.uint64(n_buckets)
            order = np.argsort(bucket, kind="stable")  # keeps document order inside a bucket
            bounds = np.searchsorted(bucket[order], np.arange(n_buckets + 1))
            for b in range(n_buckets):
                if bounds[b] < bounds[b + 1]:
                    files[b].write(rec[order[bounds[b] : bounds[b + 1]]].tobytes())
    finally:
        for f in files:
            f.close()
    best = None
    for b in range(n_buckets):
        path = folder / f"{b:03d}.bin"
        if path.stat().st_size:
            found = _earliest_repeat(_chunks_in_file(path), id_at)
            if found and (best is None or found[1] < best[1]):
                best = found
        path.unlink()
    folder.rmdir()
    return best


def _chunks_in_memory(digests: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for a in range(0, len(digests), DUP_CHUNK):
        d = np.asarray(digests[a : a + DUP_CHUNK])
        yield d, np.arange(a, a + len(d))


def _chunks_in_file(path: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    mm = np.memmap(path, dtype=_BUCKET, mode="r")
    for a in range(0, len(mm), DUP_CHUNK):
        chunk = np.array(mm[a : a + DUP_CHUNK])
        yield chunk["d"], chunk["i"]
    del mm


def _earliest_repeat(chunks: Iterable[tuple[np.ndarray, np.ndarray]], id_at: Callable[[int], str]):
    """The earliest repeated id among entries (digest, document) given in document order, or None."""
    seen_d = np.zeros(0, np.uint64)  # sorted distinct digests so far, with each one's first document
    seen_i = np.zeros(0, np.int64)
    prior: dict[int, list[tuple[str, int]]] = {}  # digest -> the distinct ids (and first documents) behind it
    for d, idx in chunks:
        uniq, first = np.unique(d, return_index=True)
        pos = np.searchsorted(seen_d, d)
        in_seen = (pos < len(seen_d)) & (seen_d[np.minimum(pos, len(seen_d) - 1)] == d) if len(seen_d) else \
            np.zeros(len(d), bool)
        repeat_in_chunk = np.ones(len(d), bool)
        repeat_in_chunk[first] = False
        for k in np.flatnonzero(in_seen | repeat_in_chunk):  # ascending: document order
            x = int(d[k])
            if x not in prior:
                if in_seen[k]:
                    j = int(seen_i[pos[k]])
                else:
                    j = int(idx[first[np.searchsorted(uniq, d[k])]])
                prior[x] = [(id_at(j), j)]
            s = id_at(int(idx[k]))
            for t, j in prior[x]:
                if t == s:
                    return j, int(idx[k])
            prior[x].append((s, int(idx[k])))  # a digest collision: another id behind the same digest
        new = ~in_seen
        new_d, at = np.unique(d[new], return_index=True)
        new_i = idx[new][at]
        seen_d = np.concatenate([seen_d, new_d])
        seen_i = np.concatenate([seen_i, new_i])
        order = np.argsort(seen_d, kind="stable")
        seen_d, seen_i = seen_d[order], seen_i[order]
    return None


# --- reading -------------------------------------------------------------------------------------------


class DocIndex:
    """Read side of index/: documents' texts (streamed from the shards) and ids."""

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)
        try:
            self.shards = read_json(self.dir / "shards.json", "document index")["shards"]
        except (KeyError, TypeError):
            raise HiermemError(f"{self.dir / 'shards.json'}: corrupted document index (no shards)") from None
        # against index/checksums.json (written when prepare finished): in full for an index up to
        # FULL_CHECK_BYTES, else sizes only (hiermem verify checks the rest)
        check_files([self.dir / f"{n}.npy" for n in ("shard", "offset", "length", "ids", "id_offsets")],
                    "document index")
        self.shard = np.load(self.dir / "shard.npy", mmap_mode="r")
        self.offset = np.load(self.dir / "offset.npy", mmap_mode="r")
        self.length = np.load(self.dir / "length.npy", mmap_mode="r")
        self._ids = np.load(self.dir / "ids.npy", mmap_mode="r")
        self._id_offsets = np.load(self.dir / "id_offsets.npy", mmap_mode="r")
        if not len(self.offset) == len(self.length) == len(self.shard) == len(self._id_offsets) - 1:
            raise HiermemError(f"{self.dir}: index arrays disagree in length (corrupt index)")

    def __len__(self) -> int:
        return len(self.offset)

    def _open(self, s: int) -> Shard:
        """Shard s, refused if it is missing or changed since prepare (its documents would be other texts)."""
        row = self.shards[s]
        path = Path(row["path"])
        data_dir = self.dir.parent
        try:
            st = os.stat(path)
        except OSError:
            raise HiermemError(f"{path}: missing (a corpus file {data_dir} was prepared from); "
                               f"prepare again with --force") from None
        if (st.st_size, st.st_mtime_ns) != (row["size"], row["mtime_ns"]):
            raise HiermemError(f"{path}: changed since {data_dir} was prepared from it (size or modification time "
                               f"differs); prepare again with --force")
        return Shard(path, row["name"], row["fmt"])

    def _positions(self, a: int, b: int) -> Iterator[tuple[int, int]]:
        for c in range(a, b, READ_CHUNK):
            e = min(b, c + READ_CHUNK)
            yield from zip(self.offset[c:e].tolist(), self.length[c:e].tolist())

    def iter_raw(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[str, bytes | str]]:
        """(format, raw record) of documents start..stop-1 in order (see readers.read_raw)."""
        stop = len(self) if stop is None else stop
        for s, row in enumerate(self.shards):
            a, b = max(start, row["first"]), min(stop, row["first"] + row["n_docs"])
            if a >= b:
                continue
            shard = self._open(s)
            for raw in read_raw(shard, self._positions(a, b)):
                yield shard.fmt, raw

    def iter_texts(self, batch_size: int = 1024, start: int = 0, stop: int | None = None) -> Iterator[list[str]]:
        return _batches((decode_raw(fmt, raw) for fmt, raw in self.iter_raw(start, stop)), batch_size)

    def texts_at(self, indices) -> list[str]:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"document index out of range for {len(self)} documents")
        want = np.unique(idx)
        found: dict[int, str] = {}
        shard_of = np.asarray(self.shard[want], dtype=np.int64)
        for s in np.unique(shard_of).tolist():
            docs = want[shard_of == s]  # ascending document order = ascending offsets within a shard
            shard = self._open(s)
            positions = zip(self.offset[docs].tolist(), self.length[docs].tolist())
            for i, raw in zip(docs.tolist(), read_raw(shard, positions)):
                found[i] = decode_raw(shard.fmt, raw)
        return [found[i] for i in idx.tolist()]

    def id_at(self, i: int) -> str:
        a, b = int(self._id_offsets[i]), int(self._id_offsets[i + 1])
        return bytes(self._ids[a:b]).decode("utf-8")

    def ids_at(self, indices) -> list[str]:
        return [self.id_at(int(i)) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]

    def iter_ids(self, batch_size: int = 1 << 16) -> Iterator[list[str]]:
        for a in range(0, len(self), batch_size):
            b = min(len(self), a + batch_size)
            offs = np.asarray(self._id_offsets[a : b + 1], dtype=np.int64)
            blob = bytes(self._ids[offs[0] : offs[-1]])
            rel = (offs - offs[0]).tolist()
            yield [blob[rel[k] : rel[k + 1]].decode("utf-8") for k in range(b - a)]


class LegacyDocs:
    """Read side of a data directory written before the index (0.1.0): documents.jsonl holds every id and text."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._n: int | None = None

    def _rows(self) -> Iterator[dict]:
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)

    def __len__(self) -> int:
        if self._n is None:
            with open(self.path, "rb") as f:
                self._n = sum(1 for _ in f)
        return self._n

    def iter_texts(self, batch_size: int = 1024, start: int = 0) -> Iterator[list[str]]:
        return _batches((row["text"] for row in itertools.islice(self._rows(), start, None)), batch_size)

    def texts_at(self, indices) -> list[str]:
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        want = set(idx)
        found = {i: row["text"] for i, row in enumerate(self._rows()) if i in want}
        return [found[i] for i in idx]

    def ids_at(self, indices) -> list[str]:
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        want = set(idx)
        found = {i: row["id"] for i, row in enumerate(self._rows()) if i in want}
        return [found[i] for i in idx]

    def iter_ids(self, batch_size: int = 1 << 16) -> Iterator[list[str]]:
        batch: list[str] = []
        for row in self._rows():
            batch.append(row["id"])
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of `size` items (the last one shorter), read lazily."""
    while batch := list(itertools.islice(items, size)):
        yield batch
