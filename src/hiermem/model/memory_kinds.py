"""Memory types: what a fetched block holds and how the model applies it (memory.kind).

Every kind stores a block in one layout, [n_mem_layers, S, r, d]: per memory layer S slabs of r rows, each row
d = d_model wide, so that a row's R = sum of its parts' ranks is a concatenation along r, exactly as for FFN
memories (model/fetched.py). A kind is a list of matrices [r, n]; a matrix of n columns takes ceil(n/d)
consecutive slabs, slab k holding its columns k·d .. k·d + d - 1, zero-padded past n. The padding is never read
(it gets no effect and a zero gradient, so it stays zero) and is not counted as a parameter.

  ffn       gate rows, up rows, down columns (transposed): R extra SwiGLU neurons,
            FFN'(h) = FFN(h) + C·(silu(A h) ⊙ (B h)); S = 3.
  lora_qk   per patched projection W (q_proj, k_proj; lora_vo: v_proj, o_proj; lora_ffn: gate_proj, up_proj,
  lora_vo   down_proj) A [R, d_in] and B transposed [R, d_out]: W -> W + (alpha/R)·B·A, the patch of peft's
  lora_ffn  LoRA with R the row's whole fetched rank (all levels; a row that lacks a part keeps the same R).
            B = 0 at init, A Kaiming-uniform (a=sqrt(5), as nn.Linear and peft); the delta is added to the
            projection's output, before QK-norm and RoPE.
  kv        R learned keys and R learned values [R, n_heads·head_dim], split into heads. The layer's queries
            (after QK-norm, before RoPE: neither side carries a position) attend to them in a separate softmax
            attention with no mask, scale 1/sqrt(head_dim); slots of a part a row does not use are masked out.
            The result is added to the heads' output before o_proj, so o_proj maps it like ordinary
            attention output (the paper leaves this open). Values 0 at init, keys truncated normal.

Every kind has zero effect at initialisation (down columns, B or values are zero). The functions below are the
per-row math on expanded weights [B, S, R, d]; model/fetched.py expands a batch's distinct blocks into them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KINDS = ("ffn", "lora_qk", "lora_vo", "lora_ffn", "kv")
LORA_PATCHES = {"lora_qk": ("q_proj", "k_proj"), "lora_vo": ("v_proj", "o_proj"),
                "lora_ffn": ("gate_proj", "up_proj", "down_proj")}
DEFAULT_LORA_ALPHA = 2.0


@dataclass(frozen=True)
class Matrix:
    """One matrix of a block: `cols` columns in slabs first .. first + n_slabs - 1; init: normal | kaiming | zero."""

    name: str
    cols: int
    first: int
    n_slabs: int
    init: str


@dataclass(frozen=True)
class MemoryKind:
    """A memory type and the widths its layout depends on.

    attn_width: n_heads·head_dim (lora_qk, lora_vo, kv); d_ff: the FFN's hidden width (lora_ffn);
    lora_alpha: the LoRA scaling numerator (lora_* only)."""

    name: str = "ffn"
    attn_width: int | None = None
    d_ff: int | None = None
    lora_alpha: float | None = None

    def __post_init__(self) -> None:
        if self.name not in KINDS:
            raise ValueError(f"memory kind {self.name!r} is not one of {', '.join(KINDS)}")
        if self.patches and self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", DEFAULT_LORA_ALPHA)

    @property
    def needs(self) -> tuple[str, ...]:
        """The width fields this kind's layout needs."""
        return {"ffn": (), "lora_ffn": ("d_ff",)}.get(self.name, ("attn_width",))

    @property
    def patches(self) -> tuple[str, ...]:
        """The projections a LoRA kind patches (none for ffn and kv)."""
        return LORA_PATCHES.get(self.name, ())

    def _columns(self, d: int) -> list[tuple[str, int, str]]:
        w, f = self.attn_width, self.d_ff
        if self.name == "ffn":
            return [("gate", d, "normal"), ("up", d, "normal"), ("down", d, "zero")]
        if self.name == "kv":
            return [("keys", w, "normal"), ("values", w, "zero")]
        d_in = {"q_proj": d, "k_proj": d, "v_proj": d, "o_proj": w, "gate_proj": d, "up_proj": d, "down_proj": f}
        d_out = {"q_proj": w, "k_proj": w, "v_proj": w, "o_proj": d, "gate_proj": f, "up_proj": f, "down_proj": d}
        return [c for p in self.patches for c in ((f"{p}.A", d_in[p], "kaiming"), (f"{p}.B", d_out[p], "zero"))]

    def matrices(self, d: int) -> tuple[Matrix, ...]:
        out, first = [], 0
        for name, cols, init in self._columns(d):
            n = -(-cols // d)
            out.append(Matrix(name, cols, first, n, init))
            first += n
        return tuple(out)

    def matrix(self, name: str, d: int) -> Matrix:
        return next(m for m in self.matrices(d) if m.name == name)

    def n_slabs(self, d: int) -> int:
        m = self.matrices(d)[-1]
        return m.first + m.n_slabs

    def params_per_rank(self, d: int) -> int:
        """Real (non-padding) parameters per unit of rank and memory layer: 3d for ffn, 2(d + h·d_h) for
        lora_qk and lora_vo, 3(d + d_ff) for lora_ffn, 2·h·d_h for kv."""
        return sum(m.cols for m in self.matrices(d))

    def check_model(self, d_model: int, attn_width: int, d_ff: int) -> None:
        """Refuse a memory whose widths do not fit the model it is applied to."""
        for name, have in (("attn_width", attn_width), ("d_ff", d_ff)):
            want = getattr(self, name)
            if name in self.needs and want != have:
                raise ValueError(f"{self.name} memory has {name}={want}, the model has {have}")


FFN = MemoryKind()


def read_matrix(slabs: torch.Tensor, m: Matrix) -> torch.Tensor:
    """[..., S, R, d] -> [..., R, cols]: the matrix m out of its slabs (drops the padding)."""
    part = slabs[..., m.first:m.first + m.n_slabs, :, :]  # [..., c, R, d]
    if m.n_slabs == 1:
        return part[..., 0, :, :m.cols]
    rows = part.movedim(-3, -2).flatten(-2)  # [..., R, c·d]: slab k holds columns k·d .. k·d + d - 1
    return rows[..., :m.cols]


def write_matrix(slabs: torch.Tensor, m: Matrix, value: torch.Tensor) -> None:
    """The inverse of read_matrix, in place: value [..., R, cols] into slabs [..., S, R, d] (padding stays)."""
    d = slabs.shape[-1]
    padded = F.pad(value, (0, m.n_slabs * d - m.cols))
    slabs[..., m.first:m.first + m.n_slabs, :, :] = padded.unflatten(-1, (m.n_slabs, d)).movedim(-2, -3)


def init_layer(kind: MemoryKind, slabs: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Initialise one memory layer's slabs [S, r, d] (zeros on entry) of a non-ffn kind, matrix by matrix:
    kaiming: Kaiming-uniform with a=sqrt(5) over the matrix's d_in columns (nn.Linear's and peft's A);
    normal: truncated normal(std, ±3σ); zero: stays zero (B and the values: no effect at init)."""
    r = slabs.shape[1]
    for m in kind.matrices(slabs.shape[-1]):
        if m.init == "zero" or r == 0:
            continue
        w = torch.empty(r, m.cols)
        if m.init == "kaiming":
            torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
        else:
            torch.nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std, generator=generator)
        write_matrix(slabs, m, w)


# -- the per-row math, on expanded weights W [B, S, R, d] ------------------------------------------------------
def lora_delta(x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor, scale: float) -> torch.Tensor:
    """scale·(x Aᵀ) B for x [B, T, d_in], A [B, R, d_in], Bᵀ [B, R, d_out]: the output change of W + scale·B·A."""
    return torch.bmm(torch.bmm(x, a.transpose(1, 2).to(x.dtype)), b_t.to(x.dtype)) * scale


def memory_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     slots: torch.Tensor | None) -> torch.Tensor:
    """Queries q [B, H, T, hd] over each row's memory slots keys/values [B, R, H·hd]: softmax(q kᵀ/sqrt(hd)) v,
    [B, H, T, hd]. slots [B, R] bool marks the slots a row has (None: all); a row with none gets zeros."""
    B, H, T, hd = q.shape
    k = keys.unflatten(-1, (H, hd)).transpose(1, 2).to(q.dtype)  # [B, H, R, hd]
    v = values.unflatten(-1, (H, hd)).transpose(1, 2).to(q.dtype)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * hd ** -0.5  # [B, H, T, R]
    if slots is None:
        p = scores.softmax(-1)
    else:  # a finite fill, then a zero weight: no NaN even for a row without slots
        keep = slots[:, None, None, :]
        p = scores.masked_fill(~keep, torch.finfo(scores.dtype).min).softmax(-1) * keep
    return torch.matmul(p.to(v.dtype), v)


class KindOps:
    """The hooks of one memory layer of a non-ffn kind, on lazily expanded per-row weights.

    expand() gives the rows' weights [B, S, R, d] from differentiable ops (autograd sums the rows' gradients
    into the shared blocks); it runs once per layer and forward pass, at the first hook that needs it."""

    def __init__(self, kind: MemoryKind, rank: int, expand, slots):
        self.kind, self.rank, self._expand, self._slots = kind, rank, expand, slots
        self._w: torch.Tensor | None = None

    @property
    def scale(self) -> float:
        return self.kind.lora_alpha / self.rank

    def weights(self) -> torch.Tensor:
        if self._w is None:
            self._w = self._expand()
        return self._w

    def take(self, name: str) -> torch.Tensor:
        w = self.weights()
        return read_matrix(w, self.kind.matrix(name, w.shape[-1]))

    def patch(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if name not in self.kind.patches:
            return y
        return y + lora_delta(x, self.take(f"{name}.A"), self.take(f"{name}.B"), self.scale)

    def attend(self, q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind.name != "kv":
            return y
        return y + memory_attention(q, self.take("keys"), self.take("values"), self._slots())


__all__ = ["DEFAULT_LORA_ALPHA", "FFN", "KINDS", "KindOps", "Matrix", "MemoryKind", "init_layer", "lora_delta",
           "memory_attention", "read_matrix", "write_matrix"]
