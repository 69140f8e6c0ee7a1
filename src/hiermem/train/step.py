"""One training step, shared by `hiermem train` and `hiermem bench`.

    fetch the batch's memory blocks (each row's root-to-leaf path, or the generic block)
    -> forward + backward over micro-batches (the loss normalised by the batch's count of target tokens)
    -> one gradient norm over the anchor and the fetched blocks together, clipped without a host sync
    -> the anchor's AdamW (fused) and the bank's lazy AdamW (the same fused kernel) on the fetched blocks only.

Numerical faults never cost a host sync: a step whose loss or gradient norm is NaN/Inf is recorded in flags on
the device (as GradScaler's found_inf), which the loop reads when it logs and before every checkpoint
(nonfinite()). With train.nonfinite=skip the step's update is masked there too: both AdamWs take the flag as
their kernel's found_inf (no change to weights, moments or step counts; memory/optim.py for the bank's).

Nothing here reads files or logs: the loop (train/loop.py) feeds batches and writes metrics, the benchmark feeds
synthetic batches. The step returns tensors; converting them to Python numbers (a host sync) is the caller's
choice, made only when it logs. A caller that knows its next batches passes their paths to prefetch(), so that a
bank on disk reads their blocks in the background while this step computes.
"""

from __future__ import annotations

import math

import torch

from hiermem.config import Config
from hiermem.errors import HiermemError
from hiermem.memory.bank import MemoryBank
from hiermem.memory.fetch import FetchCounts, block_grads, fetch, needed_blocks
from hiermem.memory.optim import LazyAdamW
from hiermem.memory.shard import ShardReducer
from hiermem.model.transformer import Transformer, next_token_loss, whole_documents
from hiermem.train.parallel import World, is_sharded, local_grads, no_grad_sync
from hiermem.train.schedule import span_cosine, warmup_cosine


def anchor_optimizer(model: Transformer, cfg: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are not decayed), as in nanoGPT."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    t = cfg.train
    # fused on CPU and CUDA: one pass per parameter instead of foreach's several, and the kernel that masks a
    # step by found_inf on the device (train.nonfinite=skip)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=True)


def bank_optimizer(bank: MemoryBank, cfg: Config) -> LazyAdamW:
    m, t = cfg.memory, cfg.train
    return LazyAdamW(bank, lr=m.lr, betas=(t.beta1, t.beta2), weight_decay=m.weight_decay)


def generic_draw(cfg: Config, step: int, batch: int) -> torch.Tensor:
    """Which sequences use the generic block this step. Seeded by (seed, step): resume-exact, no RNG state."""
    p = cfg.memory.generic_prob
    if p is None:
        p = 1.0 / (cfg.routing.branching + 1)
    if not cfg.memory.generic or p <= 0:
        return torch.zeros(batch, dtype=torch.bool)
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    if cfg.memory.generic_sampling == "batch":
        return torch.rand(1, generator=g).expand(batch) < p
    return torch.rand(batch, generator=g) < p


