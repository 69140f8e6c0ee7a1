"""Fetching a batch's memory from the bank, and the per-block gradients that the lazy optimizer applies.

fetch() reads each distinct block of the batch once per part (level, or the generic block) and hands the model a
FetchedMemory (model/fetched.py): the distinct blocks as leaf tensors plus each row's index. After backward the
leaves' .grad already are the per-block gradients, summed over the rows that share a block (block_grads).
needed_blocks() names the blocks a fetch will read, so that a bank on disk can read them ahead (prefetch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hiermem.errors import HiermemError
from hiermem.memory.bank import MemoryBank
from hiermem.memory.spec import GENERIC, BankSpec
from hiermem.model.fetched import FetchedMemory, MemoryPart


@dataclass
class Fetch:
    """One batch's fetched memory and which bank blocks its parts hold."""

    memory: FetchedMemory
    block_ids: dict[str, torch.Tensor]  # per part: the bank's block ids of memory's distinct blocks (cpu int64)
    rows_per_block: dict[str, torch.Tensor]  # per part: how many rows of the batch use each of those blocks
    nbytes: int  # bytes of the blocks read, as the bank stores them (the bytes fetched)


@dataclass
class BlockGrads:
    """One gradient per distinct fetched block: ids[key] [U] (cpu int64) and grads[key] [U, *block shape]."""

    ids: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]

    def norm_sq(self) -> torch.Tensor:
        """The squared L2 norm of every block's gradient together (foreach: no squared copy of the gradients)."""
        grads = [g.float() for g in self.grads.values()]
        return torch.stack(torch._foreach_norm(grads)).pow(2).sum() if grads else torch.zeros(())

    def scale_(self, factor: float | torch.Tensor) -> "BlockGrads":
        for g in self.grads.values():
            g.mul_(factor)
        return self


def check_paths(spec: BankSpec, paths: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Paths [B, depth] as cpu int64, each node id inside its level; errors name the level."""
    p = torch.as_tensor(paths)
    if p.dim() != 2 or p.shape[1] != spec.depth:
        raise HiermemError(f"paths: expected shape [B, {spec.depth}] (one node id per tree level), "
                           f"got {tuple(p.shape)}")
    if p.is_floating_point() or p.is_complex() or p.dtype == torch.bool:
        raise HiermemError(f"paths: expected integer node ids, got {p.dtype}")
    p = p.to("cpu", torch.int64)
    for _, level, _, _ in spec.level_parts():
        col, n = p[:, level], spec.n_nodes(level)
        bad = col[(col < 0) | (col >= n)]
        if len(bad):
            raise HiermemError(f"paths: level {level} node ids must be in [0, {n}), got {int(bad[0])}")
    return p


def _use_generic(spec: BankSpec, B: int, use_generic: torch.Tensor | None) -> torch.Tensor:
    gen = torch.zeros(B, dtype=torch.bool) if use_generic is None else torch.as_tensor(use_generic).cpu()
    if gen.shape != (B,):
        raise HiermemError(f"use_generic: expected shape [{B}], got {tuple(gen.shape)}")
    gen = gen.bool()
    if gen.any() and not spec.generic:
        raise HiermemError("use_generic: this bank has no generic block (memory.generic is false)")
    return gen


def needed_blocks(spec: BankSpec, paths: np.ndarray | torch.Tensor,
                  use_generic: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The distinct blocks per part (ascending cpu int64 ids) that fetch() reads for these rows."""
    paths = check_paths(spec, paths)
    gen = _use_generic(spec, paths.shape[0], use_generic)
    out = {key: torch.unique(paths[~gen, level]) for key, level, _, _ in spec.level_parts()}
    if gen.any():
        out[GENERIC] = torch.zeros(1, dtype=torch.long)
    return out


def fetch(bank: MemoryBank, paths: np.ndarray | torch.Tensor, use_generic: torch.Tensor | None = None,
          device: str | torch.device = "cpu", requires_grad: bool = False) -> Fetch:
    """Each row's root-to-leaf blocks (or the generic block where use_generic is True), as one FetchedMemory:
    per level the distinct blocks [U_l, n_mem_layers, S, r_l, d] and each row's index into them.

    requires_grad (training): the blocks are fresh leaf tensors and the bank holds them until the step writes
    them back; without it a bank on disk may hand out a cached block itself (no copy), for reading only."""
    spec = bank.spec
    paths = check_paths(spec, paths)
    B = paths.shape[0]
    gen = _use_generic(spec, B, use_generic)
    path_rows, generic_rows = (~gen).nonzero().squeeze(1), gen.nonzero().squeeze(1)
    distinct = {}
    for key, level, _, _ in spec.level_parts():
        distinct[key] = torch.unique(paths[path_rows, level], return_inverse=True, return_counts=True)
    if len(generic_rows):
        distinct[GENERIC] = (torch.zeros(1, dtype=torch.long), None, torch.tensor([len(generic_rows)]))
    if requires_grad:
        bank.hold({key: uniq for key, (uniq, _, _) in distinct.items()})
    out = torch.device(device)
    offsets = {key: off for key, _, off, _ in spec.level_parts()}
    parts, block_ids, counts, nbytes = [], {}, {}, 0
    for key, (uniq, inv, n) in distinct.items():
        index = torch.full((B,), -1, dtype=torch.int64)  # stays on cpu
        if key == GENERIC:
            index[generic_rows] = 0
        else:
            index[path_rows] = inv
        weights = bank.read_blocks(key, uniq, copy=requires_grad).to(out, non_blocking=True)  # host -> GPU: no wait
        parts.append(MemoryPart(weights, index, offsets.get(key, 0), key))
        block_ids[key], counts[key] = uniq, n
        nbytes += len(uniq) * bank.block_bytes(key)
    if requires_grad:
        for p in parts:
            p.weights.requires_grad_(True)
    memory = FetchedMemory(parts, spec.fetched_rank, spec.first_layer, spec.memory_kind)
    return Fetch(memory, block_ids, counts, nbytes)


def block_grads(f: Fetch, device: torch.device | str) -> BlockGrads:
    """The per-block gradients of a fetch after backward (float32, on the bank's device)."""
    out = BlockGrads({}, {})
    for p in f.memory.parts:
        if not len(p.weights):
            continue
        if not p.weights.requires_grad:
            raise RuntimeError("block_grads: the fetch has no gradients (fetch with requires_grad=True and "
                               "call backward first)")
        g = p.weights.grad
        if g is None:  # fetched but unused by the forward (e.g. the memory's layers got no gradient)
            g = torch.zeros_like(p.weights)
        out.ids[p.name] = f.block_ids[p.name]
        out.grads[p.name] = g.float().to(device)
    return out


class FetchCounts:
    """How many sequences fetched each node, per level, and the generic block (training statistics)."""

    def __init__(self, spec: BankSpec):
        self.spec = spec
        self.per_level = [np.zeros(spec.n_nodes(l), np.int64) for l in range(spec.depth)]
        self.generic = 0

    def add(self, f: Fetch) -> None:
        for key, level, _, _ in self.spec.level_parts():
            self.per_level[level][f.block_ids[key].numpy()] += f.rows_per_block[key].numpy()
        if GENERIC in f.block_ids:
            self.generic += int(f.rows_per_block[GENERIC].sum())

    def snapshot(self) -> list[np.ndarray]:
        return [c.copy() for c in self.per_level]


__all__ = ["BlockGrads", "Fetch", "FetchCounts", "block_grads", "check_paths", "fetch", "needed_blocks"]
