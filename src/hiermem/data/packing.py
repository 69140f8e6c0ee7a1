"""Tokenised documents -> fixed-length training sequences, stored as memory-mapped .npy files.

Two on-disk stages, each a folder written atomically (AtomicDir: a failure leaves no folder):

* doc store (`write_doc_tokens` / `DocTokens`): every document's tokens, flat, plus offsets.
* packed set (`pack_selection` / `PackedDataset`): rows of seq_len+1 tokens per group (leaf), either cut
  from the concatenated documents or packed best-fit (whole documents where they fit), with a segment
  index per token so attention and loss never cross a document boundary, and each row's token count
  (row_tokens.npy: what a data-sharded run balances by, without reading the segments).

Both are plain .npy files that `np.load(..., mmap_mode="r")` opens, so a corpus larger than RAM streams.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch

from hiermem.data.npyfile import NpyAppender, counting_sort, permutation
from hiermem.errors import HiermemError
from hiermem.io_utils import AtomicDir, atomic_write_json

PAD_SEGMENT = 65535  # segment value of padding tokens in segments.npy
IGNORE_INDEX = -100  # target value ignored by the loss
PACKING_ALGOS = ("concat", "best_fit")
PACK_CHUNK = 1 << 16  # documents read at a time while packing
BEST_FIT_WINDOW = 1 << 20  # documents of one group placed together by best_fit (bounds its per-piece arrays)


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every token id."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def _load(path: Path, mmap: bool = True) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise HiermemError(f"{path}: no such file or directory") from None
    except (OSError, ValueError) as e:
        raise HiermemError(f"{path}: not a valid .npy file ({e})") from None


def _load_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HiermemError(f"{path}: no such file or directory") from None
    except (OSError, ValueError) as e:
        raise HiermemError(f"{path}: cannot read ({e})") from None


# --- doc store -----------------------------------------------------------------------------------------


def write_doc_tokens(out_dir: str | Path, token_lists: Iterable, dtype) -> Path:
    """Stream token lists (one per document, any int sequence/array) into out_dir/{tokens,offsets}.npy and
    meta.json, atomically: the token store `hiermem prepare` writes, through the same appender (npyfile.py),
    in bounded memory. For callers that have their documents' tokens already (tests, tools)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.uint16, np.uint32):
        raise ValueError(f"dtype must be uint16 or uint32, got {dtype}")
    limit = np.iinfo(dtype).max
    with AtomicDir(Path(out_dir)) as tmp:
        tokens, offsets = NpyAppender(tmp / "tokens.npy", dtype), NpyAppender(tmp / "offsets.npy", np.int64)
        try:
            offsets.append([0])
            for i, toks in enumerate(token_lists):
                toks = np.asarray(toks)
                if toks.size and (toks.min() < 0 or toks.max() > limit):
                    raise ValueError(f"document {i}: token id out of range for {dtype}")
                tokens.append(toks)
                offsets.append([tokens.count])
            tokens.finalize()
            offsets.finalize()
        finally:
            tokens.close()
            offsets.close()
        atomic_write_json(tmp / "meta.json", {"n_docs": offsets.count - 1, "n_tokens": tokens.count,
                                              "dtype": dtype.name})
    return Path(out_dir)


class DocTokens:
    """Read side of the doc store: `store[i]` is document i's tokens (a memmap slice, no copy)."""

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)
        self.tokens = _load(self.dir / "tokens.npy")
        self.offsets = _load(self.dir / "offsets.npy")  # memory-mapped: 8 bytes a document stay on disk
        if (self.offsets.ndim != 1 or self.offsets.dtype != np.int64 or len(self.offsets) < 1
                or self.offsets[-1] != len(self.tokens)):
            raise HiermemError(f"{self.dir}: offsets.npy does not match tokens.npy (corrupt doc store)")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def dtype(self) -> np.dtype:
        return self.tokens.dtype


# --- packing -------------------------------------------------------------------------------------------


