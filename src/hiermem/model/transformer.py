"""The anchor: an OpenLM/LLaMA-style decoder-only transformer, readable top to bottom.

Pre-norm blocks (RMSNorm, weight only) with attention then a SwiGLU FFN, RoPE on q/k, optional QK-norm over the
full q and k projections, no biases anywhere, tied or untied embeddings. This reproduces the paper's parameter
counts exactly (METHOD.md §2.1).

The one addition for hierarchical memories: every FFN accepts optional per-sequence extra hidden neurons
(a FetchedMemory, METHOD.md §2.2). Concatenating r neurons to the inner dimension of W1, W2, W3 is the same
as adding a branch C·(silu(A h) ⊙ (B h)); we compute that branch with batched matmuls because every sequence
of a batch has its own blocks (memory/dispatch.py: per sequence, or grouped by node for large batches).
With no memory the branch is skipped, so the plain anchor pays nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hiermem.config import ModelConfig
from hiermem.memory.dispatch import apply_memory, memory_layers
from hiermem.model.fetched import FetchedMemory


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [B, 1, T, head_dim/2] for integer positions [B, T] (positions may restart per doc)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None, :, None] * inv_freq  # [B, 1, T, hd/2]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :h], x[..., h:]) — the GPT-NeoX/LLaMA 'rotate half' layout."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        width = cfg.n_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, width, bias=False)
        self.wk = nn.Linear(cfg.d_model, width, bias=False)
        self.wv = nn.Linear(cfg.d_model, width, bias=False)
        self.wo = nn.Linear(width, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(width, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(width, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x)).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_norm(self.wk(x)).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # boolean [B, 1, T, T]: causal and within the same document
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU with xformers/OpenLM naming: W1 gate, W2 up, W3 down (the memory's down part starts at zero)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w3 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, memory=None) -> torch.Tensor:
        y = self.w3(F.silu(self.w1(x)) * self.w2(x))
        if memory is not None:  # this layer's extra neurons: [B, 3, R, d] per sequence, or grouped by node
            y = y + apply_memory(x, memory)
        return y


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, cos, sin, mask, memory=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.ffn(self.ffn_norm(x), memory)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be resolved (> 0) before building the model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2/nanoGPT init: N(0, std); residual output projections scaled by 1/sqrt(2·layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w3.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        memory: FetchedMemory | None = None,  # or a memory.dispatch.GroupedMemory
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids [B, T]; targets [B, T] with -100 = ignore; positions [B, T] (default 0..T-1);
        mask: boolean [B, 1, T, T] document mask (default plain causal); memory: per-sequence FFN neurons.
        Returns (logits [B, T, V], mean cross-entropy over non-ignored targets or None)."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_base)
        x = self.tok_emb(input_ids)
        for block, mem in zip(self.blocks, memory_layers(memory, len(self.blocks))):
            x = block(x, cos, sin, mask, mem)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count from the shape alone (no allocation); matches Transformer's numel sum."""
    d, width, L = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_layers
    per_block = 4 * d * width + 3 * d * cfg.d_ff + 2 * d + (2 * width if cfg.qk_norm else 0)
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return cfg.vocab_size * d + head + L * per_block + d
