"""Applying fetched memory inside the FFN: per sequence (gathered) or grouped by node (MoE-style dispatch).

Two representations of one batch's memory reach the model; both mean the same extra SwiGLU neurons
(model/fetched.py: FFN'(h) = FFN(h) + C·(silu(A h) ⊙ (B h)) with the row's neurons concatenated along R).

* gathered — a FetchedMemory: weights [B, n_mem_layers, 3, R, d], one private copy of its path's blocks per
  sequence. Simple, and what generation uses; but a block shared by s sequences is copied s times, and so is
  its gradient ([B, ...] fp32 buffer, then summed per block by MemoryBank.block_grads).
* grouped — a GroupedMemory: per level only the U_l distinct blocks [U_l, n_mem_layers, 3, r_l, d] (leaf
  tensors) plus, for each sequence, its index into them. Each distinct block is read from the bank once per
  batch, the gradient of each block is accumulated in place of its leaf (U-sized, already "summed over the
  sequences that share it"), and inside a layer the rows' neurons are expanded with an index_select in the
  compute dtype only transiently: the expansion is recomputed in backward, never kept for it.

Eagerly the grouped layer is a custom autograd Function (the expansion is recomputed in backward). Inside a
torch.compile'd block it runs the same product from plain differentiable ops (expand_traceable: index_select,
mask, pad, then the reference matmuls), which the compiler traces and fuses without a graph break (there the
expansion is kept for backward, as autograd does); both are tested against each other and against the
gathered path. Measured on one H200 at the paper's 160M shape, batch 16 x 2048 (benchmarks/results/): grouped
0.81 (eager) / 0.84 (compiled blocks) of the anchor's tokens/s, gather 0.82 / 0.83, FLOP bound 0.91. A batch
of 16 over 16/256/4096 nodes shares few blocks, so the two paths cost about the same there; grouped saves
bank reads, host-to-device copies and gradient memory in proportion to the sharing (large batches, a CPU bank).

The model calls two functions of this module and knows nothing else: `memory_layers(memory, n_layers)` once per
forward (the per-layer pieces of either representation) and `apply_memory(x, layer_memory)` in each FFN.
Nothing here knows about trees: a "part" is just a set of distinct blocks with a row -> block index.

Why an index_select of the distinct blocks rather than sorting the rows by node and running one matmul per
node: the levels' blocks are concatenated along R (256+64+16 neurons for the paper's 160M), so one batched
matmul per layer covers all levels at once, at the width of the whole path; per-node matmuls would run
3 levels x U_l small products (r = 16 is far too narrow for the tensor cores). The transient expansion is
[B, 3, R, d] in bf16 (16 MB per layer at the paper's shape), small next to the activations [B, T, d].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hiermem.model.fetched import DOWN, GATE, UP, FetchedMemory


# ---------------------------------------------------------------------------------------------------------
@dataclass
class MemoryPart:
    """Distinct blocks of one level (or the generic block) and which row uses which.

    weights: [U, n_mem_layers, 3, r, d] (leaf tensors when training: their .grad is the per-block gradient).
    index: [B] int64, row b uses weights[index[b]]; -1 = row b does not use this part.
    offset: where this part's r neurons start along the row's R (its level's offset in the path).
    name: a label for the caller (the bank uses its part keys, "level0", ..., "generic").
    """

    weights: torch.Tensor
    index: torch.Tensor
    offset: int
    name: str = ""

    @property
    def rank(self) -> int:
        return self.weights.shape[3]


@dataclass
class _PartRows:  # per part: the rows that use it and their block index, both on the weights' device
    rows: torch.Tensor | None  # None: every row of the batch
    sel: torch.Tensor  # [P] block index of each such row
    n: int  # number of such rows
    full_sel: torch.Tensor  # [B] block index of every row (rows not using the part: 0)
    mask: torch.Tensor | None  # [B, 1, 1, 1] 1.0 for rows using the part, 0.0 else; None: every row


def _plan(part: MemoryPart) -> _PartRows:
    idx = part.index.detach().to("cpu", torch.int64)
    used = idx >= 0
    dev = part.weights.device
    if bool(used.all()):
        sel = idx.to(dev)
        return _PartRows(None, sel, len(idx), sel, None)
    rows = used.nonzero().squeeze(1)
    mask = used.to(part.weights.dtype).view(-1, 1, 1, 1).to(dev)
    return _PartRows(rows.to(dev), idx[rows].to(dev), len(rows), idx.clamp(min=0).to(dev), mask)


@dataclass
class GroupedMemory:
    """Extra FFN neurons of a batch grouped by node: per part the distinct blocks plus each row's index.

    A row's neurons are the concatenation, along R, of the blocks of the parts it uses (at their offsets); a
    row that uses no part at some offset gets zero neurons there. The memory applies to model layers
    first_layer .. first_layer + n_mem_layers - 1 (as FetchedMemory).
    """

    parts: list[MemoryPart]
    rank: int  # R: width of a row's neurons
    first_layer: int = 0
    _plans: list[_PartRows] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("GroupedMemory: needs at least one part")
        B = {len(p.index) for p in self.parts}
        L = {p.weights.shape[1] for p in self.parts}
        if len(B) != 1 or len(L) != 1:
            raise ValueError(f"GroupedMemory: parts disagree on batch size {sorted(B)} or layers {sorted(L)}")
        for p in self.parts:
            if p.weights.dim() != 5 or p.weights.shape[2] != 3 or not 0 <= p.offset <= self.rank - p.rank:
                raise ValueError(f"GroupedMemory: part {p.name or '?'} has shape {tuple(p.weights.shape)} at "
                                 f"offset {p.offset}, outside R={self.rank}")
        self._plans = [_plan(p) for p in self.parts]

    @property
    def batch_size(self) -> int:
        return len(self.parts[0].index)

    @property
    def n_layers(self) -> int:
        return self.parts[0].weights.shape[1]

    @property
    def d(self) -> int:
        return self.parts[0].weights.shape[4]

    def rows(self, sl: slice) -> "GroupedMemory":
        """The same blocks (same leaves: gradients accumulate into them) for rows sl of the batch."""
        parts = [MemoryPart(p.weights, p.index[sl], p.offset, p.name) for p in self.parts]
        return GroupedMemory(parts, self.rank, self.first_layer)

    def per_layer(self, n_layers: int) -> list["GroupedLayer | None"]:
        """One GroupedLayer per model layer (None where the memory does not reach). The per-layer views come
        from one unbind per part, whose backward stacks the layers' gradients once: selecting weights[:, j]
        per layer would instead add a full-size zero gradient into the leaf for every layer."""
        if self.rank == 0:
            return [None] * n_layers
        live = [(p, plan) for p, plan in zip(self.parts, self._plans) if plan.n > 0 and p.rank > 0]
        per_part = [p.weights.unbind(1) for p, _ in live]
        out: list[GroupedLayer | None] = []
        for layer in range(n_layers):
            j = layer - self.first_layer
            if 0 <= j < self.n_layers and live:
                out.append(GroupedLayer([w[j] for w in per_part], [p for p, _ in live], [pl for _, pl in live],
                                        self.rank, self.batch_size))
            else:
                out.append(None)
        return out

    def for_layer(self, layer: int) -> "GroupedLayer | None":
        """Like FetchedMemory.for_layer (a convenience; the model uses per_layer once per forward)."""
        return self.per_layer(layer + 1)[layer]


class GroupedLayer:
    """One layer of a GroupedMemory: per live part its distinct blocks [U, 3, r, d] and the rows that use them."""

    def __init__(self, weights: list[torch.Tensor], parts: list[MemoryPart], plans: list[_PartRows], rank: int,
                 batch_size: int):
        self.weights, self.parts, self.plans, self.rank, self.batch_size = weights, parts, plans, rank, batch_size
        # fast path: every row uses every part and the parts tile [0, R) -> one cat, no zero fill
        spans = sorted((p.offset, p.rank) for p in parts)
        tiles = all(o == sum(r for _, r in spans[:i]) for i, (o, _) in enumerate(spans)) and \
            sum(r for _, r in spans) == rank
        self.order = sorted(range(len(parts)), key=lambda i: parts[i].offset)
        self.dense = tiles and all(pl.rows is None for pl in plans)

    def expand(self, dtype: torch.dtype) -> torch.Tensor:
        """[B, 3, R, d]: each row's neurons in dtype (a transient; used in forward and again in backward)."""
        ws = [w.detach().to(dtype) for w in self.weights]  # cast the U distinct blocks, not the B rows
        if self.dense:
            rows = [ws[i].index_select(0, self.plans[i].sel) for i in self.order]
            return rows[0] if len(rows) == 1 else torch.cat(rows, dim=2)
        w0 = ws[0]
        out = w0.new_zeros((self.batch_size, 3, self.rank, w0.shape[-1]))
        for w, p, pl in zip(ws, self.parts, self.plans):
            blocks = w.index_select(0, pl.sel)
            if pl.rows is None:
                out[:, :, p.offset:p.offset + p.rank] = blocks
            else:
                out[pl.rows, :, p.offset:p.offset + p.rank] = blocks
        return out

    def reduce(self, grad_rows: torch.Tensor) -> list[torch.Tensor]:
        """Per part: the rows' gradient [B, 3, R, d] summed into the distinct blocks (float32, U-sized)."""
        out = []
        for w, p, pl in zip(self.weights, self.parts, self.plans):
            g = grad_rows[:, :, p.offset:p.offset + p.rank]
            if pl.rows is not None:
                g = g.index_select(0, pl.rows)
            acc = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            acc.index_add_(0, pl.sel, g.float())
            out.append(acc.to(w.dtype))
        return out

    def expand_traceable(self) -> torch.Tensor:
        """[B, 3, R, d] float32 from differentiable ops only (index_select, mask, pad, add): what torch.compile
        traces and fuses into one gather; autograd's index_select backward sums the rows per block."""
        out = None
        for w, p, pl in zip(self.weights, self.parts, self.plans):
            rows = w.index_select(0, pl.full_sel)
            if pl.mask is not None:
                rows = rows * pl.mask  # exact zeros for rows that do not use this part
            rows = F.pad(rows, (0, 0, p.offset, self.rank - p.offset - p.rank))
            out = rows if out is None else out + rows
        return out

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.batch_size:
            raise ValueError(f"grouped memory holds {self.batch_size} rows, the batch has {x.shape[0]}")
        if torch.compiler.is_compiling():  # inside a compiled block: plain ops, no graph break
            return gathered_ffn(x, self.expand_traceable())
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return _GroupedFFN.apply(x, self, dt, *self.weights)


class _GroupedFFN(torch.autograd.Function):
    """y = C·(silu(A x) ⊙ (B x)) per row, with A, B, C expanded from the distinct blocks. Saves x and the
    gate/up pre-activations (as autograd would) but not the expanded weights, which backward recomputes."""

    @staticmethod
    def forward(ctx, x, layer: GroupedLayer, dt: torch.dtype, *weights):
        with torch.autocast(x.device.type, enabled=False):
            W = layer.expand(dt)  # [B, 3, R, d]
            R = layer.rank
            xc = x.to(dt)
            gate_up = W[:, GATE:UP + 1].reshape(W.shape[0], 2 * R, W.shape[-1])  # [B, 2R, d] (a view)
            ab = torch.bmm(xc, gate_up.transpose(1, 2))  # [B, T, 2R]
            a, b = ab[..., :R], ab[..., R:]
            y = torch.bmm(F.silu(a) * b, W[:, DOWN])  # [B, T, d]
        ctx.layer, ctx.dt, ctx.x_dtype = layer, dt, x.dtype
        ctx.save_for_backward(xc, ab)
        return y

    @staticmethod
    def backward(ctx, dy):
        layer, dt = ctx.layer, ctx.dt
        xc, ab = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[3:])
        with torch.autocast(dy.device.type, enabled=False):
            W = layer.expand(dt)
            R = layer.rank
            dy = dy.to(dt)
            a, b = ab[..., :R], ab[..., R:]
            sa = F.silu(a)
            dh = torch.bmm(dy, W[:, DOWN].transpose(1, 2))  # [B, T, R]
            dab = torch.cat([torch.ops.aten.silu_backward(dh * b, a), dh * sa], dim=-1)  # [B, T, 2R]
            dx = None
            if need_x:
                gate_up = W[:, GATE:UP + 1].reshape(W.shape[0], 2 * R, W.shape[-1])
                dx = torch.bmm(dab, gate_up).to(ctx.x_dtype)
            grads = [None] * len(layer.weights)
            if need_w:
                dW = torch.empty_like(W)
                dW[:, GATE:UP + 1] = torch.bmm(dab.transpose(1, 2), xc).view(W.shape[0], 2, R, W.shape[-1])
                dW[:, DOWN] = torch.bmm((sa * b).transpose(1, 2), dy)
                grads = layer.reduce(dW)
        return (dx, None, None, *grads)


