"""Fetched memory in a transformers causal LM: the path's neurons join every MLP as extra hidden neurons.

The wrapping comes from outside the model: one forward hook per decoder layer's MLP adds the memory branch to
the MLP's output, so transformers' code, the module names and the state dict stay as they are, and with no
memory set the hooks return the MLP's own output untouched. The memory is a FetchedMemory (model/fetched.py),
per sequence of the batch, set for a block of code with `MemoryHooks.using(memory)`; its first_layer and
n_layers say which layers it reaches (a layer range: memory.layers).

Gated MLPs (Llama, Mistral, Qwen2/3, Gemma 2/3, the exported hiermem anchor): down(act(gate x) * up(x)) with the
family's activation (SiLU, Gemma's tanh GELU). A block's GATE, UP and DOWN rows are appended to gate_proj,
up_proj and down_proj, the layout of docs/method.md §2.3, so the branch is C · (act(A x) ⊙ (B x)).

Plain two-matrix MLPs (GPT-NeoX / Pythia: dense_h_to_4h, dense_4h_to_h; GPT-2: c_fc, c_proj as Conv1D):
out(act(in x + b_in)) + b_out. A memory neuron is one more hidden unit of that MLP with no bias: its UP row is
appended to the input matrix, its DOWN column to the output matrix, and it goes through the MLP's own
activation, so the branch is C · act(B x). The GATE rows are not used (never read: their gradient is zero);
the bank keeps the one block layout for every family. GPT-2 applies dropout to its MLP output: the hook adds
the branch after it, so in training mode (resid_pdrop > 0) the memory neurons are not dropped out; in eval
mode, or with resid_pdrop = 0, the result is exactly the widened MLP.

SiLU-gated families use FetchedMemory's own fused product (MemoryLayer: its backward recomputes the expanded
rows instead of keeping them); the others expand the rows with differentiable ops. Under gradient
checkpointing, keep the `using` block open through backward: the recomputed forward must see the memory.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import SiLUActivation

from hiermem.errors import HiermemError
from hiermem.model.fetched import DOWN, GATE, UP, FetchedMemory, MemoryLayer


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its decoder layers (a dotted path from the causal LM) and how its MLP
    computes: gated (act(gate) * up) or plain (act(up)), and the MLP attribute holding the activation."""

    layers: str
    gated: bool
    act: str


_GATED = Family("model.layers", gated=True, act="act_fn")
FAMILIES = {
    "llama": _GATED, "mistral": _GATED, "qwen2": _GATED, "qwen3": _GATED, "gemma2": _GATED,
    "gemma3_text": _GATED, "hiermem": _GATED,
    "gpt_neox": Family("gpt_neox.layers", gated=False, act="act"),
    "gpt2": Family("transformer.h", gated=False, act="act"),
}


def family_of(config, source: str = "model") -> Family:
    """The family of a transformers config (by model_type); anything else is refused in one line."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "?"
        raise HiermemError(f"{source}: architecture {arch} (model_type {model_type!r}) is not supported; supported "
                           f"model types: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def decoder_mlps(model: nn.Module) -> list[nn.Module]:
    """The MLP of every decoder layer, first layer first."""
    layers = functools.reduce(getattr, family_of(model.config).layers.split("."), model)
    return [layer.mlp for layer in layers]


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, (SiLUActivation, nn.SiLU))


def memory_branch(mlp: nn.Module, family: Family, layer: MemoryLayer, x: torch.Tensor) -> torch.Tensor:
    """This layer's memory neurons applied to the MLP input x [B, T, d] -> [B, T, d], with the MLP's activation."""
    act = getattr(mlp, family.act)
    if family.gated and _is_silu(act):
        return layer(x)  # the fused product of model/fetched.py (silu gate)
    w = layer.expand_traceable().to(x.dtype)  # [B, 3, R, d]
    up = torch.bmm(x, w[:, UP].transpose(1, 2))  # [B, T, R]
    hidden = act(torch.bmm(x, w[:, GATE].transpose(1, 2))) * up if family.gated else act(up)
    return torch.bmm(hidden, w[:, DOWN])


class MemoryHooks:
    """Forward hooks on every MLP of a transformers causal LM; `using(memory)` makes them add its neurons."""

    def __init__(self, model: nn.Module):
        self.model, self.family = model, family_of(model.config)
        self.mlps = decoder_mlps(model)
        self.d = model.config.hidden_size
        self._layers: list[MemoryLayer | None] | None = None
        self._handles = [mlp.register_forward_hook(functools.partial(self._hook, i), with_kwargs=True)
                         for i, mlp in enumerate(self.mlps)]

    @property
    def n_layers(self) -> int:
        return len(self.mlps)

    def _hook(self, i: int, mlp: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
        layer = self._layers[i] if self._layers is not None else None
        if layer is None:
            return None  # no memory here: the MLP's own output, untouched
        x = args[0] if args else next(iter(kwargs.values()))
        return output + memory_branch(mlp, self.family, layer, x)

    def check(self, memory: FetchedMemory) -> None:
        """Refuse a memory whose kind, width or layers do not fit this model."""
        if memory.kind.name != "ffn":
            raise HiermemError(f"memory.kind={memory.kind.name}: the transformers path adds ffn memory only")
        d = memory.parts[0].weights.shape[-1]
        if d != self.d:
            raise HiermemError(f"memory has width d={d}, the model's hidden size is {self.d}")
        if memory.first_layer + memory.n_layers > self.n_layers:
            last = memory.first_layer + memory.n_layers - 1
            raise HiermemError(f"memory reaches layers {memory.first_layer}..{last}, the model has {self.n_layers}")

    @contextlib.contextmanager
    def using(self, memory: FetchedMemory | None):
        """Within this block every forward pass adds memory's neurons (row b of the batch: sequence b's);
        None = the plain model."""
        if memory is not None:
            self.check(memory)
        previous = self._layers
        self._layers = None if memory is None else memory.per_layer(self.n_layers)
        try:
            yield
        finally:
            self._layers = previous

    def remove(self) -> None:
        """Take the hooks off: the model is the plain model again."""
        for h in self._handles:
            h.remove()
        self._handles = []


__all__ = ["FAMILIES", "Family", "MemoryHooks", "decoder_mlps", "family_of", "memory_branch"]
