"""The model a run trains and evaluates: the native anchor, or (model.hf set) a local transformers checkpoint
behind the same call (model/hf/causal_lm.py). transformers is imported only for the latter."""

from __future__ import annotations

from torch import nn

from hiermem.config import Config
from hiermem.model.transformer import Transformer


def build_model(cfg: Config) -> nn.Module:
    """A frozen checkpoint's weights are not the run's to save (save_base: only with train.mode=cotrain)."""
    if not cfg.model.hf:
        return Transformer(cfg.model)
    from hiermem.model.hf.causal_lm import CausalLM

    return CausalLM.load(cfg.model, save_base=cfg.train.mode != "frozen")


__all__ = ["build_model"]