def _path_table(path_of_group, groups: np.ndarray, depth: int) -> dict[int, np.ndarray]:
    table: dict[int, np.ndarray] = {}
    for g in groups.tolist():
        if depth == 0:
            table[g] = np.zeros(0, np.int64)
            continue
        if path_of_group is None:
            raise ValueError(f"depth={depth} needs path_of_group")
        try:
            p = np.asarray(path_of_group[g], dtype=np.int64)
        except (KeyError, IndexError):
            raise ValueError(f"path_of_group has no path for group {g}") from None
        if p.shape != (depth,):
            raise ValueError(f"path of group {g} has shape {p.shape}, expected ({depth},)")
        table[g] = p
    return table


def pack_sequences(
    doc_tokens: DocTokens,
    doc_index: np.ndarray,
    seq_len: int,
    eos_id: int,
    out_dir: str | Path,
    group_of_doc: np.ndarray | None = None,
    path_of_group: Mapping[int, tuple[int, ...]] | np.ndarray | None = None,
    depth: int = 0,
    pad_id: int = 0,
    algo: str = "concat",
) -> Path:
    """Pack documents into rows of seq_len+1 tokens (x = row[:-1], y = row[1:]) in out_dir.

    doc_index: the documents to pack, in order. group_of_doc: one group id per entry of doc_index
    (e.g. its leaf); None = a single group 0. Both may be memory-mapped: they are read PACK_CHUNK entries
    at a time. See `pack_selection` for the layout.
    """
    n = len(doc_index)
    if group_of_doc is not None and len(group_of_doc) != n:
        raise ValueError(f"group_of_doc has {len(group_of_doc)} entries, doc_index has {n}")

    def selection() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for a in range(0, n, PACK_CHUNK):
            docs = np.asarray(doc_index[a : a + PACK_CHUNK], dtype=np.int64)
            groups = (np.zeros(len(docs), np.int64) if group_of_doc is None
                      else np.asarray(group_of_doc[a : a + PACK_CHUNK], dtype=np.int64))
            yield docs, groups

    return pack_selection(doc_tokens, selection, seq_len, eos_id, out_dir, path_of_group, depth, pad_id, algo)