class TrainStep:
    """The step for one model (+ bank). Call it with a batch on the CPU (input_ids, targets, positions,
    segment_ids, and paths for memory runs) and the 0-based step number; it returns a dict of tensors
    (loss, grad_norm, lr, and for memory runs lr_memory, blocks_updated, generic_frac, fetched_bytes).

    Under torchrun (world): `module` is the wrapped anchor (DDP or FSDP2, train/parallel.py) and `reducer`
    sums the shared blocks' gradients; the batch is this rank's share of the global batch (the same number of
    rows on every rank), the loss is normalised by the global count of target tokens, and the clip norm is
    the global one, anchor and memory gradients of every rank included. The returned loss is the global one."""

    def __init__(self, cfg: Config, model: Transformer, device: torch.device, total_steps: int,
                 anchor_opt: torch.optim.Optimizer | None, bank: MemoryBank | None = None,
                 bank_opt: LazyAdamW | None = None, world: World | None = None,
                 module: torch.nn.Module | None = None, reducer: ShardReducer | None = None):
        if cfg.model.attention == "flex" and device.type != "cuda":
            raise HiermemError("config: model.attention=flex trains on CUDA only (FlexAttention has no CPU "
                               "backward in this torch); use model.attention=sdpa")
        self.cfg, self.model, self.device, self.total_steps = cfg, model, device, total_steps
        self.anchor_opt, self.bank, self.bank_opt = anchor_opt, bank, bank_opt
        self.counts = FetchCounts(bank.spec) if bank is not None else None
        self.autocast = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and device.type == "cuda")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.world = world if world is not None and world.distributed else None
        self.module, self.reducer = module if module is not None else model, reducer
        # the first step (0-based) whose loss (kind 0) or gradient norm (kind 1) was not finite; steps skipped
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_bad_kind = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        # the loss is taken here, from the model's logits, so that train.compile can compile it too
        self.loss_fn = next_token_loss
        if cfg.train.compile:  # per block, as torchtitan does: the memory branch traces without a graph break
            for block in model.blocks:
                block.compile()
            self.loss_fn = torch.compile(next_token_loss)

    def prefetch(self, paths: torch.Tensor, step: int) -> None:
        """Start reading the blocks that step `step` will fetch for a batch with these paths."""
        if self.bank is not None:
            use_generic = self._generic(step, len(paths))
            self.bank.prefetch(needed_blocks(self.bank.spec, paths, use_generic))

    def _generic(self, step: int, rows: int) -> torch.Tensor:
        """This rank's rows of the global batch's generic draw (the draw one process makes for the union)."""
        if self.world is None:
            return generic_draw(self.cfg, step, rows)
        r = self.world.rank
        return generic_draw(self.cfg, step, rows * self.world.size)[r * rows:(r + 1) * rows]

    def _micro_loss(self, module: torch.nn.Module, batch: dict, dev: dict, sl: slice, memory) -> torch.Tensor:
        """The mean loss of rows sl of the batch (bf16 autocast where on); the logits die with this frame. Rows
        that are whole documents (asked of the batch's host copy: no device sync) need no document mask."""
        segments = None if whole_documents(batch["segment_ids"][sl]) else dev["segment_ids"][sl]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits, _ = module(dev["input_ids"][sl], None, dev["positions"][sl], segments, memory)
            return self.loss_fn(logits, dev["targets"][sl])

    def __call__(self, batch: dict[str, torch.Tensor], step: int) -> dict:
        if self.world is not None:
            return self._distributed(batch, step)
        cfg, t = self.cfg, self.cfg.train
        lr = span_cosine(step, self.total_steps, t.lr, t.lr_min, t.warmup_steps, t.lr_span)
        B = batch["input_ids"].shape[0]
        out: dict = {"lr": lr}
        f = use_generic = None
        if self.bank is not None:
            use_generic = generic_draw(cfg, step, B)
            f = fetch(self.bank, batch["paths"], use_generic, device=self.device, requires_grad=True)
            self.counts.add(f)
        dev = {k: batch[k].to(self.device, non_blocking=True)
               for k in ("input_ids", "targets", "positions", "segment_ids")}
        n_valid = (dev["targets"] != -100).sum().clamp(min=1)
        micro = math.ceil(B / t.grad_accum)
        loss_sum = torch.zeros((), device=self.device)
        for lo in range(0, B, micro):
            sl = slice(lo, lo + micro)
            memory = f.memory.rows(sl) if f is not None else None  # same leaves: gradients accumulate
            loss = self._micro_loss(self.model, batch, dev, sl, memory)
            # weight each micro-batch by its share of the batch's target tokens: equals one big batch's mean
            share = (dev["targets"][sl] != -100).sum() / n_valid
            loss = torch.where(share > 0, loss, 0.0)  # no targets: mean of nothing (NaN), share 0; a real NaN stays
            (loss * share).backward()
            loss_sum += loss.detach() * share

        grads = [p.grad for p in self.params if p.grad is not None]
        sq = torch.stack(torch._foreach_norm(grads)).pow(2).sum() if grads else torch.zeros((), device=self.device)
        bg = block_grads(f, self.bank.device) if f is not None else None
        if bg is not None:
            sq = sq + bg.norm_sq().to(sq.device)
        return self._update(out, grads, bg, sq.sqrt(), loss_sum, lr, step, f, use_generic)

    def _distributed(self, batch: dict[str, torch.Tensor], step: int) -> dict:
        """The same step as __call__'s, on one rank of a job (see the class docstring)."""
        t, world = self.cfg.train, self.world
        lr = span_cosine(step, self.total_steps, t.lr, t.lr_min, t.warmup_steps, t.lr_span)
        B = batch["input_ids"].shape[0]
        out: dict = {"lr": lr}
        f = use_generic = None
        if self.bank is not None:
            use_generic = self._generic(step, B)
            f = fetch(self.bank, batch["paths"], use_generic, device=self.device, requires_grad=True)
            self.counts.add(f)
        dev = {k: batch[k].to(self.device, non_blocking=True)
               for k in ("input_ids", "targets", "positions", "segment_ids")}
        n_valid = world.sum_((dev["targets"] != -100).sum().float()).clamp(min=1)
        micro = math.ceil(B / t.grad_accum)
        loss_sum = torch.zeros((), device=self.device)
        starts = list(range(0, B, micro))
        for lo in starts:
            sl = slice(lo, lo + micro)
            memory = f.memory.rows(sl) if f is not None else None
            with no_grad_sync(self.module, last=lo == starts[-1]):
                loss = self._micro_loss(self.module, batch, dev, sl, memory)
                share = (dev["targets"][sl] != -100).sum() / n_valid  # of the global batch's targets
                loss = torch.where(share > 0, loss, 0.0)
                (loss * share).backward()
            loss_sum += loss.detach() * share

        grads = local_grads(self.params)  # DDP: the summed gradients, the same on every rank; FSDP2: shards
        if grads and is_sharded(self.model):  # FSDP2 averaged them over ranks: make it the sum
            torch._foreach_mul_(grads, float(world.size))
        sq = torch.stack(torch._foreach_norm(grads)).pow(2).sum() if grads else torch.zeros((), device=self.device)
        if self.module is not self.model and hasattr(self.module, "no_sync") and world.rank != 0:
            sq = torch.zeros_like(sq)  # a replicated anchor's norm is counted once, by rank 0
        bg = None
        if f is not None:
            bg = block_grads(f, self.bank.device)
            bg, sq_mem = self.reducer.reduce(bg, f.rows_per_block)
            sq = sq + sq_mem.to(sq.device)
        totals = world.sum_(torch.stack([sq, loss_sum]))
        return self._update(out, grads, bg, totals[0].sqrt(), totals[1], lr, step, f, use_generic)

    def nonfinite(self) -> tuple[int | None, str, int]:
        """(the first 0-based step whose loss or gradient norm was NaN/Inf, or None; "loss" or "gradient norm";
        the number of steps skipped by train.nonfinite=skip). Reads the device flags: a host sync."""
        first = int(self.first_bad)
        kind = "gradient norm" if int(self.first_bad_kind) else "loss"
        skipped = int(self.skipped) if self.cfg.train.nonfinite == "skip" else 0
        return (first if first >= 0 else None), kind, skipped

    def _flag_nonfinite(self, loss_sum: torch.Tensor, norm: torch.Tensor, step: int) -> torch.Tensor:
        """Record this step in the device flags if its loss or norm is not finite; returns that as a 0-dim bool
        (the same on every rank of a job: both are global). No host sync."""
        bad_loss, bad_norm = ~torch.isfinite(loss_sum), ~torch.isfinite(norm)
        bad = bad_loss | bad_norm
        new = bad & (self.first_bad < 0)
        self.first_bad = torch.where(new, step, self.first_bad)
        self.first_bad_kind = torch.where(new, (~bad_loss).long(), self.first_bad_kind)
        self.skipped = self.skipped + bad.long()
        return bad

    def _update(self, out: dict, grads: list, bg, norm: torch.Tensor, loss_sum: torch.Tensor, lr: float, step: int,
                f, use_generic) -> dict:
        """Clip by the one global norm (anchor and fetched memory together; no host sync), then the anchor's AdamW
        and the bank's lazy AdamW on the fetched blocks, both masked on a non-finite step under
        train.nonfinite=skip. Shared by the one-process and the distributed step."""
        t, m = self.cfg.train, self.cfg.memory
        bad = self._flag_nonfinite(loss_sum, norm, step)
        skip = bad if t.nonfinite == "skip" else None
        if t.grad_clip > 0:
            scale = torch.where(norm > t.grad_clip, t.grad_clip / (norm + 1e-6), torch.ones_like(norm))
            if grads:
                torch._foreach_mul_(grads, scale)
            if bg is not None:
                bg.scale_(scale.to(self.bank.device))
        if self.anchor_opt is not None:
            for group in self.anchor_opt.param_groups:
                group["lr"] = lr
            if skip is not None:  # read by the fused kernel on the device; it also restores the step counts
                self.anchor_opt.found_inf = skip.float()
            self.anchor_opt.step()
            self.anchor_opt.zero_grad(set_to_none=True)
        out.update(loss=loss_sum, grad_norm=norm)
        if bg is not None:
            lr_mem = warmup_cosine(step, self.total_steps, m.lr, m.lr_min, m.warmup_steps)
            mask = skip.to(self.bank.device) if skip is not None else None
            out.update(lr_memory=lr_mem, blocks_updated=self.bank_opt.step(bg, lr_mem, skip=mask),
                       generic_frac=float(use_generic.float().mean()), fetched_bytes=f.nbytes)
        return out


__all__ = ["TrainStep", "anchor_optimizer", "bank_optimizer", "generic_draw"]
