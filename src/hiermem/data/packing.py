"""Tokenised documents -> fixed-length training sequences, stored as memory-mapped .npy files.

Two on-disk stages, each a folder written atomically (AtomicDir: a failure leaves no folder):

* doc store (`write_doc_tokens` / `DocTokens`): every document's tokens, flat, plus offsets.
* packed set (`pack_sequences` / `PackedDataset`): rows of seq_len+1 tokens, cut per group (leaf), with
  a segment index per token so attention and loss never cross a document boundary.

Both are plain .npy files that `np.load(..., mmap_mode="r")` opens, so a corpus larger than RAM streams.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import torch

from hiermem.errors import HiermemError
from hiermem.io_utils import AtomicDir, atomic_write_json

PAD_SEGMENT = 65535  # segment value of padding tokens in segments.npy
IGNORE_INDEX = -100  # target value ignored by the loss


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
    """Stream token lists (one per document, any int sequence/array) into out_dir/{tokens,offsets}.npy.

    One pass, bounded memory: tokens are appended to tokens.npy behind a header written for shape (0,)
    and the header is rewritten with the final length at the end (numpy reserves room in the header for
    the length to grow, so the data never moves). Only the offsets (8 bytes per document) stay in RAM.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.uint16, np.uint32):
        raise ValueError(f"dtype must be uint16 or uint32, got {dtype}")
    limit = np.iinfo(dtype).max
    offsets = array("q", [0])
    with AtomicDir(Path(out_dir)) as tmp:
        with open(tmp / "tokens.npy", "wb") as f:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
            np.lib.format.write_array_header_1_0(f, {**header, "shape": (0,)})
            data_start = f.tell()
            for i, toks in enumerate(token_lists):
                toks = np.asarray(toks)
                if toks.size and (toks.min() < 0 or toks.max() > limit):
                    raise ValueError(f"document {i}: token id out of range for {dtype}")
                f.write(toks.astype(dtype, copy=False).tobytes())
                offsets.append(offsets[-1] + toks.size)
            f.seek(0)
            np.lib.format.write_array_header_1_0(f, {**header, "shape": (offsets[-1],)})
            if f.tell() != data_start:  # cannot happen with numpy >= 1.24 (growth padding)
                raise RuntimeError("npy header size changed; cannot finalise tokens.npy in place")
        np.save(tmp / "offsets.npy", np.frombuffer(offsets, dtype=np.int64))
        atomic_write_json(tmp / "meta.json", {"n_docs": len(offsets) - 1, "n_tokens": offsets[-1], "dtype": dtype.name})
    return Path(out_dir)


