"""`hiermem prepare`: corpus shards -> document index + tokenizer + token store + train/val split, in a data
directory, streaming (peak memory does not grow with the corpus) and resumable.

<data dir>/
  tokenizer.json      byte-level BPE (trained on a sample of the training split, or a user's tokenizer copied in)
  tokenizer_config.json  only for a user's tokenizer without "<|endoftext|>": its eos token, the documents' end
  index/              where each document lies in the corpus files, and its id (data/shards.py). Texts are read
                      from the corpus itself: a corpus file that changed since is refused when read.
  doc_tokens/         flat memory-mapped token store (packing.DocTokens)
  split.npy           bool per document: True = held out for validation
  prepare.json        what made this folder (data config, corpus, tokenizer fingerprint, eos token); written last
A later stage refuses a data directory made by another data config or tokenizer.

The stages: (1) index every shard (format errors stop here, naming file and line); (2) check ids for repeats
(on disk, data/shards.py); (3) the split; (4) the tokenizer, trained on the training documents in corpus
order until data.tokenizer_sample_bytes bytes of text (all of them for a smaller corpus: then it is the
tokenizer trained on the whole training split); (5) tokenise every shard, data.workers processes, into the
token store; (6) prepare.json. .prepare/progress.json records what is durable after each shard and stage:
a prepare that was killed or crashed continues from there when run again (with the same data config and
unchanged corpus files; the index of leading unchanged files is kept even when later ones changed). A
prepare that starts over (--force, or nothing to continue) first removes the previous outputs, packed/
included (its sequences were cut from the previous tokens).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing as mp
import shutil
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from hiermem.config import Config, diff_fields
from hiermem.data.npyfile import CannotResume, NpyAppender, shuffled_arange
from hiermem.data.packing import PACK_CHUNK, DocTokens, PackedDataset, pack_selection, token_dtype
from hiermem.data.readers import Document, Shard, decode_raw, iter_records, list_shards, quote_id
from hiermem.data.shards import DocIndex, IndexWriter, LegacyDocs, find_duplicate, shard_stat, write_shard_list
from hiermem.data.tokenize_workers import Encoder
from hiermem.data.tokenizer import Tokenizer, train_tokenizer
from hiermem.errors import HiermemError
from hiermem.integrity import (CHECKSUMS, SEAL, check_file, check_files, read_json, record, unseal,
                               write_sealed_json)
from hiermem.io_utils import atomic_write_json
from hiermem.locking import DirLock

WORK = ".prepare"  # resume state of an unfinished prepare; removed when the folder is complete
PROGRESS_VERSION = 1
BATCH_DOCS = 1024  # documents per tokenizer call
BATCH_BYTES = 4 << 20  # ... and at most this many bytes of raw records
SPLIT_CHUNK = 1 << 20  # split / permutation entries handled at once


def _prepare_key(cfg: Config) -> dict:
    d = cfg.data
    resolved = {k: str(Path(v).resolve()) if v else "" for k, v in (("corpus", d.corpus), ("tokenizer", d.tokenizer))}
    return {"corpus": resolved["corpus"], "tokenizer": resolved["tokenizer"],
            "vocab_size": d.vocab_size, "val_fraction": d.val_fraction, "seed": d.seed}


def _n_val(n: int, val_fraction: float) -> int:
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    return n_val


def split_mask(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Seeded document-level split; at least one validation document when a fraction is asked and n >= 2."""
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n)[:_n_val(n, val_fraction)]] = True
    return is_val


def write_split(path: Path, n: int, val_fraction: float, seed: int, work: Path) -> int:
    """split_mask(n, val_fraction, seed) into the .npy file path, in bounded memory: the permutation is
    shuffled in a memory-mapped file (npyfile.shuffled_arange: the same draws, so the same split). Returns the
    number of validation documents."""
    n_val = _n_val(n, val_fraction)
    mask = np.lib.format.open_memmap(path, mode="w+", dtype=bool, shape=(n,))
    if n_val:
        perm = shuffled_arange(n, np.random.default_rng(seed), work / "perm.npy", SPLIT_CHUNK)
        for a in range(0, n_val, SPLIT_CHUNK):
            mask[np.asarray(perm[a : min(n_val, a + SPLIT_CHUNK)])] = True
        del perm
    mask.flush()
    del mask
    return n_val


