"""`hiermem prepare`: documents -> tokenizer + token store + train/val split, in a data directory.

<data dir>/
  tokenizer.json      byte-level BPE (trained on the training split, or a user's tokenizer copied in)
  documents.jsonl     id + text of every document (the embedder and routers read texts from here)
  doc_tokens/         flat memory-mapped token store (packing.DocTokens)
  split.npy           bool per document: True = held out for validation
  prepare.json        what made this folder (data config, corpus, tokenizer fingerprint)
A later stage refuses a data directory made by another data config or tokenizer.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from hiermem.config import Config, diff_fields
from hiermem.data.packing import DocTokens, PackedDataset, pack_sequences, token_dtype, write_doc_tokens
from hiermem.data.readers import Document, read_documents
from hiermem.data.tokenizer import Tokenizer, train_tokenizer
from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_open, atomic_save_npy, atomic_write_json


def _prepare_key(cfg: Config) -> dict:
    d = cfg.data
    resolved = {k: str(Path(v).resolve()) if v else "" for k, v in (("corpus", d.corpus), ("tokenizer", d.tokenizer))}
    return {"corpus": resolved["corpus"], "tokenizer": resolved["tokenizer"],
            "vocab_size": d.vocab_size, "val_fraction": d.val_fraction, "seed": d.seed}


def split_mask(n: int, val_fraction: float, seed: int) -> np.ndarray:
    """Seeded document-level split; at least one validation document when a fraction is asked and n >= 2."""
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return is_val


class DataDir:
    """Read access to a prepared data directory (and, once clustered, its tree and document paths)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta = self.path / "prepare.json"
        if not meta.is_file():
            raise HiermemError(f"{self.path}: not a prepared data directory (run `hiermem prepare` first)")
        self.meta = json.loads(meta.read_text())

    def check(self, cfg: Config) -> None:
        diffs = diff_fields(self.meta["key"], _prepare_key(cfg), "data.")  # every key is a data.* field
        if diffs:
            raise HiermemError(f"{self.path}: prepared with another data config: {'; '.join(diffs)}")

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.path / "tokenizer.json")

    def doc_tokens(self) -> DocTokens:
        return DocTokens(self.path / "doc_tokens")

    def is_val(self) -> np.ndarray:
        return np.load(self.path / "split.npy")

    def documents(self) -> list[Document]:
        with open(self.path / "documents.jsonl", encoding="utf-8") as f:
            return [Document(**json.loads(line)) for line in f]

    def texts(self) -> list[str]:
        """Every text in RAM: for small data and tests; stages that must scale use iter_texts."""
        return [d.text for d in self.documents()]

    def iter_texts(self, batch_size: int = 1024) -> Iterator[list[str]]:
        """The documents' texts in document order, batch_size at a time (bounded memory)."""
        batch: list[str] = []
        with open(self.path / "documents.jsonl", encoding="utf-8") as f:
            for line in f:
                batch.append(json.loads(line)["text"])
                if len(batch) == batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def texts_at(self, indices) -> list[str]:
        """The texts of the documents `indices` (any order), without holding the corpus in RAM."""
        want = {int(i) for i in indices}
        found: dict[int, str] = {}
        for b, batch in enumerate(self.iter_texts()):
            for j, t in enumerate(batch):
                if b * 1024 + j in want:
                    found[b * 1024 + j] = t
        return [found[int(i)] for i in indices]

    def fingerprint(self) -> str:
        """Identifies this prepared corpus (its metadata, which names the corpus and the tokenizer)."""
        return hashlib.sha256((self.path / "prepare.json").read_bytes()).hexdigest()

    @property
    def n_docs(self) -> int:
        return int(self.meta["n_docs"])

    def packed(self, split: str, seq_len: int, doc_paths: np.ndarray | None = None,
               tree_id: str = "flat") -> PackedDataset:
        """A split's packed sequences, cached under packed/ by (split, seq_len, tree). With doc_paths (every
        document's root-to-leaf path) documents are packed per leaf, one path per sequence (the paper's
        App. A.2); without, in corpus order."""
        out = self.packed_path(split, seq_len, tree_id)
        out.parent.mkdir(parents=True, exist_ok=True)
        # several trainings may start at once on one data dir (the demo's parallel jobs): one packs, the
        # others wait on the lock and then reuse its output
        with open(out.parent / f".{out.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "meta.json").is_file():
                self._pack(split, seq_len, doc_paths, out)
        return PackedDataset(out)

    def packed_path(self, split: str, seq_len: int, tree_id: str = "flat") -> Path:
        key = hashlib.sha256(f"{split}:{seq_len}:{tree_id}".encode()).hexdigest()[:12]
        return self.path / "packed" / f"{split}-{key}"

    def _pack(self, split: str, seq_len: int, doc_paths: np.ndarray | None, out: Path) -> None:
        is_val = self.is_val()
        doc_index = np.flatnonzero(is_val if split == "val" else ~is_val)
        if len(doc_index) == 0:
            raise HiermemError(f"{self.path}: the {split} split has no documents")
        groups = paths = None
        depth = 0
        if doc_paths is not None:
            groups = doc_paths[doc_index, -1]
            paths = {int(l): tuple(int(x) for x in doc_paths[i]) for i, l in zip(doc_index, groups)}
            depth = doc_paths.shape[1]
        pack_sequences(self.doc_tokens(), doc_index, seq_len, self.tokenizer().eos_id, out,
                       group_of_doc=groups, path_of_group=paths, depth=depth)


def prepare(cfg: Config, force: bool = False) -> DataDir:
    out = cfg.data_dir
    if (out / "prepare.json").is_file() and not force:
        existing = DataDir(out)
        existing.check(cfg)  # same config: reuse; other config: refuse rather than overwrite
        return existing
    if not cfg.data.corpus:
        raise HiermemError("config: data.corpus is empty (give a .jsonl, .txt, folder or .parquet path)")
    docs = read_documents(cfg.data.corpus)
    is_val = split_mask(len(docs), cfg.data.val_fraction, cfg.data.seed)
    if cfg.data.tokenizer:
        tok = Tokenizer.load(cfg.data.tokenizer)
    else:
        tok = train_tokenizer((d.text for d, v in zip(docs, is_val) if not v), cfg.data.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    # token store first (largest); the metadata file is written last and marks the folder complete, so a
    # forced rebuild first removes the old one: a rebuild that dies midway must not look complete
    (out / "prepare.json").unlink(missing_ok=True)
    texts = [d.text for d in docs]
    batch = 1024
    write_doc_tokens(out / "doc_tokens", (ids for i in range(0, len(texts), batch)
                                          for ids in tok.encode_batch(texts[i:i + batch])),
                     token_dtype(tok.vocab_size))
    with atomic_open(out / "documents.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False) + "\n")
    atomic_save_npy(out / "split.npy", is_val)
    tok.save(out / "tokenizer.json")
    n_tokens = int(DocTokens(out / "doc_tokens").lengths.sum())
    atomic_write_json(out / "prepare.json", {
        "key": _prepare_key(cfg), "n_docs": len(docs), "n_val": int(is_val.sum()), "n_tokens": n_tokens,
        "tokenizer_fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size})
    return DataDir(out)
