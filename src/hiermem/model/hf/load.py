"""Loading a local transformers checkpoint folder (never the hub), with one-line errors for bad input.

A folder that is not a checkpoint, an architecture whose MLPs mlp.py cannot wrap, missing weights or a
missing tokenizer each end in one HiermemError naming the folder. The hiermem architecture (an exported anchor
with QK-norm) loads from hiermem's own copy of its code (modeling_hiermem.py), without trust_remote_code;
transformers' Auto classes are left as they are, so AutoModelForCausalLM still loads the copy shipped in the
export folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from hiermem.errors import HiermemError
from hiermem.model.hf.mlp import family_of
from hiermem.model.hf.modeling_hiermem import HiermemConfig, HiermemForCausalLM

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_config(path: str | Path) -> PretrainedConfig:
    """The checkpoint's config, refused unless mlp.py supports its architecture."""
    path = Path(path)
    if not path.is_dir():
        raise HiermemError(f"{path}: not a folder (expected a transformers checkpoint folder)")
    if not (path / "config.json").is_file():
        raise HiermemError(f"{path}: not a transformers checkpoint (no config.json)")
    try:
        own = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type") == "hiermem"
        config = (HiermemConfig if own else AutoConfig).from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError, AttributeError) as e:  # bad JSON, unknown model_type, unreadable
        raise HiermemError(f"{path}/config.json: cannot be read ({_first_line(e)})") from None
    family_of(config, source=str(path))
    return config


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> PreTrainedModel:
    """The causal LM of a local checkpoint folder, in eval mode."""
    path = Path(path)
    config = load_config(path)
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise HiermemError(f"{path}: no weights ({' or '.join(WEIGHT_FILES[::2])})")
    try:
        cls = HiermemForCausalLM if isinstance(config, HiermemConfig) else AutoModelForCausalLM
        model = cls.from_pretrained(path, config=config, dtype=dtype, local_files_only=True)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise HiermemError(f"{path}: cannot load the model ({_first_line(e)})") from None
    return model.to(device).eval()


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer (AutoTokenizer, local files only)."""
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise HiermemError(f"{path}: no tokenizer (tokenizer.json)")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise HiermemError(f"{path}: cannot load the tokenizer ({_first_line(e)})") from None


__all__ = ["WEIGHT_FILES", "load_config", "load_model", "load_tokenizer"]
