import numpy as np
import pytest
from traced import traced_peak

from hiermem.data.sharding import PathRuns, RowPool, ShardedSampler, plan_shards, rank_pools
from hiermem.errors import HiermemError


def plan_rows(paths, tokens, world):
    return plan_shards(PathRuns.of(paths, tokens), world)


def pools_rows(plan, paths):
    return [np.asarray(p) for p in rank_pools(plan, PathRuns.of(paths, np.ones(len(paths))))]


# -- the per-row plan this module replaced: the reference the run-based one must give the same batches as ---
def reference_plan(paths, tokens, world):
    """level, ranks_of (in its order), load, with every row its own run (the plan as it was made row by row)."""
    n = len(paths)
    plan = plan_shards(PathRuns(np.asarray(paths, np.int64), np.arange(n), np.ones(n, np.int64),
                                np.asarray(tokens, np.float64)), world)
    return plan.level, plan.ranks_of, plan.load


def reference_pools(level, ranks_of, paths, world):
    pools = [[] for _ in range(world)]
    for u, ranks in ranks_of.items():
        seqs = np.flatnonzero(paths[:, level] == u)
        for k, r in enumerate(ranks):
            pools[r].append(seqs[k::len(ranks)])
    return [np.concatenate(p) if p else np.zeros(0, np.int64) for p in pools]


