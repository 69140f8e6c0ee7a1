import numpy as np
import pytest

from hiermem.data.sharding import ShardedSampler, plan_shards, rank_pools
from hiermem.errors import HiermemError


def tree_paths(branching=4, per_leaf=(3,) * 16):
    """Sequences of a 2-level tree: leaf j (node j of level 1) under level-0 node j // branching."""
    rows = [(leaf // branching, leaf) for leaf, n in enumerate(per_leaf) for _ in range(n)]
    return np.array(rows, np.int64)


def test_level1_subtrees_are_balanced_by_tokens():
    paths = tree_paths()
    tokens = np.where(paths[:, 0] == 0, 100, 10)  # subtree 0 holds most of the tokens
    plan = plan_shards(paths, tokens, 2)
    assert plan.level == 0 and plan.ranks_of == {0: (0,), 1: (1,), 2: (1,), 3: (1,)}
    assert plan.load.tolist() == [1200, 360] and plan.imbalance == pytest.approx(1200 / 780)
    # deep blocks have one sharer each: nothing of theirs crosses the network
    assert all(len(r) == 1 for r in plan.sharers(1).values())


def test_more_ranks_than_level1_nodes_goes_one_level_deeper():
    paths = tree_paths()
    plan = plan_shards(paths, np.ones(len(paths)), 8)
    assert plan.level == 1 and plan.imbalance == 1.0
    assert all(len(r) > 1 for r in plan.sharers(0).values())  # a level-0 block: shared by its leaves' ranks
    assert all(len(r) == 1 for r in plan.sharers(1).values()) and plan.report()["unit_level"] == 2


def test_more_ranks_than_leaves_shares_the_biggest_leaves():
    paths = tree_paths(branching=1, per_leaf=(6, 2))  # a 1-way tree: two leaves, levels 0 and 1 alike
    plan = plan_shards(paths, np.ones(len(paths)), 3)
    assert plan.ranks_of == {0: (0, 1), 1: (2,)}  # the larger leaf gets the spare rank
    assert plan.sharers(1) == {0: (0, 1), 1: (2,)} and plan.report()["shared_units"] == 1
    pools = rank_pools(plan, paths[:, plan.level])
    assert sorted(np.concatenate(pools).tolist()) == list(range(8))  # a partition of the sequences
    assert [len(p) for p in pools] == [3, 3, 2]


def test_pools_keep_each_rank_inside_its_subtrees():
    paths = tree_paths(per_leaf=tuple(range(1, 17)))
    plan = plan_shards(paths, np.ones(len(paths)), 3)
    pools = rank_pools(plan, paths[:, plan.level])
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
        plan_shards(np.zeros((0, 2)), np.zeros(0), 2)
    with pytest.raises(HiermemError, match="rank 1 has no training sequences"):
        ShardedSampler([np.arange(3), np.zeros(0, np.int64)], per_rank=1)


def test_a_ranks_batches_fetch_only_the_blocks_its_shard_holds():
    """The sampler keeps each rank inside its bank shard (memory/shard.py held_blocks): every block on the
    paths of its batches is one it holds, so a shard never misses a block (fetching one it lacks is an error)."""
    from hiermem.memory.shard import held_blocks

    paths = tree_paths(per_leaf=tuple(range(1, 17)))
    for world in (2, 3, 8):
        plan = plan_shards(paths, np.ones(len(paths)), world)
        sharers = {f"level{l}": plan.sharers(l) for l in range(paths.shape[1])}
        sampler = ShardedSampler(rank_pools(plan, paths[:, plan.level]), per_rank=5, seed=0)
        for r in range(world):
            held = held_blocks(sharers, r)
            fetched = np.concatenate([paths[sampler.batch(step, r)] for step in range(8)])
            for l in range(paths.shape[1]):
                assert set(fetched[:, l].tolist()) <= set(held[f"level{l}"].tolist()), (world, r, l)
            assert len(held["level1"]) < 16  # a shard, not the whole bank