# ---------------------------------------------------------------------------------------------------------
def gathered_ffn(x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """The reference: memory [B, 3, R, d] holds each sequence's own neurons; three batched matmuls."""
    mem = memory.to(x.dtype)
    a = torch.bmm(x, mem[:, GATE].transpose(1, 2))  # [B, T, R]
    b = torch.bmm(x, mem[:, UP].transpose(1, 2))
    return torch.bmm(F.silu(a) * b, mem[:, DOWN])  # [B, T, d]


def apply_memory(x: torch.Tensor, memory: "torch.Tensor | GroupedLayer") -> torch.Tensor:
    """The memory branch C·(silu(A x) ⊙ (B x)) of one FFN, for either representation of one layer."""
    if isinstance(memory, torch.Tensor):
        return gathered_ffn(x, memory)
    return memory.apply(x)


def memory_layers(memory: "FetchedMemory | GroupedMemory | None", n_layers: int) -> list:
    """Per model layer: that layer's memory (a [B, 3, R, d] tensor or a GroupedLayer) or None."""
    if memory is None:
        return [None] * n_layers
    if isinstance(memory, FetchedMemory):
        w = memory.weights
        if w.shape[3] == 0:
            return [None] * n_layers
        per = w.unbind(1)  # one backward (a stack) instead of a full-size zero gradient per layer
        return [per[i - memory.first_layer] if 0 <= i - memory.first_layer < len(per) else None
                for i in range(n_layers)]
    return memory.per_layer(n_layers)


def select_rows(memory: "FetchedMemory | GroupedMemory", sl: slice) -> "FetchedMemory | GroupedMemory":
    """Rows sl of a batch's memory (micro-batches); gradients still accumulate into the same leaves."""
    if isinstance(memory, FetchedMemory):
        return FetchedMemory(memory.weights[sl], memory.first_layer)
    return memory.rows(sl)


__all__ = ["GroupedLayer", "GroupedMemory", "MemoryPart", "apply_memory", "gathered_ffn", "memory_layers",
           "select_rows"]
