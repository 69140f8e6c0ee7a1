"""Lazy (sparse) AdamW for the memory bank.

Only the blocks fetched in a step are updated: their moments, their weight decay and their own step count
(bias corrections use the per-block count). Every other block, with its m, v and count, stays bit-identical:
dense AdamW would keep moving un-fetched blocks through stale momentum and decoupled weight decay
(docs/method.md §6.2). The update is torch.optim.AdamW(fused=True)'s kernel (on CPU and CUDA), bit for bit,
in float32 whatever the bank's storage dtype (a bf16 bank rounds the result when it stores it:
memory/precision.py).

The moments m and v are kept by the bank, beside each block (MemoryBank.update_state: in place in a float32 bank in
RAM, through copies elsewhere), so that a bank on disk pages, caches and checkpoints a block together with its
state. The optimizer itself keeps only the per-block step counts and the hyperparameters; save() writes those to
one small .npz file. Hyperparameters always come from the constructor (the config); the file records them for
reference only. Over a bank shard (memory/bank.py `held`) the counts are the shard's blocks' only; gathered()
assembles every rank's for the checkpoint file, which always covers the whole bank, and load() takes a shard's rows
of it.

A masked step (step(..., skip=flag), a 0-dim bool on the bank's device: train.nonfinite=skip) changes nothing
when the flag is set, without reading it on the host: the blocks keep their old weights and moments (the kernel
takes the flag as its found_inf), and their step counts, kept on the host, are corrected on the device (an
"uncounted" tensor per part, subtracted where the bias corrections are computed and folded into the counts by
settle(), which save() and gathered() call). A block written back unchanged still counts as written (its bf16
rounding counter moves).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_path
from hiermem.memory.bank import MemoryBank
from hiermem.memory.fetch import BlockGrads

FORMAT = "hiermem-lazy-adamw/2"  # 1: m, v and steps in .npy files beside the bank (hiermem 0.1.x)


class LazyAdamW:
    def __init__(self, bank: MemoryBank, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 1e-3):
        self.bank, self.lr, self.betas, self.eps, self.weight_decay = bank, lr, tuple(betas), eps, weight_decay
        bank.enable_state()  # zero moments, unless the bank was loaded with its own (to resume)
        self.steps = {k: np.zeros(len(bank.held(k)), np.int64) for k in bank.parts()}  # per held block
        self._uncounted: dict[str, torch.Tensor] = {}  # masked steps not yet taken off `steps` (on the device)

    # -- the update ----------------------------------------------------------------------------------------
    def step(self, grads: BlockGrads, lr: float | None = None, skip: torch.Tensor | None = None) -> list[int]:
        """Update the blocks in grads; returns the number of distinct blocks updated per tree level (counted
        whether or not a `skip` flag masks the update, which is not read on the host)."""
        lr = self.lr if lr is None else float(lr)
        dev = self.bank.device
        updated = [0] * self.bank.spec.depth
        for key, ids in grads.ids.items():
            if not len(ids):
                continue
            steps = self.steps[key]
            g = grads.grads[key].to(dev, torch.float32)
            block = self.bank.spec.part_shape(key)[1:]
            if g.shape != (len(ids), *block):
                raise ValueError(f"LazyAdamW.step: {key} gradient has shape {tuple(g.shape)} for {len(ids)} blocks")
            ids = ids.cpu()
            rows = self.bank.local_rows(key, ids.numpy())
            steps[rows] += 1
            # the kernel's step counts: float32, one per block
            if skip is None:
                t = torch.from_numpy(steps[rows].astype(np.float32))
            else:
                t = self._masked_counts(key, rows, skip)
            steps_dev = list(t.to(dev, non_blocking=True).unbind(0))
            self.bank.update_state(key, ids, self._kernel(list(g.unbind(0)), steps_dev, lr, skip))
            if key.startswith("level"):
                updated[int(key[5:])] = len(ids)
        return updated

    def _kernel(self, grads: list[torch.Tensor], steps: list[torch.Tensor], lr: float, skip: torch.Tensor | None):
        """The update of blocks w, m, v (lists, one tensor per block, as the bank hands them out) by torch's fused
        AdamW kernel, in place: one pass over weights, moments and gradient, each block with its own step count
        (per-block bias corrections); a set skip flag (found_inf) changes nothing."""
        b1, b2 = self.betas
        found_inf = None if skip is None else skip.float()

        def update(w: list[torch.Tensor], m: list[torch.Tensor], v: list[torch.Tensor]) -> None:
            torch._fused_adamw_(w, grads, m, v, [], steps, lr=lr, beta1=b1, beta2=b2, weight_decay=self.weight_decay,
                                eps=self.eps, amsgrad=False, maximize=False, found_inf=found_inf)
        return update

    def _masked_counts(self, key: str, rows: np.ndarray, skip: torch.Tensor) -> torch.Tensor:
        """This step's counts of blocks `rows` (float32, on the device) net of earlier masked steps; then this
        step, if masked, is added to the uncounted ones. No host sync."""
        dev = skip.device
        if key not in self._uncounted:
            self._uncounted[key] = torch.zeros(len(self.steps[key]), dtype=torch.int64, device=dev)
        uncounted, idx = self._uncounted[key], torch.from_numpy(rows).to(dev, non_blocking=True)
        t = (torch.from_numpy(self.steps[key][rows]).to(dev, non_blocking=True) - uncounted[idx]).float()
        uncounted.index_add_(0, idx, skip.long().expand(len(rows)))
        return t

    def settle(self) -> None:
        """Take the masked steps off the host step counts (a host sync)."""
        for key, uncounted in self._uncounted.items():
            self.steps[key] -= uncounted.cpu().numpy()
        self._uncounted = {}

    # -- state ---------------------------------------------------------------------------------------------
    def gathered(self, gather) -> "LazyAdamW | None":
        """A collective over a sharded bank's ranks (gather: every rank's argument on rank 0, None elsewhere):
        on rank 0 a copy of this optimizer whose step counts cover every block (a shared block's replicas
        count alike; a block no rank holds was never fetched: 0), to save(); None on the other ranks."""
        self.settle()
        everyone = gather({k: (self.bank.held(k), s) for k, s in self.steps.items()})
        if everyone is None:
            return None
        full = copy.copy(self)
        full.steps = {k: np.zeros(self.bank.n_blocks(k), np.int64) for k in self.steps}
        for theirs in everyone:
            for key, (ids, s) in theirs.items():
                full.steps[key][ids] = np.maximum(full.steps[key][ids], s)
        return full

    def save(self, path: str | Path) -> None:
        """Write the step counts (and, for reference, the hyperparameters) to one .npz file, atomically."""
        self.settle()
        if any(len(s) != self.bank.n_blocks(k) for k, s in self.steps.items()):
            raise ValueError("LazyAdamW.save: a bank shard's step counts; save the copy gathered() returns")
        arrays = {f"steps.{k}": s for k, s in self.steps.items()}
        arrays["format"] = np.frombuffer(FORMAT.encode(), np.uint8)
        arrays["hyper"] = np.array([*self.betas, self.eps, self.weight_decay], np.float64)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

    def load(self, path: str | Path) -> None:
        """Read the step counts saved by save(path)."""
        path = Path(path)
        if not path.is_file():
            raise HiermemError(f"{path}: missing (no saved bank optimizer state)")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            fmt = arrays["format"].tobytes().decode()
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as e:
            raise HiermemError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
        if fmt != FORMAT:
            raise HiermemError(f"{path}: not a hiermem LazyAdamW state (format {fmt!r})")
        have = sorted(k.removeprefix("steps.") for k in arrays if k.startswith("steps."))
        if have != sorted(self.steps):
            raise HiermemError(f"{path}: holds step counts for parts {have}, the bank has {sorted(self.steps)}")
        for key, s in self.steps.items():
            src, n = arrays[f"steps.{key}"], self.bank.n_blocks(key)
            if src.shape != (n,):
                raise HiermemError(f"{path}: {key} has {src.size} step counts, the bank has {n} blocks")
            s[:] = src[self.bank.held(key)]
        self._uncounted = {}
