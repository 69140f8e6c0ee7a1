"""How fetched memory joins the model: per-sequence extra SwiGLU neurons (or another kind), as distinct blocks.

The model only sees a FetchedMemory; it knows nothing about trees, files or routing (docs/method.md §2).
For sequence b and memory layer j the extra neurons are R gate rows A, R up rows B and R down columns C
(stored transposed, C^T), so that

    FFN'(h) = FFN(h) + C · (silu(A h) ⊙ (B h))

which is exactly the FFN with those R neurons appended to gate_proj, up_proj and down_proj.

One representation, for training and inference alike: per *part* (a tree level, or the generic block) only the
U distinct blocks that the batch uses, [U, n_mem_layers, 3, r, d], plus each row's index into them. A row's R
neurons are the concatenation, along R, of its parts' blocks at their offsets (level 1 first). So a block
shared by s sequences is read once and its gradient arrives already summed over those s sequences (in the
leaf tensor's .grad), and inside a layer each row's neurons are expanded only transiently (a custom autograd
Function recomputes the expansion in backward instead of keeping it). Inside a torch.compile'd block the same
product runs from plain differentiable ops, which the compiler traces without a graph break.

Why expand the distinct blocks per row rather than sorting rows by node and running one matmul per node: the
levels are concatenated along R, so one batched matmul per layer covers every level at the path's full width;
per-node products would be levels x U small matmuls (r = 16 is far too narrow for tensor cores).

The other memory kinds (LoRA patches of q/k, v/o or the FFN's projections, kv slots; model/memory_kinds.py)
store a block the same way with S slabs instead of 3, [U, n_mem_layers, S, r, d], and share the same parts,
indices and expansion; their per-row math runs as plain differentiable ops on the expanded rows, through the
hooks patch() (a LoRA delta on a projection's output) and attend() (the kv memory attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hiermem.model.memory_kinds import FFN, KindOps, MemoryKind

GATE, UP, DOWN = 0, 1, 2  # index of the "3" (slab) axis of an ffn block


@dataclass
class MemoryPart:
    """Distinct blocks of one level (or the generic block) and which row uses which.

    weights: [U, n_mem_layers, S, r, d], S = 3 for ffn memory (leaf tensors when training: their .grad is the
    per-block gradient).
    index: [B] int64, row b uses weights[index[b]]; -1 = row b does not use this part.
    offset: where this part's r neurons start along a row's R.
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
class _Rows:  # per part: the rows that use it and their block index, both on the weights' device
    rows: torch.Tensor | None  # None: every row of the batch
    sel: torch.Tensor  # [P] block index of each such row
    n: int  # number of such rows
    full_sel: torch.Tensor  # [B] block index of every row (rows not using the part: 0)
    mask: torch.Tensor | None  # [B, 1, 1, 1] 1.0 for rows using the part, 0.0 else; None: every row


def _rows_of(part: MemoryPart) -> _Rows:
    """Worked out on the host (the index lives there), copied to the device without waiting for it."""
    idx = part.index.detach().to("cpu", torch.int64)
    used = idx >= 0

    def to_dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(part.weights.device, non_blocking=True)

    if bool(used.all()):
        sel = to_dev(idx)
        return _Rows(None, sel, len(idx), sel, None)
    rows = used.nonzero().squeeze(1)
    mask = to_dev(used.to(part.weights.dtype).view(-1, 1, 1, 1))
    return _Rows(to_dev(rows), to_dev(idx[rows]), len(rows), to_dev(idx.clamp(min=0)), mask)


