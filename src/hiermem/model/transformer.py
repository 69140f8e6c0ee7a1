"""The anchor: an OpenLM/LLaMA-style decoder-only transformer, readable top to bottom.

Pre-norm blocks (RMSNorm, weight only) with attention then a SwiGLU FFN, RoPE on q/k, optional QK-norm over the
full q and k projections, no biases anywhere, tied or untied embeddings. This reproduces the paper's parameter
counts exactly (docs/method.md §2). Layer names follow LLaMA / Hugging Face (q_proj ... o_proj, gate_proj,
up_proj, down_proj); docs/method.md maps them to the paper's W1/W2/W3.

Packed sequences hold several documents: `segment_ids` (one id per document, -1 = padding) make attention stay
inside each document; positions restart at every document (the caller passes them).

The one addition for hierarchical memories: every block accepts an optional per-sequence memory (a
FetchedMemory, model/fetched.py). FFN memory (the default kind) is extra hidden neurons: appending r neurons to
gate_proj, up_proj and down_proj is the same as adding a branch C·(silu(A h) ⊙ (B h)), which model/fetched.py
computes for a whole batch at once. The other kinds (model/memory_kinds.py) act through two more hooks: a LoRA
delta added to a projection's output (`project`), and the kv memory's attention added to the heads' output.
With no memory every hook is skipped, so the plain anchor pays nothing.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from hiermem.config import ModelConfig
from hiermem.model.fetched import FetchedMemory, MemoryLayer


def project(linear: nn.Linear, x: torch.Tensor, memory: MemoryLayer | None, name: str) -> torch.Tensor:
    """linear(x), plus the memory's LoRA delta if its kind patches this projection (`name`: q_proj, ...)."""
    y = linear(x)
    return y if memory is None else memory.patch(name, x, y)


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


def whole_documents(segment_ids: torch.Tensor) -> bool:
    """Whether every row is one document without padding (plain causal attention needs no mask). A host sync
    when segment_ids is on the GPU: the trainer asks this of its CPU copy and then passes no segment ids."""
    return bool(((segment_ids == segment_ids[:, :1]) & (segment_ids >= 0)).all())


