"""Fetching a batch's memory from the bank, and the per-block gradients that the lazy optimizer applies.

fetch() reads each distinct block of the batch once per part (level, or the generic block) and hands the model a
FetchedMemory (model/fetched.py): the distinct blocks as leaf tensors plus each row's index. After backward the
leaves' .grad already are the per-block gradients, summed over the rows that share a block (block_grads).
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


@dataclass
class BlockGrads:
    """One gradient per distinct fetched block: ids[key] [U] (cpu int64) and grads[key] [U, *block shape]."""

    ids: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]

    def norm_sq(self) -> torch.Tensor:
        sq = [g.float().pow(2).sum() for g in self.grads.values()]
        return torch.stack(sq).sum() if sq else torch.zeros(())

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


def fetch(bank: MemoryBank, paths: np.ndarray | torch.Tensor, use_generic: torch.Tensor | None = None,
          device: str | torch.device = "cpu", requires_grad: bool = False) -> Fetch:
    """Each row's root-to-leaf blocks (or the generic block where use_generic is True), as one FetchedMemory:
    per level the distinct blocks [U_l, n_mem_layers, 3, r_l, d] and each row's index into them."""
    spec = bank.spec
    paths = check_paths(spec, paths)
    B = paths.shape[0]
    gen = torch.zeros(B, dtype=torch.bool) if use_generic is None else torch.as_tensor(use_generic).cpu()
    if gen.shape != (B,):
        raise HiermemError(f"use_generic: expected shape [{B}], got {tuple(gen.shape)}")
    gen = gen.bool()
    if gen.any() and not spec.generic:
        raise HiermemError("use_generic: this bank has no generic block (memory.generic is false)")
    path_rows, generic_rows = (~gen).nonzero().squeeze(1), gen.nonzero().squeeze(1)
    out = torch.device(device)
    parts, block_ids, counts = [], {}, {}
    for key, level, off, _ in spec.level_parts():
        uniq, inv, n = torch.unique(paths[path_rows, level], return_inverse=True, return_counts=True)
        index = torch.full((B,), -1, dtype=torch.int64)
        index[path_rows] = inv
        parts.append(MemoryPart(bank.read_blocks(key, uniq).to(out), index, off, key))  # index stays on cpu
        block_ids[key], counts[key] = uniq, n
    if len(generic_rows):
        index = torch.full((B,), -1, dtype=torch.int64)
        index[generic_rows] = 0
        zero = torch.zeros(1, dtype=torch.long)
        parts.append(MemoryPart(bank.read_blocks(GENERIC, zero).to(out), index, 0, GENERIC))
        block_ids[GENERIC], counts[GENERIC] = zero, torch.tensor([len(generic_rows)])
    if requires_grad:
        for p in parts:
            p.weights.requires_grad_(True)
    return Fetch(FetchedMemory(parts, spec.fetched_rank, spec.first_layer), block_ids, counts)


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


__all__ = ["BlockGrads", "Fetch", "FetchCounts", "block_grads", "check_paths", "fetch"]
