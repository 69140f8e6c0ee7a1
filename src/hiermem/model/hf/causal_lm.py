"""A transformers causal LM behind the native anchor's call, so that one trainer, one training step, evaluation
and generation run it unchanged (post-hoc memories: `hiermem train model.hf=CHECKPOINT`).

    logits, loss = model(input_ids, targets, positions, segment_ids, memory, cache)

as Transformer.forward (model/transformer.py): the fetched memory joins every MLP through MemoryHooks (mlp.py);
positions go in as position_ids; segment_ids become the same document mask as the native anchor's (a packed
row's documents never see each other, padding sees only itself), passed to transformers as a 4D additive mask,
so a post-hoc run on an exported anchor computes what the native frozen run computes. With a KVCache
(generation) the cache's keys and values are lent to a transformers DynamicCache for the call and taken back,
so hiermem's batched decoder (which stacks and selects cache rows itself) works on it as on the anchor.

What a run saves of the model is state_dict(): nothing for a frozen base (the checkpoint folder named by
model.hf is the base; the run keeps only its bank), the full weights under transformers' names when the base
trains too (train.mode=cotrain), each tied tensor once.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

from hiermem.config import ModelConfig
from hiermem.errors import HiermemError
from hiermem.model.fetched import FetchedMemory
from hiermem.model.hf.load import load_config, load_model
from hiermem.model.hf.mlp import MemoryHooks
from hiermem.model.transformer import KVCache, document_mask, next_token_loss


def checkpoint_shape(cfg: ModelConfig) -> tuple[ModelConfig, list[str]]:
    """cfg with the shape of the checkpoint cfg.hf (its width, depth, vocabulary, context ...), and a note per
    shape key of cfg that the checkpoint overrides."""
    hf = load_config(cfg.hf)
    d, heads = hf.hidden_size, hf.num_attention_heads
    shape = dict(vocab_size=hf.vocab_size, n_layers=hf.num_hidden_layers, d_model=d, n_heads=heads,
                 head_dim=getattr(hf, "head_dim", None) or d // heads,
                 d_ff=getattr(hf, "intermediate_size", None) or getattr(hf, "n_inner", None) or 4 * d,
                 tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
                 max_seq_len=hf.max_position_embeddings, qk_norm=bool(getattr(hf, "qk_norm", False)))
    notes = [f"model.{k}={getattr(cfg, k)} ignored: {cfg.hf} has {v}" for k, v in shape.items()
             if getattr(cfg, k) != v and not (k == "vocab_size" and cfg.vocab_size == 0)]
    return dataclasses.replace(cfg, **shape), notes


class CausalLM(nn.Module):
    """hf (a transformers causal LM) with fetched memory in its MLPs, called like the native Transformer.
    `cfg` is the run's model config (checkpoint_shape's); save_base: whether state_dict holds the base."""

    def __init__(self, hf: PreTrainedModel, cfg: ModelConfig, save_base: bool):
        super().__init__()
        self.hf, self.save_base = hf, save_base
        self.hooks = MemoryHooks(hf)
        # transformers 5.24 renamed the model's past_key_values argument to cache: pass it by the name hf takes
        self._cache_arg = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        # tying is the checkpoint's own business (state_dict below stores a tied tensor once): the native
        # checkpoint helpers, which read cfg.tie_embeddings, must not look for the anchor's tok_emb
        self.cfg = dataclasses.replace(cfg, tie_embeddings=False)

    @classmethod
    def load(cls, cfg: ModelConfig, save_base: bool) -> "CausalLM":
        return cls(load_model(cfg.hf), cfg, save_base)

    def _mask(self, visible: torch.Tensor) -> torch.Tensor:
        """A boolean [B, 1, Tq, Tk] mask as transformers' additive one (eager and SDPA attention both add it)."""
        dtype = self.hf.dtype
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
            ~visible, torch.finfo(dtype).min)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                memory: FetchedMemory | None = None, cache: KVCache | None = None):
        """Transformer.forward's contract (model/transformer.py): (logits, mean cross-entropy or None)."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        past = None
        if cache is not None:
            visible = cache.mask(segment_ids if segment_ids is not None else torch.zeros_like(input_ids))
            past = DynamicCache(ddp_cache_data=list(zip(cache.keys, cache.values)) or None, config=self.hf.config)
        else:
            visible = None if segment_ids is None else document_mask(segment_ids, "sdpa")
        with self.hooks.using(memory):
            out = self.hf(input_ids=input_ids, position_ids=positions, **{self._cache_arg: past},
                          attention_mask=None if visible is None else self._mask(visible), use_cache=past is not None)
        logits = out.logits
        if cache is not None:  # generation needs the next token only
            cache.keys, cache.values = [l.keys for l in past.layers], [l.values for l in past.layers]
            logits = logits[:, -1:]
        return logits, None if targets is None else next_token_loss(logits, targets)

    def _aliases(self) -> set[str]:
        """Names of tied tensors after their first name (tied embeddings: lm_head.weight)."""
        seen, aliases = set(), set()
        for name, t in self.hf.state_dict(keep_vars=True).items():
            if t.data_ptr() in seen:
                aliases.add(name)
            seen.add(t.data_ptr())
        return aliases

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        if not self.save_base:
            return {}
        aliases = self._aliases()
        return {k: v for k, v in self.hf.state_dict(*args, **kwargs).items() if k not in aliases}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not self.save_base:
            if state_dict:
                raise HiermemError("a frozen post-hoc run stores no base weights (its base is model.hf)")
            return _IncompatibleKeys([], [])
        missing, unexpected = self.hf.load_state_dict(state_dict, strict=False, assign=assign)
        aliases = self._aliases()
        return _IncompatibleKeys([k for k in missing if k not in aliases], unexpected)


__all__ = ["CausalLM", "checkpoint_shape"]
