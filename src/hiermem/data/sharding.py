"""Which process trains on which subtrees of the tree, and the per-process batches that follow from it.

A deep memory block is fetched only by the sequences of its own subtree (docs/method.md §6.4). So if every
process (rank) trains only on the sequences of the subtrees it owns, the blocks of those subtrees get gradients
on that rank alone: they never cross the network, and only the anchor's gradients (and the few blocks several
ranks share) are reduced.

plan_shards() picks the tree level whose subtrees are the units of ownership: level 1 (code level 0) when it
has at least as many non-empty nodes as there are ranks, else the first deeper level that has. The units are
then assigned to ranks balanced by their training tokens (longest first, each to the least loaded rank); the
report gives the imbalance (largest rank load / mean load). With more ranks than even the leaves, every leaf
gets at least one rank and the spare ranks go to the leaves with the most tokens per rank: such a leaf's
sequences are split between its ranks and its blocks become shared blocks, reduced among those ranks.

ShardedSampler gives every rank the same number of sequences per step from its own pool, as a pure function of
(seed, plan, step): resuming needs only the step, and a single process can train on the union of all ranks'
batches (the reference a multi-process run is tested against, and a way to reproduce one on one device).

Nothing here holds a value per training sequence: a packed set lists each leaf's rows together, so the plan is
made from runs of consecutive rows with one path (PathRuns, read from the packed files in chunks; one run per
leaf), a rank's pool is a list of strided row ranges (RowPool), and a pool's order each pass is
npyfile.permutation (memory-mapped from MMAP_ORDER_ROWS rows on). The batches are the ones a per-row plan
made before this gave (tests/test_sharding.py keeps that plan as the reference), so old checkpoints resume
on the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from hiermem.data.npyfile import permutation
from hiermem.errors import HiermemError

SCAN_ROWS = 1 << 16  # rows read at a time by PathRuns.scan


@dataclass
class PathRuns:
    """The training sequences as runs of consecutive rows with one tree path: rows starts[i] .. starts[i] +
    lengths[i] - 1 have path paths[i] and tokens[i] tokens in all."""

    paths: np.ndarray  # [R, depth] int64
    starts: np.ndarray  # [R] int64, ascending
    lengths: np.ndarray  # [R] int64
    tokens: np.ndarray  # [R] float64

    @classmethod
    def scan(cls, paths, row_tokens: Callable[[int, int], np.ndarray], chunk: int = SCAN_ROWS) -> "PathRuns":
        """From per-row paths [N, depth] (memory-mapped is fine) and row_tokens(a, b) (the tokens of rows a..b-1),
        `chunk` rows at a time."""
        n = len(paths)
        depth = paths.shape[1] if np.ndim(paths) == 2 else 0
        if n == 0 or depth == 0:
            raise HiermemError("data sharding needs training sequences with tree paths (a memory run packed by leaf)")
        run_paths, starts, lengths, tokens = [], [], [], []
        for a in range(0, n, chunk):
            p = np.asarray(paths[a : a + chunk], np.int64)
            t = np.asarray(row_tokens(a, a + len(p)), np.float64)
            new = np.ones(len(p), bool)
            new[1:] = (p[1:] != p[:-1]).any(axis=1)
            first = np.flatnonzero(new)
            sums = np.add.reduceat(t, first)
            lens = np.diff(np.append(first, len(p)))
            if run_paths and (run_paths[-1][-1] == p[0]).all():  # the previous chunk's last run goes on
                lengths[-1][-1] += lens[0]
                tokens[-1][-1] += sums[0]
                first, sums, lens = first[1:], sums[1:], lens[1:]
            run_paths.append(p[first])
            starts.append(a + first)
            lengths.append(lens.astype(np.int64))
            tokens.append(sums)
        return cls(np.concatenate(run_paths), np.concatenate(starts).astype(np.int64), np.concatenate(lengths),
                   np.concatenate(tokens))

    @classmethod
    def of(cls, paths: np.ndarray, tokens: np.ndarray) -> "PathRuns":
        """From in-memory per-row paths and token counts."""
        tokens = np.asarray(tokens)
        return cls.scan(np.asarray(paths), lambda a, b: tokens[a:b])


@dataclass
class ShardPlan:
    """Units of ownership (nodes of tree level `level`, code numbering) and the ranks that train each."""

    world: int
    level: int  # 0-based tree level of the unit roots (0 = the paper's level-1 subtrees)
    units: np.ndarray  # node ids at `level` that have training sequences, ascending
    ranks_of: dict[int, tuple[int, ...]]  # unit -> its ranks (one, unless there are more ranks than leaves)
    load: np.ndarray  # [world] training tokens per rank
    ancestors: np.ndarray  # [U, depth] distinct root-to-leaf paths of the training data

    @property
    def imbalance(self) -> float:
        """Largest rank's tokens over the mean (1.0 = perfectly balanced)."""
        return float(self.load.max() / max(1e-9, self.load.mean()))

    def sharers(self, level: int) -> dict[int, tuple[int, ...]]:
        """For each node of tree level `level` that training fetches: the ranks that fetch it (sorted)."""
        out: dict[int, set[int]] = {}
        for row in self.ancestors:
            out.setdefault(int(row[level]), set()).update(self.ranks_of[int(row[self.level])])
        return {n: tuple(sorted(r)) for n, r in sorted(out.items())}

    def report(self) -> dict:
        return {"world_size": self.world, "unit_level": self.level + 1, "units": len(self.units),
                "shared_units": sum(len(r) > 1 for r in self.ranks_of.values()),
                "tokens_per_rank": self.load.astype(int).tolist(), "imbalance": round(self.imbalance, 4)}