class DocTokens:
    """Read side of the doc store: `store[i]` is document i's tokens (a memmap slice, no copy)."""

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)
        self.tokens = _load(self.dir / "tokens.npy")
        self.offsets = np.asarray(_load(self.dir / "offsets.npy", mmap=False), dtype=np.int64)
        if self.offsets.ndim != 1 or len(self.offsets) < 1 or self.offsets[-1] != len(self.tokens):
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
) -> Path:
    """Pack documents into rows of seq_len+1 tokens (x = row[:-1], y = row[1:]) in out_dir.

    doc_index: the documents to pack, in order. group_of_doc: one group id per entry of doc_index
    (e.g. its leaf); None = a single group 0. Groups are packed in ascending id, documents within a
    group in the given order, each as its tokens + [eos]; the group's stream is cut into non-overlapping
    rows (one boundary target per row is lost, as in nanoGPT), a document may continue into the next
    row (as a new segment), and the group's last row is padded with pad_id. Rows never mix groups.
    path_of_group maps a group id to its root-to-leaf path (length depth), by dict or array row.
    Documents with no tokens are skipped (a lone eos would teach nothing).
    """
    L = seq_len + 1
    if not 1 <= seq_len < PAD_SEGMENT - 1:
        raise ValueError(f"seq_len must be in [1, {PAD_SEGMENT - 2}], got {seq_len}")
    doc_index = np.asarray(doc_index, dtype=np.int64)
    groups = np.zeros(len(doc_index), np.int64) if group_of_doc is None else np.asarray(group_of_doc, np.int64)
    if groups.shape != doc_index.shape:
        raise ValueError(f"group_of_doc has {len(groups)} entries, doc_index has {len(doc_index)}")
    if len(doc_index) and (doc_index.min() < 0 or doc_index.max() >= len(doc_tokens)):
        raise ValueError(f"doc_index out of range for a store of {len(doc_tokens)} documents")
    dtype = doc_tokens.dtype
    for name, tok in (("eos_id", eos_id), ("pad_id", pad_id)):
        if not 0 <= tok <= np.iinfo(dtype).max:
            raise ValueError(f"{name}={tok} does not fit {dtype}")

    lengths = doc_tokens.lengths[doc_index]
    keep = lengths > 0
    doc_index, groups, lengths = doc_index[keep], groups[keep], lengths[keep]
    order = np.argsort(groups, kind="stable")  # by group, given order inside a group
    doc_index, groups, lengths = doc_index[order], groups[order], lengths[order]
    uniq, starts = np.unique(groups, return_index=True)
    bounds = list(starts) + [len(groups)]
    stream_len = [int((lengths[a:b] + 1).sum()) for a, b in zip(bounds[:-1], bounds[1:])]
    rows = [-(-n // L) for n in stream_len]
    n_rows = sum(rows)
    if n_rows == 0:
        raise HiermemError(f"{out_dir}: nothing to pack (no selected document has tokens)")
    paths = _path_table(path_of_group, uniq, depth)

    open_mm = np.lib.format.open_memmap
    out_dir = Path(out_dir)
    with AtomicDir(out_dir) as tmp:
        tok_mm = open_mm(tmp / "tokens.npy", mode="w+", dtype=dtype, shape=(n_rows, L))
        seg_mm = open_mm(tmp / "segments.npy", mode="w+", dtype=np.uint16, shape=(n_rows, L))
        tok_flat, seg_flat = tok_mm.reshape(-1), seg_mm.reshape(-1)
        row0 = 0
        for gi, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            base = row0 * L
            _pack_group(doc_tokens, doc_index[a:b], eos_id, L, tok_flat[base:], seg_flat[base:])
            end = base + rows[gi] * L
            tok_flat[base + stream_len[gi] : end] = pad_id
            seg_flat[base + stream_len[gi] : end] = PAD_SEGMENT
            row0 += rows[gi]
        tok_mm.flush()
        seg_mm.flush()
        del tok_mm, seg_mm, tok_flat, seg_flat  # close the maps before AtomicDir fsyncs and renames
        np.save(tmp / "groups.npy", np.repeat(uniq, rows))
        group_paths = np.stack([paths[g] for g in uniq.tolist()]).reshape(len(uniq), depth)
        np.save(tmp / "paths.npy", np.repeat(group_paths, rows, axis=0))
        meta = {
            "seq_len": seq_len,
            "n_sequences": n_rows,
            "n_tokens": sum(stream_len),
            "n_docs": len(doc_index),
            "n_groups": len(uniq),
            "eos_id": int(eos_id),
            "pad_id": int(pad_id),
            "depth": depth,
            "dtype": dtype.name,
            "inputs_sha256": _inputs_hash(doc_tokens, doc_index, groups, paths, seq_len, eos_id, pad_id),
        }
        atomic_write_json(tmp / "meta.json", meta)
    return out_dir


def _pack_group(store: DocTokens, docs: np.ndarray, eos_id: int, L: int, tok: np.ndarray, seg: np.ndarray) -> None:
    """Write one group's stream at the start of the flat views tok/seg (row-aligned)."""
    pos = 0  # position in the group's stream
    first = 0  # local index of the first document that appears in the current row
    for k, d in enumerate(docs.tolist()):
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
        pos = end


def _inputs_hash(store: DocTokens, doc_index, groups, paths, seq_len, eos_id, pad_id) -> str:
    """Cheap identity of the packing inputs (doc selection, grouping, paths, doc lengths; not token values)."""
    h = hashlib.sha256()
    h.update(json.dumps([seq_len, int(eos_id), int(pad_id), store.dtype.name]).encode())
    for arr in (store.offsets, doc_index, groups):
        h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
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
        self.paths = _load(self.dir / "paths.npy", mmap=False)
        self.groups = _load(self.dir / "groups.npy", mmap=False)
        n, L = len(self.tokens), self.meta.get("seq_len", -1) + 1
        if self.tokens.shape != (n, L) or self.segments.shape != (n, L) or len(self.paths) != n or len(self.groups) != n:
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

    def __init__(self, n: int, batch_size: int, seed: int = 0, drop_last: bool = False):
        if n <= 0 or batch_size <= 0:
            raise ValueError(f"need n > 0 and batch_size > 0, got n={n}, batch_size={batch_size}")
        if drop_last and batch_size > n:
            raise ValueError(f"batch_size {batch_size} > n {n} with drop_last: no batch at all")
        self.n, self.batch_size, self.seed, self.drop_last = n, batch_size, seed, drop_last
        self.epoch = 0
        self.cursor = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def _epoch_end(self) -> int:
        return self.batches_per_epoch * self.batch_size if self.drop_last else self.n

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.seed + epoch).permutation(self.n)

    def __iter__(self) -> Iterator[np.ndarray]:
        perm_epoch, perm = -1, None
        while True:
            if self.cursor >= self._epoch_end():
                self.epoch, self.cursor = self.epoch + 1, 0
            if perm_epoch != self.epoch:
                perm_epoch, perm = self.epoch, self.permutation(self.epoch)
            batch = perm[self.cursor : min(self.cursor + self.batch_size, self._epoch_end())]
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