@dataclass
class FetchedMemory:
    """Extra FFN neurons of a batch (or another kind's weights): per part the distinct blocks plus each row's
    index.

    A row that uses no part at some offset gets zero neurons there (kv memory: no slots there). The memory
    applies to model layers first_layer .. first_layer + n_mem_layers - 1.
    """

    parts: list[MemoryPart]
    rank: int  # R: width of a row's neurons
    first_layer: int = 0
    kind: MemoryKind = FFN
    _rows: list[_Rows] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("FetchedMemory: needs at least one part")
        B = {len(p.index) for p in self.parts}
        L = {p.weights.shape[1] for p in self.parts}
        if len(B) != 1 or len(L) != 1:
            raise ValueError(f"FetchedMemory: parts disagree on batch size {sorted(B)} or layers {sorted(L)}")
        slabs = self.kind.n_slabs(self.parts[0].weights.shape[-1])
        for p in self.parts:
            if p.weights.dim() != 5 or p.weights.shape[2] != slabs or not 0 <= p.offset <= self.rank - p.rank:
                raise ValueError(f"FetchedMemory: part {p.name or '?'} has shape {tuple(p.weights.shape)} at "
                                 f"offset {p.offset}, outside R={self.rank}")
        self._rows = [_rows_of(p) for p in self.parts]
        for i, (p, rp) in enumerate(zip(self.parts, self._rows)):  # a row's parts must tile, never overlap
            for q, rq in zip(self.parts[i + 1:], self._rows[i + 1:]):
                if p.offset < q.offset + q.rank and q.offset < p.offset + p.rank and \
                        bool(((p.index >= 0) & (q.index >= 0)).any()):
                    raise ValueError(f"FetchedMemory: parts {p.name or '?'} and {q.name or '?'} overlap along R "
                                     "for some row")

    @classmethod
    def per_sequence(cls, weights: torch.Tensor, first_layer: int = 0, kind: MemoryKind = FFN) -> "FetchedMemory":
        """From each sequence's own neurons [B, n_mem_layers, S, R, d] (no sharing: U = B)."""
        index = torch.arange(weights.shape[0])
        return cls([MemoryPart(weights, index, 0, "rows")], weights.shape[3], first_layer, kind)

    def with_parts(self, parts: list[MemoryPart]) -> "FetchedMemory":
        """Other parts (e.g. other rows) of the same memory: same R, layers and kind."""
        return FetchedMemory(parts, self.rank, self.first_layer, self.kind)

    @property
    def batch_size(self) -> int:
        return len(self.parts[0].index)

    @property
    def n_layers(self) -> int:
        return self.parts[0].weights.shape[1]

    def rows(self, sl: slice) -> "FetchedMemory":
        """The same blocks (same leaves: gradients accumulate into them) for rows sl of the batch."""
        return self.with_parts([MemoryPart(p.weights, p.index[sl], p.offset, p.name) for p in self.parts])

    def neurons(self) -> torch.Tensor:
        """Each row's extra neurons [B, n_mem_layers, S, R, d] in full (a reference view, for tests and
        inspection; the model never builds it)."""
        S, d = self.parts[0].weights.shape[2], self.parts[0].weights.shape[-1]
        layers = self.per_layer(self.first_layer + self.n_layers)[self.first_layer:]
        zero = self.parts[0].weights.new_zeros((self.batch_size, S, self.rank, d))
        return torch.stack([zero if m is None else m.expand(self.parts[0].weights.dtype) for m in layers], 1)

    def per_layer(self, n_layers: int) -> list["MemoryLayer | None"]:
        """One MemoryLayer per model layer (None where the memory does not reach). The per-layer views come
        from one unbind per part, whose backward stacks the layers' gradients once: selecting weights[:, j]
        per layer would instead add a full-size zero gradient into the leaf for every layer."""
        if self.rank == 0:
            return [None] * n_layers
        live = [(p, r) for p, r in zip(self.parts, self._rows) if r.n > 0 and p.rank > 0]
        per_part = [p.weights.unbind(1) for p, _ in live]
        out: list[MemoryLayer | None] = []
        for layer in range(n_layers):
            j = layer - self.first_layer
            if 0 <= j < self.n_layers and live:
                out.append(MemoryLayer([w[j] for w in per_part], [p for p, _ in live], [r for _, r in live],
                                       self.rank, self.batch_size, self.kind))
            else:
                out.append(None)
        return out


