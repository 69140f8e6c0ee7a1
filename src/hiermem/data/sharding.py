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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hiermem.errors import HiermemError


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


def plan_shards(paths: np.ndarray, tokens: np.ndarray, world: int) -> ShardPlan:
    """Assign subtrees to `world` ranks from each training sequence's path [N, depth] and token count [N]."""
    paths = np.asarray(paths, np.int64)
    tokens = np.asarray(tokens, np.float64)
    if world < 1:
        raise HiermemError(f"world size must be >= 1, got {world}")
    if paths.ndim != 2 or paths.shape[1] == 0 or len(paths) == 0:
        raise HiermemError("data sharding needs training sequences with tree paths (a memory run packed by leaf)")
    depth = paths.shape[1]
    level = next((l for l in range(depth) if len(np.unique(paths[:, l])) >= world), depth - 1)
    units, inverse = np.unique(paths[:, level], return_inverse=True)
    unit_tokens = np.bincount(inverse, weights=tokens, minlength=len(units))
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


def rank_pools(plan: ShardPlan, unit_of_seq: np.ndarray) -> list[np.ndarray]:
    """The sequence indices each rank trains on: its units' sequences; a unit with several ranks deals its
    sequences out to them in turn."""
    pools: list[list[np.ndarray]] = [[] for _ in range(plan.world)]
    unit_of_seq = np.asarray(unit_of_seq, np.int64)
    for u, ranks in plan.ranks_of.items():
        seqs = np.flatnonzero(unit_of_seq == u)
        for k, r in enumerate(ranks):
            pools[r].append(seqs[k::len(ranks)])
    return [np.concatenate(p) if p else np.zeros(0, np.int64) for p in pools]


class ShardedSampler:
    """Per-rank batches of `per_rank` sequences from each rank's own pool, each pool reshuffled every pass
    (seeded by seed, rank and pass). batch(step, rank) is rank's batch; union(step) is all ranks' batches in
    rank order, the global batch of that step."""

    def __init__(self, pools: list[np.ndarray], per_rank: int, seed: int = 0):
        empty = [r for r, p in enumerate(pools) if not len(p)]
        if empty:
            raise HiermemError(f"data sharding: rank {empty[0]} has no training sequences")
        self.pools, self.per_rank, self.seed = pools, per_rank, seed
        self._perm: dict[tuple[int, int], np.ndarray] = {}

    @property
    def world(self) -> int:
        return len(self.pools)

    def _permutation(self, rank: int, epoch: int) -> np.ndarray:
        key = (rank, epoch)
        if key not in self._perm:
            if len(self._perm) > 4 * self.world:  # keep the current passes only
                self._perm.clear()
            pool = self.pools[rank]
            self._perm[key] = pool[np.random.default_rng([self.seed, rank, epoch]).permutation(len(pool))]
        return self._perm[key]

    def batch(self, step: int, rank: int) -> np.ndarray:
        n = len(self.pools[rank])
        pos = np.arange(step * self.per_rank, (step + 1) * self.per_rank)
        epochs, offsets = pos // n, pos % n
        return np.array([self._permutation(rank, int(e))[o] for e, o in zip(epochs, offsets)], np.int64)

    def union(self, step: int) -> np.ndarray:
        return np.concatenate([self.batch(step, r) for r in range(self.world)])


__all__ = ["ShardPlan", "ShardedSampler", "plan_shards", "rank_pools"]
