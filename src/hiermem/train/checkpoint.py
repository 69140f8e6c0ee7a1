"""Checkpoints: anchor weights in safetensors, optimizer and loader state beside them, all written atomically.

Layout of <run>/checkpoint/ (the folder is built under a temp name and renamed into place when complete):
  model.safetensors   anchor weights (tied weights stored once)
  optimizer.pt        anchor AdamW state (absent in frozen mode)
  bank/               memory bank + its lazy AdamW state (memory runs)
  state.json          step, tokens seen, data-sampler position, elapsed time
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_write_with


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied weights stored once (safetensors refuses shared storage)."""
    state = model.state_dict()
    if getattr(model.cfg, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_weights(model: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    atomic_write_with(path, lambda tmp: save_file(model_state(model), str(tmp), metadata=metadata))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise HiermemError(f"{path}: missing anchor weights")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise HiermemError(f"{path}: cannot read weights ({str(e).splitlines()[0]})") from None
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise HiermemError(f"{path}: {key} has shape {tuple(value.shape)}, model expects {tuple(own[key].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise HiermemError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def save_torch(obj, path: Path) -> None:
    atomic_write_with(path, lambda tmp: torch.save(obj, tmp))


def load_state(ckpt: Path) -> dict:
    path = ckpt / "state.json"
    if not path.is_file():
        raise HiermemError(f"{ckpt}: no checkpoint to resume from (missing state.json)")
    return json.loads(path.read_text())
