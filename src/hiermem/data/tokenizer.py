"""Byte-level BPE tokenizer: a thin wrapper over HF `tokenizers`, saved as a standard tokenizer.json.

Byte-level pre-tokenisation plus the full 256-symbol initial alphabet means every UTF-8 string encodes
and decodes back exactly (no unknown token). "<|endoftext|>" (id 0 when trained here) separates
documents; it is only ever inserted by packing: a literal "<|endoftext|>" inside a document is encoded
as ordinary text, so user data cannot forge a document boundary.

A user's tokenizer.json without "<|endoftext|>" (a transformers checkpoint's, data.tokenizer=CKPT) ends
documents with the checkpoint's own eos token instead, read next to the file as transformers reads it:
tokenizer_config.json `eos_token`, else generation_config.json / config.json `eos_token_id`. Packing,
generation and export then agree with the checkpoint; save() writes that eos into a tokenizer_config.json
beside the tokenizer.json, so a copy of the tokenizer (the data directory's) keeps it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from hiermem.errors import HiermemError
from hiermem.integrity import check_file
from hiermem.io_utils import atomic_write_text

EOS = "<|endoftext|>"
FILENAME = "tokenizer.json"
CONFIG = "tokenizer_config.json"  # transformers' name: it records a non-default eos token


def _file(path: str | Path) -> Path:
    """A folder means the tokenizer.json inside it."""
    path = Path(path)
    return path / FILENAME if path.is_dir() else path


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HiermemError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    return value if isinstance(value, dict) else {}


def checkpoint_eos(hf: _HFTokenizer, folder: Path) -> str | None:
    """The eos token a checkpoint folder names for its tokenizer (None when it names none): tokenizer_config.json
    `eos_token` (a string or an AddedToken mapping), else the first `eos_token_id` of generation_config.json or
    config.json that the vocabulary has."""
    token = _read_json(folder / CONFIG).get("eos_token")
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and token:
        return token
    for name in ("generation_config.json", "config.json"):
        ids = _read_json(folder / name).get("eos_token_id")
        for i in ids if isinstance(ids, list) else [ids]:
            if isinstance(i, int) and hf.id_to_token(i) is not None:
                return hf.id_to_token(i)
    return None


class Tokenizer:
    def __init__(self, hf: _HFTokenizer, source: str = "tokenizer", eos: str = EOS):
        eos_id = hf.token_to_id(eos)
        if eos_id is None:
            raise HiermemError(f'{source}: tokenizer has no "{eos}" token (needed as the document separator)')
        hf.encode_special_tokens = True  # see module docstring: text never produces the EOS id
        self._hf = hf
        self.eos_token: str = eos
        self.eos_id: int = eos_id
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The "fast" variant skips offset tracking, and both run in parallel in Rust.
        return [e.ids for e in self._hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        # EOS stays visible (as "<|endoftext|>"): decoding is a faithful view of the ids.
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return self._hf.to_str(pretty=True)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json atomically (a folder path gets tokenizer.json inside it), and beside it a
        tokenizer_config.json naming the eos token when it is not "<|endoftext|>"."""
        path = _file(path)
        atomic_write_text(path, self.to_json())
        if self.eos_token != EOS:
            atomic_write_text(path.parent / CONFIG, json.dumps({"eos_token": self.eos_token}) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = _file(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise HiermemError(f"{path}: no such file or directory") from None
        except (OSError, UnicodeDecodeError) as e:
            raise HiermemError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
        check_file(path, "tokenizer")  # against the checksums.json beside it, where hiermem wrote one
        if (path.parent / CONFIG).is_file():
            check_file(path.parent / CONFIG, "tokenizer config")
        try:
            hf = _HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises plain Exception on bad JSON / schema
            first = (str(e).strip().splitlines() or ["invalid"])[0]
            raise HiermemError(f"{path}: not a valid tokenizer.json ({first})") from None
        eos = EOS if hf.token_to_id(EOS) is not None else checkpoint_eos(hf, path.parent)
        if eos is None:
            raise HiermemError(f'{path}: tokenizer has no "{EOS}" token and {path.parent} names no eos token '
                               f"(tokenizer_config.json eos_token, generation_config.json or config.json eos_token_id)")
        return cls(hf, source=str(path), eos=eos)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON (and of the eos token, when not "<|endoftext|>"): identical for the same
        vocabulary, merges, settings and document separator."""
        canonical = json.dumps(json.loads(self._hf.to_str()), sort_keys=True, separators=(",", ":"))
        if self.eos_token != EOS:
            canonical += json.dumps({"eos_token": self.eos_token})
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE on `texts` (streamed). Same input and arguments -> same tokenizer."""
    n_base = len(pre_tokenizers.ByteLevel.alphabet()) + 1  # 256 bytes + EOS
    if vocab_size < n_base:
        raise HiermemError(f"vocab_size must be at least {n_base} (256 byte symbols + {EOS}), got {vocab_size}")
    hf = _HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],  # first special token -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)


def resolve_vocab(cfg, tok: Tokenizer) -> None:
    """model.vocab_size 0 -> the tokenizer's size rounded up to a multiple of 64; a smaller one is refused."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = -(-tok.vocab_size // 64) * 64
    elif cfg.model.vocab_size < tok.vocab_size:
        raise HiermemError(
            f"config: model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