def reference_batch(pool, per_rank, seed, rank, step):
    n = len(pool)
    pos = np.arange(step * per_rank, (step + 1) * per_rank)
    perm = {e: pool[np.random.default_rng([seed, rank, e]).permutation(n)] for e in set((pos // n).tolist())}
    return np.array([perm[int(e)][o] for e, o in zip(pos // n, pos % n)], np.int64)


def tree_paths(branching=4, per_leaf=(3,) * 16):
    """Sequences of a 2-level tree: leaf j (node j of level 1) under level-0 node j // branching."""
    rows = [(leaf // branching, leaf) for leaf, n in enumerate(per_leaf) for _ in range(n)]
    return np.array(rows, np.int64)


def test_level1_subtrees_are_balanced_by_tokens():
    paths = tree_paths()
    tokens = np.where(paths[:, 0] == 0, 100, 10)  # subtree 0 holds most of the tokens
    plan = plan_rows(paths, tokens, 2)
    assert plan.level == 0 and plan.ranks_of == {0: (0,), 1: (1,), 2: (1,), 3: (1,)}
    assert plan.load.tolist() == [1200, 360] and plan.imbalance == pytest.approx(1200 / 780)
    # deep blocks have one sharer each: nothing of theirs crosses the network
    assert all(len(r) == 1 for r in plan.sharers(1).values())


def test_more_ranks_than_level1_nodes_goes_one_level_deeper():
    paths = tree_paths()
    plan = plan_rows(paths, np.ones(len(paths)), 8)
    assert plan.level == 1 and plan.imbalance == 1.0
    assert all(len(r) > 1 for r in plan.sharers(0).values())  # a level-0 block: shared by its leaves' ranks
    assert all(len(r) == 1 for r in plan.sharers(1).values()) and plan.report()["unit_level"] == 2


def test_more_ranks_than_leaves_shares_the_biggest_leaves():
    paths = tree_paths(branching=1, per_leaf=(6, 2))  # a 1-way tree: two leaves, levels 0 and 1 alike
    plan = plan_rows(paths, np.ones(len(paths)), 3)
    assert plan.ranks_of == {0: (0, 1), 1: (2,)}  # the larger leaf gets the spare rank
    assert plan.sharers(1) == {0: (0, 1), 1: (2,)} and plan.report()["shared_units"] == 1
    pools = pools_rows(plan, paths)
    assert sorted(np.concatenate(pools).tolist()) == list(range(8))  # a partition of the sequences
    assert [len(p) for p in pools] == [3, 3, 2]


def test_pools_keep_each_rank_inside_its_subtrees():
    paths = tree_paths(per_leaf=tuple(range(1, 17)))
    plan = plan_rows(paths, np.ones(len(paths)), 3)
    pools = pools_rows(plan, paths)
    for r, pool in enumerate(pools):
        assert all(plan.ranks_of[int(u)] == (r,) for u in np.unique(paths[pool, plan.level]))
    assert sorted(np.concatenate(pools).tolist()) == list(range(len(paths)))


def test_sampler_gives_equal_batches_and_their_union():
    pools = [np.arange(0, 5), np.arange(5, 20)]
    s = ShardedSampler(pools, per_rank=4, seed=1)
    for step in range(6):
        a, b = s.batch(step, 0), s.batch(step, 1)
        assert len(a) == len(b) == 4 and set(a) <= set(pools[0]) and set(b) <= set(pools[1])
        assert s.union(step).tolist() == [*a.tolist(), *b.tolist()]
    first_pass = np.concatenate([s.batch(k, 1) for k in range(4)])[:15]  # each pass is a permutation
    assert sorted(first_pass.tolist()) == list(range(5, 20))
    again = ShardedSampler(pools, per_rank=4, seed=1)  # a function of the step: resume needs nothing else
    assert again.batch(5, 0).tolist() == s.batch(5, 0).tolist()


def test_bad_inputs():
    with pytest.raises(HiermemError, match="tree paths"):
        PathRuns.of(np.zeros((0, 2)), np.zeros(0))
    with pytest.raises(HiermemError, match="tree paths"):
        PathRuns.of(np.zeros((5, 0)), np.ones(5))  # an anchor-only packing: rows without paths
    with pytest.raises(HiermemError, match="world size must be >= 1"):
        plan_rows(tree_paths(), np.ones(48), 0)
    with pytest.raises(HiermemError, match="rank 1 has no training sequences"):
        ShardedSampler([np.arange(3), np.zeros(0, np.int64)], per_rank=1)


def test_a_ranks_batches_fetch_only_the_blocks_its_shard_holds():
    """The sampler keeps each rank inside its bank shard (memory/shard.py held_blocks): every block on the
    paths of its batches is one it holds, so a shard never misses a block (fetching one it lacks is an error)."""
    from hiermem.memory.shard import held_blocks

    paths = tree_paths(per_leaf=tuple(range(1, 17)))
    for world in (2, 3, 8):
        plan = plan_rows(paths, np.ones(len(paths)), world)
        sharers = {f"level{l}": plan.sharers(l) for l in range(paths.shape[1])}
        sampler = ShardedSampler(pools_rows(plan, paths), per_rank=5, seed=0)
        for r in range(world):
            held = held_blocks(sharers, r)
            fetched = np.concatenate([paths[sampler.batch(step, r)] for step in range(8)])
            for l in range(paths.shape[1]):
                assert set(fetched[:, l].tolist()) <= set(held[f"level{l}"].tolist()), (world, r, l)
            assert len(held["level1"]) < 16  # a shard, not the whole bank


@pytest.mark.parametrize("layout", ["by_leaf", "shuffled"])
@pytest.mark.parametrize("world", [1, 2, 3, 5, 8, 13, 40])
def test_runs_give_the_per_row_plans_pools_and_batches(layout, world):
    """Parity with the per-row reference: the same plan, the same pools in the same order, the same batches,
    for data packed by leaf (a run per leaf, read in chunks that cut runs) and for rows in no order at all."""
    rng = np.random.default_rng(world)
    leaves = np.sort(rng.integers(0, 27, 600)) if layout == "by_leaf" else rng.integers(0, 27, 600)
    paths = np.stack([leaves // 9, leaves // 3, leaves], axis=1).astype(np.int64)
    tokens = rng.integers(1, 2049, len(paths))
    runs = PathRuns.scan(paths, lambda a, b: tokens[a:b], chunk=37)
    assert (runs.lengths.sum(), runs.tokens.sum()) == (len(paths), tokens.sum())
    if layout == "by_leaf":
        assert len(runs.paths) == len(np.unique(leaves))
    plan = plan_shards(runs, world)
    level, ranks_of, load = reference_plan(paths, tokens, world)
    assert plan.level == level and list(plan.ranks_of.items()) == list(ranks_of.items())
    assert np.allclose(plan.load, load) and (plan.ancestors == np.unique(paths, axis=0)).all()
    pools = rank_pools(plan, runs)
    ref = reference_pools(level, ranks_of, paths, world)
    assert all(np.array_equal(np.asarray(p), q) for p, q in zip(pools, ref))
    sampler = ShardedSampler(pools, per_rank=7, seed=3)
    for step in (0, 1, 9, 60):  # 60 x 7 rows: several passes over the smaller pools
        for r in range(world):
            assert sampler.batch(step, r).tolist() == reference_batch(ref[r], 7, 3, r, step).tolist()


def test_plan_pools_and_batches_hold_nothing_per_row(tmp_path, monkeypatch):
    """From memory-mapped paths packed by leaf, the plan, the pools and a batch of every rank take the same
    traced memory for 400k and 1.6M rows (memory-mapped pool orders); the per-row reference grows by 8 bytes a
    row and more."""
    monkeypatch.setattr("hiermem.data.npyfile.MMAP_ORDER_ROWS", 0)

    def files(n):
        leaves = np.repeat(np.arange(64), n // 64)
        paths = np.lib.format.open_memmap(tmp_path / f"paths{n}.npy", "w+", np.int64, (len(leaves), 2))
        paths[:, 0], paths[:, 1] = leaves // 8, leaves
        return paths

    def run(paths, work):
        runs = PathRuns.scan(paths, lambda a, b: np.full(b - a, 2048))
        plan = plan_shards(runs, 3)
        sampler = ShardedSampler(rank_pools(plan, runs), per_rank=16, seed=0, work_dir=work)
        return sampler.union(0)

    arrays = {n: files(n) for n in (6_400, 409_600, 1_638_400)}
    peaks = {n: traced_peak(run, p, tmp_path) for n, p in arrays.items()}  # the first builds numpy's caches
    assert peaks[1_638_400] - peaks[409_600] < 100_000, peaks
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".order")] == []

    def reference(paths):
        p = np.asarray(paths)
        level, ranks_of, _ = reference_plan(p, np.full(len(p), 2048), 3)
        return reference_pools(level, ranks_of, p, 3)

    ref = {n: traced_peak(reference, arrays[n]) for n in (409_600, 1_638_400)}
    assert ref[1_638_400] - ref[409_600] > 8 * 1_200_000, ref  # what this test sees of a per-row plan


def test_row_pool_is_its_rows():
    pool = RowPool([10, 3, 50], [1, 4, 2], [3, 0, 2])  # an empty range is dropped
    assert len(pool) == 5 and np.asarray(pool).tolist() == [10, 11, 12, 50, 52]
    assert pool.take([4, 0, 3]).tolist() == [52, 10, 50]