def document_mask(segment_ids: torch.Tensor, kind: str = "sdpa"):
    """Query i may see key j iff same document and j <= i. None when every row is a single document without
    padding (plain causal attention, the fastest kernels); else a boolean [B, 1, T, T] for SDPA, or a
    FlexAttention BlockMask with kind="flex". A padding query sees only itself (one finite softmax entry)."""
    if kind == "sdpa" and whole_documents(segment_ids):
        return None
    if kind == "flex":
        def same_doc(b, h, q, k):
            seg_q, seg_k = segment_ids[b, q], segment_ids[b, k]
            return ((seg_q == seg_k) & (k <= q) & (seg_k >= 0)) | ((q == k) & (seg_q < 0))

        B, T = segment_ids.shape
        return create_block_mask(same_doc, B, None, T, T, device=segment_ids.device)
    return visible(segment_ids, segment_ids, 0)[:, None]


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled, as it must be to be fast: eager, it materialises the whole score matrix. Made on
    first use (compiling is lazy either way); inside a compiled block the compiler traces through it."""
    return torch.compile(flex_attention)


def visible(seg_q: torch.Tensor, seg_k: torch.Tensor, offset: int) -> torch.Tensor:
    """[B, Tq, Tk] bool: query i (at position offset + i of the keys) sees key j iff both belong to the same
    document, j <= offset + i and key j is not padding; a padding query sees only itself."""
    dev = seg_q.device
    q_at = torch.arange(seg_q.shape[1], device=dev)[:, None] + offset
    k_at = torch.arange(seg_k.shape[1], device=dev)[None, :]
    same = (seg_q[:, :, None] == seg_k[:, None, :]) & (k_at <= q_at) & (seg_k >= 0)[:, None, :]
    return same | ((k_at == q_at) & (seg_q < 0)[:, :, None])


@dataclass
class KVCache:
    """Keys and values of every layer while generating: a prompt is run once, then one token per step.
    segments [B, T] are the cached tokens' document ids (-1 = left padding, never attended)."""

    keys: list = field(default_factory=list)  # per layer [B, H, T, head_dim]
    values: list = field(default_factory=list)
    segments: torch.Tensor | None = None

    def mask(self, segment_ids: torch.Tensor) -> torch.Tensor:
        """[B, 1, T_new, T_cached + T_new]: the document mask of the new tokens over every cached one."""
        t_old = 0 if self.segments is None else self.segments.shape[1]
        self.segments = segment_ids if self.segments is None else torch.cat([self.segments, segment_ids], 1)
        return visible(segment_ids, self.segments, t_old)[:, None]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], 2)
            self.values[layer] = torch.cat([self.values[layer], v], 2)
        return self.keys[layer], self.values[layer]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        width = cfg.n_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, width, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, width, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, width, bias=False)
        self.o_proj = nn.Linear(width, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(width, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(width, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0,
                memory: MemoryLayer | None = None):
        B, T, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # [B, T, H·hd] -> [B, H, T, hd]
            return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

        q_plain = heads(self.q_norm(project(self.q_proj, x, memory, "q_proj")))  # before RoPE (kv memory's)
        k = heads(self.k_norm(project(self.k_proj, x, memory, "k_proj")))
        v = heads(project(self.v_proj, x, memory, "v_proj"))
        q, k = apply_rope(q_plain, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # generating: attend to the earlier tokens' keys and values as well
            k, v = cache.extend(layer, k, v)
        if mask is None:  # every row is one whole document: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif isinstance(mask, torch.Tensor):  # boolean [B, 1, T, T]: causal and within the same document
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:  # a FlexAttention BlockMask (model.attention=flex): the same rule, computed blockwise (on CUDA by
            # the compiled kernel; the CPU runs the eager reference, forward only)
            y = (compiled_flex_attention() if q.is_cuda else flex_attention)(q, k, v, block_mask=mask)
        if memory is not None:  # kv memory: a separate attention over the memory slots, added per head
            y = memory.attend(q_plain, y)
        return project(self.o_proj, y.transpose(1, 2).reshape(B, T, -1), memory, "o_proj")


class FeedForward(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj x) * up_proj x), plus this layer's fetched neurons (or LoRA) if any."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, memory: MemoryLayer | None = None) -> torch.Tensor:
        if memory is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        h = F.silu(project(self.gate_proj, x, memory, "gate_proj")) * project(self.up_proj, x, memory, "up_proj")
        return memory.add_neurons(x, project(self.down_proj, h, memory, "down_proj"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, cos, sin, mask, memory=None, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer, memory)
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
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        memory: FetchedMemory | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids [B, T]; targets [B, T] with -100 = ignore; positions [B, T] (default 0..T-1);
        segment_ids [B, T]: document of each token, -1 = padding (default: each row is one document);
        memory: per-sequence memory (FFN neurons or another kind); cache: generation's keys and values (each row one document; the
        logits are then those of the last position only). Returns (logits [B, T, V], mean cross-entropy
        over non-ignored targets, or None)."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_base)
        if cache is not None:
            mask = cache.mask(segment_ids if segment_ids is not None else torch.zeros_like(input_ids))
        else:
            mask = None if segment_ids is None else document_mask(segment_ids, self.cfg.attention)
        per_layer = [None] * len(self.blocks)
        if memory is not None:
            memory.kind.check_model(self.cfg.d_model, self.cfg.n_heads * self.cfg.head_dim, self.cfg.d_ff)
            per_layer = memory.per_layer(len(self.blocks))
        x = self.tok_emb(input_ids)
        for i, (block, mem) in enumerate(zip(self.blocks, per_layer)):
            x = block(x, cos, sin, mask, mem, cache, i)
        if cache is not None:  # generation needs the next token only
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x))
        return logits, None if targets is None else next_token_loss(logits, targets)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy [B, T, V] vs [B, T] over the targets that are not -100, in float32 (bf16 logits are
    upcast first). train.compile compiles this too, as torchtitan does: fused, the upcast and the softmax never
    materialise a float32 copy of the logits."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(0, 1), ignore_index=-100)


def count_parameters(cfg: ModelConfig) -> int:
    """Exact parameter count from the shape alone (no allocation); matches Transformer's numel sum."""
    d, width, L = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_layers
    per_block = 4 * d * width + 3 * d * cfg.d_ff + 2 * d + (2 * width if cfg.qk_norm else 0)
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return cfg.vocab_size * d + head + L * per_block + d