class MemoryLayer:
    """One layer of a FetchedMemory: per live part its distinct blocks [U, S, r, d] and the rows using them.
    Calling it (ffn memory) on the FFN input x [B, T, d] returns the memory branch C·(silu(A x) ⊙ (B x))
    [B, T, d]. The model calls the hooks patch(), attend() and add_neurons(); each is the identity for a kind
    that does not act there."""

    def __init__(self, weights: list[torch.Tensor], parts: list[MemoryPart], rows: list[_Rows], rank: int,
                 batch_size: int, kind: MemoryKind = FFN):
        self.weights, self.parts, self.rows, self.rank, self.batch_size = weights, parts, rows, rank, batch_size
        self.kind = kind
        self._ops = None if kind.name == "ffn" else KindOps(kind, rank, self.expand_traceable, self.slots)
        # fast path: every row uses every part and the parts tile [0, R) -> one cat, no zero fill
        spans = sorted((p.offset, p.rank) for p in parts)
        tiles = all(o == sum(r for _, r in spans[:i]) for i, (o, _) in enumerate(spans)) and \
            sum(r for _, r in spans) == rank
        self.order = sorted(range(len(parts)), key=lambda i: parts[i].offset)
        self.dense = tiles and all(r.rows is None for r in rows)

    def expand(self, dtype: torch.dtype) -> torch.Tensor:
        """[B, S, R, d]: each row's neurons in dtype (a transient; used in forward and again in backward)."""
        ws = [w.detach().to(dtype) for w in self.weights]  # cast the U distinct blocks, not the B rows
        if self.dense:
            rows = [ws[i].index_select(0, self.rows[i].sel) for i in self.order]
            return rows[0] if len(rows) == 1 else torch.cat(rows, dim=2)
        w0 = ws[0]
        out = w0.new_zeros((self.batch_size, w0.shape[1], self.rank, w0.shape[-1]))
        for w, p, r in zip(ws, self.parts, self.rows):
            blocks = w.index_select(0, r.sel)
            if r.rows is None:
                out[:, :, p.offset:p.offset + p.rank] = blocks
            else:
                out[r.rows, :, p.offset:p.offset + p.rank] = blocks
        return out

    def reduce(self, grad_rows: torch.Tensor) -> list[torch.Tensor]:
        """Per part: the rows' gradient [B, S, R, d] summed into the distinct blocks (at least float32, U-sized)."""
        out = []
        for w, p, r in zip(self.weights, self.parts, self.rows):
            g = grad_rows[:, :, p.offset:p.offset + p.rank]
            if r.rows is not None:
                g = g.index_select(0, r.rows)
            acc = torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device)
            acc.index_add_(0, r.sel, g.to(acc.dtype))
            out.append(acc.to(w.dtype))
        return out

    def expand_traceable(self) -> torch.Tensor:
        """[B, S, R, d] float32 from differentiable ops only (index_select, mask, pad, add): what torch.compile
        traces and fuses into one gather; autograd's index_select backward sums the rows per block."""
        out = None
        for w, p, r in zip(self.weights, self.parts, self.rows):
            rows = w.index_select(0, r.full_sel)
            if r.mask is not None:
                rows = rows * r.mask  # exact zeros for rows that do not use this part
            rows = F.pad(rows, (0, 0, p.offset, self.rank - p.offset - p.rank))
            out = rows if out is None else out + rows
        return out

    def slots(self) -> torch.Tensor | None:
        """[B, R] bool: the positions along R where a row has a part (None: every row everywhere)."""
        if self.dense:
            return None
        out = torch.zeros(self.batch_size, self.rank, dtype=torch.bool, device=self.weights[0].device)
        for p, r in zip(self.parts, self.rows):
            out[slice(None) if r.rows is None else r.rows, p.offset:p.offset + p.rank] = True
        return out

    def _check_rows(self, x: torch.Tensor) -> None:
        if x.shape[0] != self.batch_size:
            raise ValueError(f"fetched memory holds {self.batch_size} rows, the batch has {x.shape[0]}")

    def patch(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y = proj(x) of the projection `name` (q_proj ... down_proj), plus a LoRA kind's delta if it patches it."""
        if self._ops is None or name not in self.kind.patches:
            return y
        self._check_rows(x)
        return self._ops.patch(name, x, y)

    def attend(self, q: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The heads' output y [B, H, T, hd], plus (kv memory) the queries q' attention over the memory slots."""
        if self._ops is None or self.kind.name != "kv":
            return y
        self._check_rows(q)
        return self._ops.attend(q, y)

    def add_neurons(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The FFN's output y, plus (ffn memory) the extra neurons' branch on the FFN input x."""
        return y + self(x) if self.kind.name == "ffn" else y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._check_rows(x)
        if torch.compiler.is_compiling():  # inside a compiled block: plain ops, no graph break
            return widened_ffn(x, self.expand_traceable())
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return _MemoryFFN.apply(x, self, dt, *self.weights)


class _MemoryFFN(torch.autograd.Function):
    """y = C·(silu(A x) ⊙ (B x)) per row, with A, B, C expanded from the distinct blocks. Saves x and the
    gate/up pre-activations (as autograd would) but not the expanded weights, which backward recomputes."""

    @staticmethod
    def forward(ctx, x, layer: MemoryLayer, dt: torch.dtype, *weights):
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


def widened_ffn(x: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
    """The plain reference: neurons [B, 3, R, d] holds each sequence's own extra neurons; three batched matmuls."""
    mem = neurons.to(x.dtype)
    a = torch.bmm(x, mem[:, GATE].transpose(1, 2))  # [B, T, R]
    b = torch.bmm(x, mem[:, UP].transpose(1, 2))
    return torch.bmm(F.silu(a) * b, mem[:, DOWN])  # [B, T, d]


__all__ = ["DOWN", "GATE", "UP", "FetchedMemory", "MemoryLayer", "MemoryPart", "widened_ffn"]