def pack_selection(
    doc_tokens: DocTokens,
    selection: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    seq_len: int,
    eos_id: int,
    out_dir: str | Path,
    path_of_group: Mapping[int, tuple[int, ...]] | np.ndarray | None = None,
    depth: int = 0,
    pad_id: int = 0,
    algo: str = "concat",
) -> Path:
    """Pack the documents that selection() yields, as chunks of (document ids, their group ids), in out_dir.

    selection is called twice (once to count, once to sort), so it must yield the same chunks each time.
    Groups are packed in ascending id, each document as its tokens + [eos], in the given order inside a
    group; rows never mix groups. path_of_group maps a group id to its root-to-leaf path (length depth), by
    dict or array row. Documents with no tokens are skipped (a lone eos would teach nothing).

    algo="concat": a group's documents form one stream cut into non-overlapping rows (one boundary target
    per row is lost, as in nanoGPT); a document may continue into the next row (as a new segment) and the
    group's last row is padded with pad_id.
    algo="best_fit" (Ding et al. 2024, "Fewer Truncations Improve Language Modeling"): a document that
    fits in a row is never split, a longer one is cut into row-sized chunks (and a shorter tail); the
    pieces are packed best-fit-decreasing (see `best_fit_decreasing`) and the rest of a row is padding.
    A group of more than BEST_FIT_WINDOW documents is placed one window of documents at a time.

    Memory does not grow with the corpus: documents are sorted by group with a counting sort into a
    memory-mapped file, and rows are written into memory-mapped regions of the output group by group, so
    what is held is one chunk, one window and a few numbers per group.
    """
    L = seq_len + 1
    if algo not in PACKING_ALGOS:
        raise ValueError(f"algo must be one of {', '.join(PACKING_ALGOS)}, got {algo!r}")
    if not 1 <= seq_len < PAD_SEGMENT - 1:
        raise ValueError(f"seq_len must be in [1, {PAD_SEGMENT - 2}], got {seq_len}")
    dtype = doc_tokens.dtype
    for name, tok in (("eos_id", eos_id), ("pad_id", pad_id)):
        if not 0 <= tok <= np.iinfo(dtype).max:
            raise ValueError(f"{name}={tok} does not fit {dtype}")
    groups, n_docs, n_spans = _count_groups(doc_tokens, selection)
    if n_docs.sum() == 0:
        raise HiermemError(f"{out_dir}: nothing to pack (no selected document has tokens)")
    paths = _path_table(path_of_group, groups, depth)

    out_dir = Path(out_dir)
    with AtomicDir(out_dir) as tmp:
        order = _sort_by_group(doc_tokens, selection, groups, n_docs, tmp / "order.npy")
        tok_rows, seg_rows = _GrowingRows(tmp / "tokens.npy", dtype, L), _GrowingRows(tmp / "segments.npy", np.uint16, L)
        fill_rows = _GrowingRows(tmp / "row_tokens.npy", np.int32, None)  # tokens per row: plans skip a scan
        rows, n_split, first = np.zeros(len(groups), np.int64), 0, 0
        for i, count in enumerate(n_docs.tolist()):
            docs = order[first : first + count]
            first += count
            if algo == "concat":
                rows[i] = -(-int(n_spans[i]) // L)
                n_split += _write_concat(doc_tokens, docs, eos_id, pad_id, L, tok_rows.extend(rows[i]),
                                         seg_rows.extend(rows[i]))
                fill = fill_rows.extend(rows[i])
                fill[:] = L  # every row full but the group's last
                fill[-1] = int(n_spans[i]) - (rows[i] - 1) * L
            else:
                for a in range(0, count, BEST_FIT_WINDOW):
                    window = np.asarray(docs[a : a + BEST_FIT_WINDOW])
                    lay = _BestFitLayout(_lengths(doc_tokens, window) + 1, L)
                    lay.write(doc_tokens, window, eos_id, pad_id, tok_rows.extend(lay.n_rows),
                              seg_rows.extend(lay.n_rows))
                    fill_rows.extend(lay.n_rows)[:] = lay.fill()
                    rows[i] += lay.n_rows
                    n_split += lay.n_docs_split()
        for grown in (tok_rows, seg_rows, fill_rows):
            grown.finalize()
        _write_per_row(tmp / "groups.npy", [np.array([g]) for g in groups.tolist()], rows, np.int64)
        _write_per_row(tmp / "paths.npy", [paths[g].reshape(1, depth) for g in groups.tolist()], rows, np.int64)
        inputs = _inputs_hash(doc_tokens, order, groups, n_docs, paths, seq_len, eos_id, pad_id, algo)
        del order
        (tmp / "order.npy").unlink()
        n_rows, n_tokens = int(rows.sum()), int(n_spans.sum())
        meta = {
            "seq_len": seq_len,
            "n_sequences": n_rows,
            "n_tokens": n_tokens,
            "n_docs": int(n_docs.sum()),
            "n_groups": len(groups),
            "eos_id": int(eos_id),
            "pad_id": int(pad_id),
            "depth": depth,
            "dtype": dtype.name,
            "packing_algo": algo,
            "padding_fraction": 1.0 - n_tokens / (n_rows * L),
            "n_docs_split": n_split,
            "inputs_sha256": inputs,
        }
        atomic_write_json(tmp / "meta.json", meta)
    return out_dir


def _lengths(store: DocTokens, docs: np.ndarray) -> np.ndarray:
    return store.offsets[docs + 1] - store.offsets[docs]


def _count_groups(store: DocTokens, selection) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First pass: (group ids ascending, non-empty documents in each, their tokens + eos in each)."""
    docs_of: dict[int, int] = {}
    spans_of: dict[int, int] = {}
    for docs, groups in selection():
        if len(docs) and (docs.min() < 0 or docs.max() >= len(store)):
            raise ValueError(f"doc_index out of range for a store of {len(store)} documents")
        lengths = _lengths(store, docs)
        keep = lengths > 0
        uniq, inverse, counts = np.unique(groups[keep], return_inverse=True, return_counts=True)
        spans = np.bincount(inverse, weights=lengths[keep] + 1, minlength=len(uniq))
        for g, c, s in zip(uniq.tolist(), counts.tolist(), spans.tolist()):
            docs_of[g] = docs_of.get(g, 0) + c
            spans_of[g] = spans_of.get(g, 0) + int(s)
    groups = np.array(sorted(docs_of), dtype=np.int64)
    return (groups, np.array([docs_of[g] for g in groups.tolist()], np.int64),
            np.array([spans_of[g] for g in groups.tolist()], np.int64))


def _sort_by_group(store: DocTokens, selection, groups: np.ndarray, n_docs: np.ndarray, path: Path) -> np.ndarray:
    """Second pass, a counting sort: the non-empty documents by group (given order inside a group), in a
    memory-mapped file."""
    def chunks():
        for docs, chunk_groups in selection():
            keep = _lengths(store, docs) > 0
            yield docs[keep], np.searchsorted(groups, chunk_groups[keep])

    return counting_sort(chunks, n_docs, path)


class _GrowingRows:
    """A 2-d .npy file of rows of L items (L None: a 1-d file of one item a row), grown at its end: `extend(n)`
    lengthens the file by n rows and returns them as a flat memory-mapped view to fill; `finalize` writes the
    header for the final row count (numpy pads the header so that the first axis may grow: the data never
    moves)."""

    def __init__(self, path: Path, dtype, L: int | None):
        self.path, self.dtype, self.L, self.n = path, np.dtype(dtype), L, 0
        self.header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False}
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {**self.header, "shape": self._shape()})
            self.start = f.tell()

    def _shape(self) -> tuple[int, ...]:
        return (self.n,) if self.L is None else (self.n, self.L)

    def extend(self, n_rows: int) -> np.ndarray:
        n_rows, width = int(n_rows), self.L or 1
        row_bytes = width * self.dtype.itemsize
        os.truncate(self.path, self.start + (self.n + n_rows) * row_bytes)
        view = np.memmap(self.path, self.dtype, "r+", offset=self.start + self.n * row_bytes, shape=(n_rows * width,))
        self.n += n_rows
        return view  # unmapped when dropped; AtomicDir fsyncs the file before the rename

    def finalize(self) -> None:
        with open(self.path, "r+b") as f:
            np.lib.format.write_array_header_1_0(f, {**self.header, "shape": self._shape()})
            if f.tell() != self.start:  # cannot happen with numpy >= 1.24 (growth padding)
                raise RuntimeError(f"{self.path}: npy header size changed; cannot finalise in place")


def _write_per_row(path: Path, values: list[np.ndarray], rows: np.ndarray, dtype) -> None:
    """An .npy of each group's value (shape (1, ...)) repeated once per row of the group, written group by group."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(int(rows.sum()), *values[0].shape[1:]))
    r = 0
    for v, n in zip(values, rows.tolist()):
        out[r : r + n] = v
        r += n
    out.flush()
    del out


def _write_concat(store: DocTokens, docs: np.ndarray, eos_id: int, pad_id: int, L: int, tok: np.ndarray,
                  seg: np.ndarray) -> int:
    """concat, one group: its documents (+eos) back to back from row 0 of the flat views tok/seg, the last row
    padded. Returns how many documents cross a row boundary (their tail opens the next row as a new segment)."""
    pos = 0  # position in the group's stream
    first = 0  # index of the first document that appears in the current row
    split = 0
    for a in range(0, len(docs), PACK_CHUNK):
        for k, d in enumerate(np.asarray(docs[a : a + PACK_CHUNK]).tolist(), start=a):
            t = store[d]
            end = pos + len(t) + 1
            tok[pos : end - 1] = t
            tok[end - 1] = eos_id
            if pos % L == 0:
                first = k
            row_end = (pos // L + 1) * L
            seg[pos : min(end, row_end)] = k - first
            if end > row_end:  # continues into later rows, where it is the first segment
                seg[row_end:end] = 0
                first = k
                split += 1
            pos = end
    tok[pos:] = pad_id
    seg[pos:] = PAD_SEGMENT
    return split


class _BestFitLayout:
    """best_fit, one group (or window of one): whole documents where they fit, row-sized chunks otherwise,
    placed best-fit-decreasing.

    Only per-piece numbers are held (a piece = a document, or a chunk of a longer one): O(documents + rows).
    Pieces are numbered in stream order (document, chunk), so writing them reads the store in order.
    """

    def __init__(self, spans: np.ndarray, L: int):
        self.spans, self.L = spans, L
        n_pieces = -(-spans // L)
        self.piece_doc = np.repeat(np.arange(len(spans)), n_pieces)  # index into the window's documents
        first_piece = np.cumsum(n_pieces) - n_pieces
        self.piece_start = (np.arange(len(self.piece_doc)) - first_piece[self.piece_doc]) * L  # offset in its doc
        self.piece_len = np.minimum(L, spans[self.piece_doc] - self.piece_start)
        self.row, self.offset, self.n_rows = best_fit_decreasing(self.piece_len, L)
        self.segment = _rank_within_row(self.row, self.offset)

    def n_docs_split(self) -> int:
        return int((self.spans > self.L).sum())

    def fill(self) -> np.ndarray:
        """Tokens in each row (the rest of a row is padding)."""
        return np.bincount(self.row, weights=self.piece_len, minlength=self.n_rows).astype(np.int64)

    def write(self, store: DocTokens, docs: np.ndarray, eos_id: int, pad_id: int, tok: np.ndarray,
              seg: np.ndarray) -> None:
        L, spans, cur, t = self.L, self.spans, -1, None
        for k, start, n, r, off, s in zip(self.piece_doc.tolist(), self.piece_start.tolist(),
                                          self.piece_len.tolist(), self.row.tolist(), self.offset.tolist(),
                                          self.segment.tolist()):
            if k != cur:
                cur, t = k, store[int(docs[k])]
            dst = r * L + off
            if start + n == spans[k]:  # the document's last piece ends with its eos
                tok[dst : dst + n - 1] = t[start:]
                tok[dst + n - 1] = eos_id
            else:
                tok[dst : dst + n] = t[start : start + n]
            seg[dst : dst + n] = s
        fill = self.fill()
        for r in np.flatnonzero(fill < L).tolist():
            tok[r * L + fill[r] : (r + 1) * L] = pad_id
            seg[r * L + fill[r] : (r + 1) * L] = PAD_SEGMENT


def _rank_within_row(row: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Segment id of each piece: its rank by offset among the pieces of its row."""
    order = np.lexsort((offset, row))
    sorted_rows = row[order]
    is_first = np.ones(len(order), bool)
    is_first[1:] = sorted_rows[1:] != sorted_rows[:-1]
    run_start = np.maximum.accumulate(np.where(is_first, np.arange(len(order)), 0))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order)) - run_start
    return rank


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Place items of the given lengths (each <= capacity) into bins: (bin, offset in it) per item, n_bins.

    Longest first (equal lengths in the given order), each item goes into the open bin with the least
    remaining room that still holds it, the lowest-numbered such bin on ties, else into a new bin. Bins are
    numbered in the order they are opened, items laid out in a bin in the order they arrive. O(n log capacity).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"item lengths must be in [1, {capacity}]")
    bins = np.empty(len(lengths), np.int64)
    offsets = np.empty(len(lengths), np.int64)
    open_bins = _RoomIndex(capacity)
    n_bins = 0
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        room = open_bins.least_room_at_least(n)
        if room < 0:
            b, room, n_bins = n_bins, capacity, n_bins + 1
        else:
            b = open_bins.pop(room)
        bins[i], offsets[i] = b, capacity - room
        if room > n:
            open_bins.add(room - n, b)
    return bins, offsets, n_bins


class _RoomIndex:
    """Open bins by remaining room (1..capacity): a min-heap of bin numbers per room, plus a segment tree
    over rooms marking the non-empty heaps, to find the least room >= n in O(log capacity)."""

    def __init__(self, capacity: int):
        self.size = 1 << capacity.bit_length()  # leaves for rooms 0..capacity
        self.tree = bytearray(2 * self.size)  # 1 where a room (leaf) or a range (node) has an open bin
        self.heaps: list[list[int]] = [[] for _ in range(capacity + 1)]

    def add(self, room: int, b: int) -> None:
        heapq.heappush(self.heaps[room], b)
        if len(self.heaps[room]) == 1:
            self._mark(room, 1)

    def pop(self, room: int) -> int:
        b = heapq.heappop(self.heaps[room])
        if not self.heaps[room]:
            self._mark(room, 0)
        return b

    def _mark(self, room: int, value: int) -> None:
        tree, i = self.tree, room + self.size
        tree[i] = value
        i >>= 1
        while i and tree[i] != (tree[2 * i] | tree[2 * i + 1]):
            tree[i] = tree[2 * i] | tree[2 * i + 1]
            i >>= 1

    def least_room_at_least(self, n: int) -> int:
        """The least room >= n that some open bin has, or -1."""
        tree, size = self.tree, self.size
        i = n + size
        if i >= 2 * size:
            return -1
        if tree[i]:
            return n
        while i > 1:  # up until a right sibling holds an open bin, then down to its leftmost one
            if not i & 1 and tree[i + 1]:
                i += 1
                while i < size:
                    i = 2 * i if tree[2 * i] else 2 * i + 1
                return i - size
            i >>= 1
        return -1


def _inputs_hash(store: DocTokens, order, groups, n_docs, paths, seq_len, eos_id, pad_id, algo) -> str:
    """Cheap identity of the packing inputs (doc lengths, the documents by group, their groups, paths; not token
    values), hashed chunk by chunk: the bytes are those of the whole arrays."""
    h = hashlib.sha256()
    head = [seq_len, int(eos_id), int(pad_id), store.dtype.name] + ([] if algo == "concat" else [algo])
    h.update(json.dumps(head).encode())
    for arr in (store.offsets, order):
        for a in range(0, len(arr), PACK_CHUNK):
            h.update(np.ascontiguousarray(arr[a : a + PACK_CHUNK], dtype=np.int64).tobytes())
    for g, n in zip(groups.tolist(), n_docs.tolist()):
        for a in range(0, n, PACK_CHUNK):
            h.update(np.full(min(PACK_CHUNK, n - a), g, dtype=np.int64).tobytes())
    for g in sorted(paths):
        h.update(np.asarray([g, *paths[g]], dtype=np.int64).tobytes())
    return h.hexdigest()


# --- reading packed data -------------------------------------------------------------------------------


class PackedDataset:
    """Memory-mapped packed sequences; `batch(indices)` builds model-ready tensors.

    Positions restart at 0 at every segment start (RoPE sees each document from position 0), also for a
    document continued from the previous row: that row holds none of its earlier context anyway.
    """

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)
        if not self.dir.is_dir():
            raise HiermemError(f"{self.dir}: no such packed-data folder")
        self.meta = _load_meta(self.dir)
        self.tokens = _load(self.dir / "tokens.npy")
        self.segments = _load(self.dir / "segments.npy")
        self.paths = _load(self.dir / "paths.npy")
        self.groups = _load(self.dir / "groups.npy")
        # tokens per row; a folder packed before it was written has none, and its rows are counted instead
        self.fill = _load(self.dir / "row_tokens.npy") if (self.dir / "row_tokens.npy").is_file() else None
        n, L = len(self.tokens), self.meta.get("seq_len", -1) + 1
        if (self.tokens.shape != (n, L) or self.segments.shape != (n, L) or len(self.paths) != n
                or len(self.groups) != n or (self.fill is not None and self.fill.shape != (n,))):
            raise HiermemError(f"{self.dir}: packed arrays disagree with meta.json (corrupt or mixed folder)")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def seq_len(self) -> int:
        return int(self.meta["seq_len"])

    @property
    def depth(self) -> int:
        return int(self.meta["depth"])

    def packing_stats(self) -> dict:
        """How the rows were packed: algo, rows, tokens (eos included), padding fraction, documents split
        across rows (absent for a folder packed before these were recorded)."""
        m, slots = self.meta, len(self) * (self.seq_len + 1)
        stats = {"algo": m.get("packing_algo", "concat"), "rows": len(self), "tokens": self.n_tokens,
                 "padding_fraction": m.get("padding_fraction", 1.0 - self.n_tokens / slots)}
        if "n_docs_split" in m:
            stats["docs_split"] = m["n_docs_split"]
        return stats

    def row_tokens(self, start: int, stop: int, chunk: int = 4096) -> np.ndarray:
        """Tokens (not padding) in rows start .. stop-1: from row_tokens.npy (4 bytes a row), else counted in
        the segments, `chunk` rows at a time (2 bytes a token)."""
        stop = min(stop, len(self))
        if self.fill is not None:
            return np.asarray(self.fill[start:stop], np.int64)
        out = np.empty(max(0, stop - start), np.int64)
        for a in range(start, stop, chunk):
            out[a - start : a - start + chunk] = (self.segments[a : min(stop, a + chunk)] != PAD_SEGMENT).sum(axis=1)
        return out

    def batch(self, indices) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        tok = self.tokens[idx].astype(np.int64)
        seg = self.segments[idx].astype(np.int64)
        seg[seg == PAD_SEGMENT] = -1
        x, y = tok[:, :-1], tok[:, 1:]
        sx, sy = seg[:, :-1], seg[:, 1:]
        # Predict y only inside the same document: eos is predicted, the next document's first token is not.
        targets = np.where((sx == sy) & (sy >= 0), y, IGNORE_INDEX)
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(x)),
            "targets": torch.from_numpy(targets),
            "segment_ids": torch.from_numpy(np.ascontiguousarray(sx)),
            "positions": torch.from_numpy(segment_positions(sx)),
            "paths": torch.from_numpy(np.asarray(self.paths[idx], dtype=np.int64)),
            "groups": torch.from_numpy(np.asarray(self.groups[idx], dtype=np.int64)),
        }


def segment_positions(seg: np.ndarray) -> np.ndarray:
    """Position of each token within its run of equal segment ids (padding, -1, gets 0)."""
    T = seg.shape[1]
    ar = np.broadcast_to(np.arange(T), seg.shape)
    starts = np.ones(seg.shape, bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    pos = ar - np.maximum.accumulate(np.where(starts, ar, 0), axis=1)
    return np.where(seg >= 0, pos, 0).astype(np.int64)


# --- sampling ------------------------------------------------------------------------------------------


class BatchSampler:
    """Infinite iterator of index batches; a fresh global shuffle per epoch (seed + epoch).

    The state ({"epoch", "cursor", "seed", "n"}) always points at the next batch to yield, so a run
    restored with load_state_dict (then iter()) continues with exactly the batch it would have seen.
    cursor counts samples already yielded in the current epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, drop_last: bool = False, work_dir: Path | None = None):
        if n <= 0 or batch_size <= 0:
            raise ValueError(f"need n > 0 and batch_size > 0, got n={n}, batch_size={batch_size}")
        if drop_last and batch_size > n:
            raise ValueError(f"batch_size {batch_size} > n {n} with drop_last: no batch at all")
        self.n, self.batch_size, self.seed, self.drop_last, self.work_dir = n, batch_size, seed, drop_last, work_dir
        self.epoch = 0
        self.cursor = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def _epoch_end(self) -> int:
        return self.batches_per_epoch * self.batch_size if self.drop_last else self.n

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's order of the rows. With a work_dir, from npyfile.MMAP_ORDER_ROWS rows on, the same order
        in a memory-mapped file there (unlinked at once): 8 bytes a row that are not anonymous memory."""
        return permutation(self.n, np.random.default_rng(self.seed + epoch), self.work_dir)

    def __iter__(self) -> Iterator[np.ndarray]:
        perm_epoch, perm = -1, None
        while True:
            if self.cursor >= self._epoch_end():
                self.epoch, self.cursor = self.epoch + 1, 0
            if perm_epoch != self.epoch:
                perm_epoch, perm = self.epoch, self.permutation(self.epoch)
            batch = np.array(perm[self.cursor : min(self.cursor + self.batch_size, self._epoch_end())])
            self.cursor += len(batch)  # advance before yielding: state_dict() names the next batch
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("n", self.n) != self.n:
            raise HiermemError(
                f"sampler state is for a dataset of {state['n']} sequences, this one has {self.n} (data changed?)"
            )
        self.epoch, self.cursor, self.seed = int(state["epoch"]), int(state["cursor"]), int(state["seed"])
