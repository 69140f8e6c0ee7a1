"""The seam between the memory bank and the model: per-sequence extra FFN neurons.

The model only ever sees this object; it knows nothing about trees, files or routing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GATE, UP, DOWN = 0, 1, 2


@dataclass
class FetchedMemory:
    """Extra SwiGLU neurons for each sequence of a batch.

    weights: [B, n_mem_layers, 3, R, d]. For sequence b and memory layer j, weights[b, j, GATE] holds the
    R gate rows A (appended to W1), weights[b, j, UP] the R up rows B (appended to W2) and
    weights[b, j, DOWN] the transposed down columns C^T (appended to W3), so that
        FFN'(h) = FFN(h) + C · (silu(A h) ⊙ (B h)).
    R is the concatenation of the path's blocks (r1 + r2 + ... ), or the generic block's size.
    The memory applies to model layers first_layer .. first_layer + n_mem_layers - 1.
    """

    weights: torch.Tensor
    first_layer: int = 0

    @property
    def n_layers(self) -> int:
        return self.weights.shape[1]

    def for_layer(self, layer: int) -> torch.Tensor | None:
        """[B, 3, R, d] for a model layer, or None when the memory does not cover it."""
        j = layer - self.first_layer
        if 0 <= j < self.n_layers and self.weights.shape[3] > 0:
            return self.weights[:, j]
        return None