class DataDir:
    """Read access to a prepared data directory (and, once clustered, its tree and document paths)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = self.path / "prepare.json"
        if not meta.is_file():
            raise HiermemError(f"{self.path}: not a prepared data directory (run `hiermem prepare` first)")
        raw = read_json(meta, "data directory metadata", check_seal=False)
        # sealed since format 2 (a folder of hiermem 0.1.0 has no "format"): a damaged one is refused
        self.meta = unseal(meta, raw) if "format" in raw else {k: v for k, v in raw.items() if k != SEAL}
        self._docs_cache = None

    def check(self, cfg: Config) -> None:
        diffs = diff_fields(self.meta["key"], _prepare_key(cfg), "data.")  # every key is a data.* field
        sample = self.meta.get("tokenizer_sample")
        if sample and not cfg.data.tokenizer:
            lo, hi = sample["same_for"]  # the budgets that select the same sample, hence the same tokenizer
            budget = cfg.data.tokenizer_sample_bytes
            if budget < lo or (hi is not None and budget > hi):
                diffs.append(f"data.tokenizer_sample_bytes ({sample['budget']!r} vs {budget!r}: another "
                             f"tokenizer sample)")
        if diffs:
            raise HiermemError(f"{self.path}: prepared with another data config: {'; '.join(diffs)}")

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.path / "tokenizer.json")

    def doc_tokens(self) -> DocTokens:
        folder = self.path / "doc_tokens"  # offsets are read whole: in full; tokens: size (in full by _pack)
        check_files([folder / "offsets.npy", folder / "meta.json"], "token store", full=True)
        check_files([folder / "tokens.npy"], "token store", full=False)
        return DocTokens(folder)

    def is_val(self) -> np.ndarray:
        """One bool per document, memory-mapped (callers that need it whole read it whole)."""
        check_file(self.path / "split.npy", "train/val split")  # checked in full: 1 byte a document
        return np.load(self.path / "split.npy", mmap_mode="r")

    @property
    def _docs(self) -> DocIndex | LegacyDocs:
        if self._docs_cache is None:
            if (self.path / "index" / "shards.json").is_file():
                self._docs_cache = DocIndex(self.path / "index")
            elif (self.path / "documents.jsonl").is_file():  # prepared by hiermem 0.1.0
                self._docs_cache = LegacyDocs(self.path / "documents.jsonl")
            else:
                raise HiermemError(f"{self.path}: no document index (index/shards.json); prepare again with --force")
        return self._docs_cache

    def documents(self) -> list[Document]:
        """Every id and text in RAM: for small data and tests."""
        return [Document(i, t) for i, t in zip(self.ids(), self.texts())]

    def texts(self) -> list[str]:
        """Every text in RAM: for small data and tests; stages that must scale use iter_texts."""
        return [t for batch in self.iter_texts() for t in batch]

    def iter_texts(self, batch_size: int = 1024, start: int = 0) -> Iterator[list[str]]:
        """The texts of documents start, start+1, ... in document order, batch_size at a time (the last batch
        may be shorter), read from the corpus files through the index (bounded memory)."""
        return self._docs.iter_texts(batch_size, start)

    def texts_at(self, indices) -> list[str]:
        """The texts of the documents `indices` (any order, repeats allowed), without holding the corpus in
        RAM. A compressed shard is decompressed from its start up to the last document asked for."""
        return self._docs.texts_at(indices)

    def ids(self) -> list[str]:
        """Every document's id, in document order (the ids alone: no text is read)."""
        return [i for batch in self._docs.iter_ids() for i in batch]

    def ids_at(self, indices) -> list[str]:
        return self._docs.ids_at(indices)

    def fingerprint(self) -> str:
        """Identifies this prepared corpus (its metadata, which names the corpus and the tokenizer)."""
        return hashlib.sha256((self.path / "prepare.json").read_bytes()).hexdigest()

    @property
    def n_docs(self) -> int:
        return int(self.meta["n_docs"])

    def packed(self, split: str, seq_len: int, doc_paths: np.ndarray | None = None,
               tree_id: str = "flat", algo: str = "concat") -> PackedDataset:
        """A split's packed sequences, cached under packed/ by (split, seq_len, tree, packing algo). With
        doc_paths (every document's root-to-leaf path) documents are packed per leaf, one path per sequence
        (the paper's App. A.2); without, in corpus order. algo: data.packing_algo (packing.pack_selection)."""
        out = self.packed_path(split, seq_len, tree_id, algo)
        out.parent.mkdir(parents=True, exist_ok=True)
        # several trainings may start at once on one data dir (the demo's parallel jobs): one packs, the
        # others wait on the lock and then reuse its output
        with open(out.parent / f".{out.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (out / "meta.json").is_file():
                self._packed_ok(out)  # a damaged cache is removed here, and packed again
            if not (out / "meta.json").is_file():
                self._pack(split, seq_len, doc_paths, out, algo)
                record(*(p for p in sorted(out.iterdir()) if p.is_file()))  # out/.checksums.json
        return PackedDataset(out)

    @staticmethod
    def _packed_ok(out: Path) -> bool:
        """A packed cache whose files match their checksums (in full up to FULL_CHECK_BYTES, else sizes) and
        open; a damaged one (or one without checksums) is removed, with a warning, to be packed again."""
        try:
            files = [out / name for name in sorted(read_json(out / CHECKSUMS, "checksum list").get("files", {}))]
            check_files(files, "packed data")
            PackedDataset(out)
            return True
        except HiermemError as e:
            print(f"warning: {e}; packing it again", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
            return False

    def packed_path(self, split: str, seq_len: int, tree_id: str = "flat", algo: str = "concat") -> Path:
        # concat keeps the key it had before packing algos existed, so its caches stay valid
        suffix = "" if algo == "concat" else f":{algo}"
        key = hashlib.sha256(f"{split}:{seq_len}:{tree_id}{suffix}".encode()).hexdigest()[:12]
        return self.path / "packed" / f"{split}-{key}"

    def _pack(self, split: str, seq_len: int, doc_paths: np.ndarray | None, out: Path, algo: str) -> None:
        """Pack a split, reading the split mask and doc_paths (both memory-mapped) PACK_CHUNK documents at a
        time, so that packing holds nothing per document."""
        is_val, want = self.is_val(), split == "val"

        def selection() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for a in range(0, len(is_val), PACK_CHUNK):
                docs = np.flatnonzero(is_val[a : a + PACK_CHUNK] == want) + a
                leaves = np.zeros(len(docs), np.int64) if doc_paths is None else np.asarray(doc_paths[docs, -1])
                yield docs, leaves

        n_docs, paths = 0, {}  # a leaf's path is any of its documents'
        for docs, leaves in selection():
            n_docs += len(docs)
            if doc_paths is not None:
                new, first = np.unique(leaves, return_index=True)
                for leaf, d in zip(new.tolist(), docs[first].tolist()):
                    paths.setdefault(leaf, tuple(np.asarray(doc_paths[d]).tolist()))
        if n_docs == 0:
            raise HiermemError(f"{self.path}: the {split} split has no documents")
        depth = 0 if doc_paths is None else doc_paths.shape[1]
        store = self.doc_tokens()
        check_files([self.path / "doc_tokens" / n for n in ("tokens.npy", "offsets.npy")], "token store", full=True)
        pack_selection(store, selection, seq_len, self.tokenizer().eos_id, out, path_of_group=paths, depth=depth,
                       algo=algo)


# --- prepare -------------------------------------------------------------------------------------------


def prepare(cfg: Config, force: bool = False) -> DataDir:
    out = cfg.data_dir
    if (out / "prepare.json").is_file() and not force:
        existing = DataDir(out)
        existing.check(cfg)  # same config: reuse; other config: refuse rather than overwrite
        return existing
    if getattr(mp.current_process(), "_inheriting", False):  # would wait forever on the parent's lock
        raise HiermemError("prepare: called while a data.workers process starts (a script that calls prepare "
                           "must guard it with `if __name__ == \"__main__\":`)")
    if not cfg.data.corpus:
        raise HiermemError("config: data.corpus is empty (give a .jsonl, .jsonl.gz, .jsonl.zst, .txt, .parquet "
                           "or folder path)")
    shards = list_shards(cfg.data.corpus)  # a missing or unsupported corpus is refused before anything is written
    user_tok = Tokenizer.load(cfg.data.tokenizer) if cfg.data.tokenizer else None  # before cleaning: it may be ours
    out.mkdir(parents=True, exist_ok=True)
    with DirLock(out, "prepare"):  # one writer per folder: a second prepare is refused, naming the first
        if (out / "prepare.json").is_file() and not force:
            existing = DataDir(out)
            existing.check(cfg)
            return existing
        _Build(cfg, out, shards, user_tok, force).run()
    return DataDir(out)


def index_shard(writer: IndexWriter, s: int, shard: Shard) -> None:
    """Stage 1, one shard: its documents into the index."""
    for rec in iter_records(shard):
        writer.add(s, rec)


def _batches(index: DocIndex, start: int, stop: int) -> Iterator[tuple[str, list]]:
    batch: list = []
    size = 0
    fmt = ""
    for fmt, raw in index.iter_raw(start, stop):
        batch.append(raw)
        size += len(raw)
        if len(batch) == BATCH_DOCS or size >= BATCH_BYTES:
            yield fmt, batch
            batch, size = [], 0
    if batch:
        yield fmt, batch


def tokenize_shard(enc: Encoder, index: DocIndex, s: int, tokens: NpyAppender, offsets: NpyAppender,
                   total: int) -> int:
    """Stage 5, one shard: its documents' tokens appended to the store; returns the store's token count."""
    row = index.shards[s]
    for flat, lengths in enc.map(_batches(index, row["first"], row["first"] + row["n_docs"])):
        tokens.append(flat)
        offsets.append(total + np.cumsum(lengths))
        total += int(lengths.sum())
    return total


class _Build:
    def __init__(self, cfg: Config, out: Path, shards: list[Shard], user_tok: Tokenizer | None, force: bool):
        self.cfg, self.out, self.shards, self.user_tok = cfg, out, shards, user_tok
        self.work = out / WORK
        self.index_dir = out / "index"
        self.stats = [shard_stat(s.path) for s in shards]
        self.plan = {"key": _prepare_key(cfg),
                     "sample_bytes": None if user_tok else cfg.data.tokenizer_sample_bytes,
                     "user_tokenizer": user_tok.fingerprint() if user_tok else None}
        self.state = None if force else self._resumable()

    # progress ----------------------------------------------------------------------------------------

    def _fresh(self, indexed: list | None = None) -> dict:
        return {"version": PROGRESS_VERSION, "plan": self.plan, "shards": self.stats, "indexed": indexed or [],
                "n_docs": None, "checked": False, "n_val": None, "tokenizer": None, "sample": None,
                "tokenized": []}

    def _resumable(self) -> dict | None:
        """The recorded progress this prepare may continue from (None: start over)."""
        try:
            state = json.loads((self.work / "progress.json").read_text())
        except (OSError, ValueError):
            return None
        if state.get("version") != PROGRESS_VERSION or state["plan"]["key"]["corpus"] != self.plan["key"]["corpus"]:
            return None
        if state["plan"] == self.plan and state["shards"] == self.stats:
            return state
        # another data config or changed corpus files: keep the index of the leading unchanged files only
        keep = 0
        while keep < min(len(state["indexed"]), len(self.stats)) and state["shards"][keep] == self.stats[keep]:
            keep += 1
        return self._fresh(state["indexed"][:keep])

    def _save(self) -> None:
        atomic_write_json(self.work / "progress.json", self.state)

    # stages ------------------------------------------------------------------------------------------

    def run(self) -> None:
        # the metadata file marks the folder complete: remove it before anything else changes
        (self.out / "prepare.json").unlink(missing_ok=True)
        try:
            self._run()
        except (CannotResume, FileNotFoundError):  # recorded progress names files gone or shorter: start over
            if self.state is None or self._started_fresh:
                raise
            self.state = None
            self._run()

    def _run(self) -> None:
        out = self.out
        self._started_fresh = self.state is None
        if self.state is None:
            for name in ("index", "doc_tokens", "packed", WORK):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in ("split.npy", "tokenizer.json", "documents.jsonl", CHECKSUMS):
                (out / name).unlink(missing_ok=True)
            self.state = self._fresh()
        self.work.mkdir(parents=True, exist_ok=True)
        self._save()
        n = self._index()
        index = DocIndex(self.index_dir)
        self._check_ids(index)
        n_val = self._split(n)
        tok = self._tokenizer(index)
        n_tokens, dtype = self._tokenize(index, tok)
        st = self.state
        self._record_checksums()
        write_sealed_json(out / "prepare.json", {
            "key": _prepare_key(self.cfg), "n_docs": n, "n_val": n_val, "n_tokens": n_tokens,
            "tokenizer_fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size, "format": 2,
            "eos_token": tok.eos_token,
            "n_shards": len(self.shards), "tokenizer_sample": st["sample"]})
        shutil.rmtree(self.work, ignore_errors=True)

    def _record_checksums(self) -> None:
        """The outputs' sizes and crc32s, in a .checksums.json per folder (hiermem/integrity.py), read back
        once here, when they are complete: what the loaders and hiermem verify check them against."""
        out = self.out
        record(*(out / n for n in ("split.npy", "tokenizer.json", "tokenizer_config.json") if (out / n).is_file()))
        record(*(out / "doc_tokens" / n for n in ("tokens.npy", "offsets.npy", "meta.json")))
        record(*(p for p in sorted(self.index_dir.glob("*.npy"))))

    def _index(self) -> int:
        st = self.state
        if st["n_docs"] is not None:
            return st["n_docs"]
        writer = IndexWriter(self.index_dir, self.work, st["indexed"][-1] if st["indexed"] else None)
        try:
            for s in range(len(st["indexed"]), len(self.shards)):
                index_shard(writer, s, self.shards[s])
                st["indexed"].append(writer.flush())
                self._save()
            writer.finalize()
        finally:
            writer.close()
        ends = [c["docs"] for c in st["indexed"]]
        n = ends[-1] if ends else 0
        if n == 0:
            raise HiermemError(f"{self.cfg.data.corpus}: no documents (empty corpus)")
        write_shard_list(self.index_dir, self.shards, self.stats, np.diff([0, *ends]).tolist())
        st["n_docs"] = n
        self._save()
        return n

    def _check_ids(self, index: DocIndex) -> None:
        if self.state["checked"]:
            return
        found = find_duplicate(self.work / "digest.npy", index.id_at, self.work)
        if found:
            lines = np.load(self.work / "line.npy", mmap_mode="r")

            def loc(i: int) -> str:
                shard = self.shards[int(index.shard[i])]
                return f"{shard.path}:{'row ' if shard.fmt == 'parquet' else ''}{int(lines[i])}"

            first, repeat = found
            raise HiermemError(f"{loc(repeat)}: duplicate id {quote_id(index.id_at(repeat))} (first seen at {loc(first)})")
        self.state["checked"] = True
        self._save()

    def _split(self, n: int) -> int:
        st = self.state
        if st["n_val"] is None:
            d = self.cfg.data
            st["n_val"] = write_split(self.out / "split.npy", n, d.val_fraction, d.seed, self.work)
            self._save()
        return st["n_val"]

    def _tokenizer(self, index: DocIndex) -> Tokenizer:
        st, path = self.state, self.out / "tokenizer.json"
        if st["tokenizer"] is not None and path.is_file():
            tok = Tokenizer.load(path)
            if tok.fingerprint() == st["tokenizer"]:
                return tok
        if self.user_tok is not None:
            tok, st["sample"] = self.user_tok, None
        else:
            tok, st["sample"] = self._train(index)
        tok.save(path)
        if st["tokenizer"] != tok.fingerprint():
            st["tokenized"] = []  # tokens made with another tokenizer (or none yet)
        st["tokenizer"] = tok.fingerprint()
        self._save()
        return tok

    def _train(self, index: DocIndex) -> tuple[Tokenizer, dict]:
        budget = self.cfg.data.tokenizer_sample_bytes
        is_val = np.load(self.out / "split.npy", mmap_mode="r")
        n_train = len(is_val) - self.state["n_val"]
        used = before_last = docs = 0

        def texts() -> Iterator[str]:  # the training documents in corpus order until the budget is reached
            nonlocal used, before_last, docs
            raw = index.iter_raw()
            try:
                for i, (fmt, rec) in enumerate(raw):
                    if i % SPLIT_CHUNK == 0:
                        val = np.asarray(is_val[i : i + SPLIT_CHUNK])
                    if val[i % SPLIT_CHUNK]:
                        continue
                    text = decode_raw(fmt, rec)
                    before_last, docs = used, docs + 1
                    used += len(text) if text.isascii() else len(text.encode("utf-8"))
                    yield text
                    if used >= budget or docs == n_train:
                        break
            finally:
                raw.close()

        tok = train_tokenizer(texts(), self.cfg.data.vocab_size)
        whole = docs == n_train
        # the budgets that select this same sample: (before_last, used], or anything above before_last when
        # the sample is the whole training split; DataDir.check refuses a budget outside
        sample = {"budget": budget, "docs": docs, "bytes": used, "whole_split": whole,
                  "same_for": [before_last + 1, None if whole else used]}
        return tok, sample

    def _tokenize(self, index: DocIndex, tok: Tokenizer) -> tuple[int, np.dtype]:
        st = self.state
        dtype = token_dtype(tok.vocab_size)
        folder = self.out / "doc_tokens"
        done = st["tokenized"]
        if not done:  # new tokens: sequences packed from earlier ones are stale
            for name in ("doc_tokens", "packed"):
                shutil.rmtree(self.out / name, ignore_errors=True)
        last = done[-1] if done else {"docs": 0, "tokens": 0}
        tokens = NpyAppender(folder / "tokens.npy", dtype, last["tokens"] if done else None)
        try:
            offsets = NpyAppender(folder / "offsets.npy", np.int64, last["docs"] + 1 if done else None)
        except BaseException:
            tokens.close()
            raise
        if not done:
            offsets.append([0])
        total = last["tokens"]
        try:
            if len(done) < len(self.shards):
                with Encoder(tok, self.cfg.data.workers, dtype) as enc:
                    for s in range(len(done), len(self.shards)):
                        total = tokenize_shard(enc, index, s, tokens, offsets, total)
                        tokens.flush()
                        offsets.flush()
                        row = index.shards[s]
                        done.append({"docs": row["first"] + row["n_docs"], "tokens": total})
                        self._save()
            tokens.finalize()
            offsets.finalize()
        finally:
            tokens.close()
            offsets.close()
        atomic_write_json(folder / "meta.json", {"n_docs": len(index), "n_tokens": total, "dtype": dtype.name})
        return total, dtype
