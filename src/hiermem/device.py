"""Which torch device a run uses (train.device: auto | cpu | cuda)."""

from __future__ import annotations

import torch

from hiermem.errors import HiermemError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HiermemError("config: train.device=cuda but no CUDA device is available")
    return torch.device(name)