def plan_shards(runs: PathRuns, world: int) -> ShardPlan:
    """Assign subtrees to `world` ranks from the training sequences' paths and token counts."""
    if world < 1:
        raise HiermemError(f"world size must be >= 1, got {world}")
    paths = runs.paths
    depth = paths.shape[1]
    level = next((l for l in range(depth) if len(np.unique(paths[:, l])) >= world), depth - 1)
    units, inverse = np.unique(paths[:, level], return_inverse=True)
    unit_tokens = np.bincount(inverse, weights=runs.tokens, minlength=len(units))
    ranks_of: dict[int, list[int]] = {}
    load = np.zeros(world)
    if len(units) >= world:  # longest processing time first: each unit to the least loaded rank
        for j in sorted(range(len(units)), key=lambda j: (-unit_tokens[j], units[j])):
            r = int(np.argmin(load))
            ranks_of[int(units[j])] = [r]
            load[r] += unit_tokens[j]
    else:  # more ranks than leaves: every leaf one rank, spare ranks to the leaves with most tokens per rank
        counts = np.ones(len(units), np.int64)
        for _ in range(world - len(units)):
            counts[int(np.argmax(unit_tokens / counts))] += 1
        r = 0
        for j, u in enumerate(units.tolist()):
            ranks_of[u] = list(range(r, r + counts[j]))
            load[r:r + counts[j]] = unit_tokens[j] / counts[j]
            r += counts[j]
    return ShardPlan(world, level, units, {u: tuple(r) for u, r in ranks_of.items()}, load,
                     np.unique(paths, axis=0))


class RowPool:
    """A rank's training rows as strided ranges: range j is rows starts[j] + steps[j] * i for i < counts[j],
    and the pool is those ranges one after the other. Behaves as the 1-d array of its rows for len() and
    take()."""

    def __init__(self, starts, steps, counts):
        keep = np.asarray(counts) > 0
        self.starts = np.asarray(starts, np.int64)[keep]
        self.steps = np.asarray(steps, np.int64)[keep]
        self.counts = np.asarray(counts, np.int64)[keep]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, positions) -> np.ndarray:
        pos = np.asarray(positions, np.int64)
        j = np.searchsorted(self.offsets, pos, side="right") - 1
        return self.starts[j] + (pos - self.offsets[j]) * self.steps[j]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:  # for tests and small pools
        return self.take(np.arange(len(self))).astype(dtype or np.int64)


def rank_pools(plan: ShardPlan, runs: PathRuns) -> list[RowPool]:
    """The rows each rank trains on: its units' rows (in ascending row order within a unit); a unit with
    several ranks deals its rows out to them in turn (the unit's i-th row to its rank i mod m)."""
    unit_of_run = runs.paths[:, plan.level]
    pools: list[tuple[list, list, list]] = [([], [], []) for _ in range(plan.world)]
    for u, ranks in plan.ranks_of.items():
        sel = np.flatnonzero(unit_of_run == u)
        starts, lengths = runs.starts[sel], runs.lengths[sel]
        before = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # the unit's rows ahead of each run
        m = len(ranks)
        for k, r in enumerate(ranks):
            first = (k - before) % m  # the first row of each run that is rank k's
            pools[r][0].append(starts + first)
            pools[r][1].append(np.full(len(sel), m))
            pools[r][2].append(np.maximum(0, -(-(lengths - first) // m)))
    return [RowPool(*(np.concatenate(c) if c else np.zeros(0, np.int64) for c in p)) for p in pools]


class ShardedSampler:
    """Per-rank batches of `per_rank` sequences from each rank's own pool, each pool reshuffled every pass
    (seeded by seed, rank and pass). batch(step, rank) is rank's batch; union(step) is all ranks' batches in
    rank order, the global batch of that step. A pool is a RowPool or a 1-d array of rows; with a work_dir a
    large pool's order is a memory-mapped file there (npyfile.permutation)."""

    def __init__(self, pools, per_rank: int, seed: int = 0, work_dir: str | Path | None = None):
        empty = [r for r, p in enumerate(pools) if not len(p)]
        if empty:
            raise HiermemError(f"data sharding: rank {empty[0]} has no training sequences")
        self.pools, self.per_rank, self.seed, self.work_dir = pools, per_rank, seed, work_dir
        self._perm: dict[tuple[int, int], np.ndarray] = {}

    @property
    def world(self) -> int:
        return len(self.pools)

    def _permutation(self, rank: int, epoch: int) -> np.ndarray:
        """Positions in rank's pool in the order of pass `epoch`."""
        key = (rank, epoch)
        if key not in self._perm:
            if len(self._perm) > 4 * self.world:  # keep the current passes only
                self._perm.clear()
            rng = np.random.default_rng([self.seed, rank, epoch])
            self._perm[key] = permutation(len(self.pools[rank]), rng, self.work_dir)
        return self._perm[key]

    def batch(self, step: int, rank: int) -> np.ndarray:
        n = len(self.pools[rank])
        pos = np.arange(step * self.per_rank, (step + 1) * self.per_rank)
        epochs, offsets = pos // n, pos % n
        order = np.array([self._permutation(rank, int(e))[o] for e, o in zip(epochs, offsets)], np.int64)
        return np.asarray(self.pools[rank].take(order), np.int64)

    def union(self, step: int) -> np.ndarray:
        return np.concatenate([self.batch(step, r) for r in range(self.world)])


__all__ = ["PathRuns", "RowPool", "ShardPlan", "ShardedSampler", "plan_shards", "rank_pools"]
