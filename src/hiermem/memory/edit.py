"""Editing a bank's knowledge block by block: reset tree nodes' memories to their untrained initial state.

A reset block gets exactly the values MemoryBank.create gives it (each block has its own seeded generator,
memory/bank.py, and is stored in the bank's dtype as at creation: a bf16 bank gets the same bytes), zero lazy
AdamW moments and a step count of 0, so further training starts it afresh; its down rows are zero again, so the
node's memory has no effect on the model. Every other block, its moments and its count stay as they are, and
the bank's next commit (memory/store.py) writes the reset blocks alone, as a new generation: never a copy.

Which blocks: `path_nodes` names the nodes of one leaf's root-to-leaf path (all of them, one level's or just the
leaf's), skipping levels without memory (rank 0) unless one is asked for by name. Doing this to a trained run
(its checkpoint's step counts, the run's edit log) is `hiermem bank reset` (hiermem/cli.py).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_write_text
from hiermem.memory.bank import MemoryBank, _init_block
from hiermem.memory.optim import LazyAdamW
from hiermem.memory.precision import to_storage
from hiermem.memory.spec import BankSpec

EDIT_LOG = "edits.jsonl"  # in a run directory: one line per edit


def path_nodes(spec: BankSpec, leaf: int, level: int | None = None, whole_path: bool = False) -> list[tuple[str, int]]:
    """(part, node id) of the blocks on leaf's root-to-leaf path: every level's with memory (whole_path), the
    node at `level`, or the leaf's own block (the default)."""
    depth, b = spec.depth, spec.branching
    n_leaves = spec.n_nodes(depth - 1)
    if not 0 <= leaf < n_leaves:
        raise HiermemError(f"leaf {leaf}: not a leaf of this bank (its tree has leaves 0..{n_leaves - 1})")
    if level is not None and whole_path:
        raise HiermemError("give a level or the whole path, not both")
    if level is not None and not 0 <= level < depth:
        raise HiermemError(f"level {level}: outside the tree's levels 0..{depth - 1}")
    levels = range(depth) if whole_path else [depth - 1 if level is None else level]
    nodes = []
    for lv in levels:
        if spec.ranks[lv] == 0:
            if not whole_path:
                raise HiermemError(f"level {lv}: holds no memory (memory.ranks[{lv}] = 0)")
            continue
        nodes.append((f"level{lv}", leaf // b ** (depth - 1 - lv)))
    return nodes


def initial_blocks(bank: MemoryBank, seed: int, key: str, ids: np.ndarray) -> torch.Tensor:
    """float32 blocks ids of part key as MemoryBank.create(spec, seed, dtype=bank's) made them (exact in the
    bank's dtype: writing them back stores the creation's bytes)."""
    init = torch.stack([_init_block(bank.spec, seed, key, int(i)) for i in ids])
    return to_storage(init, bank.dtype, key, ids, np.zeros(len(ids), np.int64)).float()


def reset_blocks(bank: MemoryBank, nodes: list[tuple[str, int]], seed: int, optimizer: LazyAdamW | None = None) -> None:
    """Reset the blocks `nodes` of a writable bank to their initial values (the run's train.seed), their moments
    (if the bank holds them) to zeros and, with the bank's optimizer, their step counts to 0. Uncommitted."""
    by_part: dict[str, list[int]] = {}
    for key, i in nodes:
        if key not in bank.parts() or not 0 <= i < bank.n_blocks(key):
            raise HiermemError(f"{bank.dir}: has no block {i} in part {key}")
        by_part.setdefault(key, [])
        if i not in by_part[key]:
            by_part[key].append(i)
    for key, ids in by_part.items():
        ids_np = np.asarray(sorted(ids), np.int64)
        ids_t = torch.from_numpy(ids_np)
        w = initial_blocks(bank, seed, key, ids_np)
        if bank.has_state:
            bank.write_state(key, ids_t, w, torch.zeros_like(w), torch.zeros_like(w))
        else:
            bank.write_blocks(key, ids_t, w)
        if optimizer is not None:
            optimizer.steps[key][bank.local_rows(key, ids_np)] = 0


def block_summary(bank: MemoryBank, key: str, i: int, seed: int) -> dict:
    """A block's weight norm and its distance from its initial values (0: untrained or reset)."""
    w = bank.read_blocks(key, torch.tensor([i]))[0]
    init = initial_blocks(bank, seed, key, np.array([i]))[0]
    return {"part": key, "node": i, "norm": float(w.norm()), "from_init": float((w - init).norm())}


def append_edit(run_dir: Path, entry: dict) -> dict:
    """Add one line (with a UTC time stamp) to the run's edit log, rewriting the small file atomically."""
    path = Path(run_dir) / EDIT_LOG
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **entry}
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    atomic_write_text(path, old + json.dumps(entry) + "\n")
    return entry


__all__ = ["EDIT_LOG", "append_edit", "block_summary", "initial_blocks", "path_nodes", "reset_blocks"]
