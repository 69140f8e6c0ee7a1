"""memory/fetch.py: a batch's blocks read from the bank once each, as one FetchedMemory; block gradients; counts."""

import numpy as np
import pytest
import torch

from hiermem.errors import HiermemError
from hiermem.memory.bank import MemoryBank
from hiermem.memory.fetch import FetchCounts, block_grads, check_paths, fetch, needed_blocks
from hiermem.memory.spec import BankSpec

SPEC = BankSpec(d=8, n_layers=4, ranks=(3, 0, 2), branching=3, layers=(1, 3))


def random_paths(spec, B, seed=0):
    g = np.random.default_rng(seed)
    return np.stack([g.integers(0, spec.n_nodes(l), B) for l in range(spec.depth)], axis=1).astype(np.int64)


def reference_weights(bank, paths, use_generic=None):
    """Plain per-sequence Python: cat of the path's blocks per level (or the generic block)."""
    rows = []
    for b, path in enumerate(paths.tolist()):
        if use_generic is not None and use_generic[b]:
            rows.append(bank.part("generic")[0])
        else:
            rows.append(torch.cat([bank.part(f"level{l}")[path[l]] for l in range(bank.spec.depth)
                                   if f"level{l}" in bank.parts()], dim=2))
    return torch.stack(rows)


def fetched_rows(memory):
    """Each row's neurons [B, n_mem_layers, 3, R, d], expanded from the fetch's distinct blocks."""
    layers = memory.per_layer(memory.first_layer + memory.n_layers)[memory.first_layer:]
    return torch.stack([layer.expand(torch.float32) for layer in layers], dim=1)


def filled_bank(seed):
    bank = MemoryBank.create(SPEC, seed=seed)
    # give down rows values too, so every slice of the reference comparison is informative
    for k in bank.parts():
        bank.write_blocks(k, torch.arange(bank.part(k).shape[0]), torch.randn(bank.part(k).shape))
    return bank


def test_fetch_concatenates_levels_in_order_like_a_python_reference():
    bank = filled_bank(3)
    paths = random_paths(SPEC, 7, seed=1)
    paths[1] = paths[0]  # shared blocks
    f = fetch(bank, torch.from_numpy(paths))
    assert f.memory.first_layer == 1 and f.memory.rank == 5 and f.memory.batch_size == 7
    layers = f.memory.per_layer(4)
    assert layers[0] is None and layers[1] is not None and layers[2] is not None and layers[3] is None
    assert torch.equal(fetched_rows(f.memory), reference_weights(bank, paths))
    assert not any(p.weights.requires_grad for p in f.memory.parts)
    g = fetch(bank, paths, requires_grad=True)
    assert all(p.weights.is_leaf and p.weights.requires_grad for p in g.memory.parts)


def test_each_distinct_block_is_read_once(monkeypatch):
    bank = filled_bank(4)
    paths = random_paths(SPEC, 8, seed=2)
    paths[3] = paths[5] = paths[0]
    use = torch.tensor([0, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    reads = []
    read = MemoryBank.read_blocks
    monkeypatch.setattr(MemoryBank, "read_blocks", lambda self, key, ids, copy=True:
                        reads.append((key, ids.tolist())) or read(self, key, ids))
    f = fetch(bank, paths, use)
    assert [p.name for p in f.memory.parts] == ["level0", "level2", "generic"]
    assert [k for k, _ in reads] == ["level0", "level2", "generic"]  # one read per part
    for (key, ids), p in zip(reads, f.memory.parts[:2]):
        level = int(key[5:])
        want = np.unique(paths[~use.numpy(), level])
        assert ids == want.tolist() == f.block_ids[key].tolist()  # distinct, in node-id order
        assert torch.equal(p.weights, bank.part(key)[f.block_ids[key]])  # the U distinct blocks, nothing more
        assert (p.index[use] == -1).all() and p.offset == {"level0": 0, "level2": 3}[key]
        assert torch.equal(f.block_ids[key][p.index[~use]], torch.from_numpy(paths[~use.numpy(), level]))
        np.testing.assert_array_equal(f.rows_per_block[key].numpy(),
                                      [(paths[~use.numpy(), level] == i).sum() for i in want])
    assert f.block_ids["generic"].tolist() == [0] and f.rows_per_block["generic"].tolist() == [1]
    assert f.memory.parts[2].index.tolist() == [-1, -1, -1, 0, -1, -1, -1, -1]
    assert torch.equal(fetched_rows(f.memory), reference_weights(bank, paths, use))
    assert f.nbytes == sum(len(ids) * bank.block_bytes(k) for k, ids in f.block_ids.items())
    assert {k: v.tolist() for k, v in needed_blocks(SPEC, paths, use).items()} == {
        k: v.tolist() for k, v in f.block_ids.items()}  # what a prefetch asks for is what the fetch reads


def test_a_bank_on_disk_fetches_the_same_blocks(tmp_path):
    bank = filled_bank(7)
    bank.save(tmp_path / "bank")
    paths = random_paths(SPEC, 9, seed=4)
    use = torch.tensor([0, 1, 0, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    disk = MemoryBank.load(tmp_path / "bank", mmap=True, writable=False, cache_bytes=2000)
    for f in (fetch(disk, paths, use), fetch(disk, paths, use, requires_grad=True)):
        assert torch.equal(fetched_rows(f.memory), reference_weights(bank, paths, use))
    one = fetch(disk, paths[:1])  # one sequence, read only: the cached records themselves, no copy
    again = fetch(disk, paths[:1])
    assert one.memory.parts[0].weights.data_ptr() == again.memory.parts[0].weights.data_ptr()
    trained = fetch(disk, paths[:1], requires_grad=True)  # training gets its own leaf tensors
    assert trained.memory.parts[0].weights.data_ptr() != one.memory.parts[0].weights.data_ptr()


def test_generic_rows():
    bank = filled_bank(5)
    paths = random_paths(SPEC, 6, seed=2)
    use = torch.tensor([True, False, False, True, False, False])
    f = fetch(bank, paths, use)
    assert torch.equal(fetched_rows(f.memory), reference_weights(bank, paths, use))
    assert "generic" not in fetch(bank, paths).block_ids  # no row uses it: not read at all
    every = fetch(bank, paths, torch.ones(6, dtype=torch.bool))
    assert [len(p.weights) for p in every.memory.parts] == [0, 0, 1]
    assert torch.equal(fetched_rows(every.memory), bank.part("generic").expand(6, -1, -1, -1, -1))
    no_generic = MemoryBank.create(BankSpec(d=8, n_layers=4, ranks=(3,), branching=3, generic=False), 0)
    with pytest.raises(HiermemError, match="no generic block"):
        fetch(no_generic, np.zeros((2, 1), np.int64), torch.tensor([True, False]))
    with pytest.raises(HiermemError, match=r"use_generic: expected shape \[6\], got \(5,\)"):
        fetch(bank, paths, torch.zeros(5, dtype=torch.bool))


def test_bad_paths_are_refused():
    bank = MemoryBank.create(SPEC, seed=0)
    with pytest.raises(HiermemError, match=r"level 2 node ids must be in \[0, 27\), got 27"):
        fetch(bank, np.array([[0, 0, 27]]))
    with pytest.raises(HiermemError, match=r"level 0 node ids must be in \[0, 3\), got -1"):
        fetch(bank, np.array([[-1, 0, 2]]))
    with pytest.raises(HiermemError, match=r"expected shape \[B, 3\]"):
        fetch(bank, np.array([[0, 0]]))
    with pytest.raises(HiermemError, match=r"expected shape \[B, 3\]"):
        fetch(bank, np.array([0, 0, 0]))
    with pytest.raises(HiermemError, match=r"expected integer node ids, got torch.float"):
        fetch(bank, np.array([[0.0, 0.0, 1.0]]))
    assert check_paths(SPEC, np.array([[0, 8, 1]], np.int32)).dtype == torch.int64  # any integer type


def test_block_grads_are_the_leaves_gradients():
    bank = filled_bank(6)
    paths = random_paths(SPEC, 4, seed=3)
    use = torch.tensor([False, True, False, False])
    f = fetch(bank, paths, use, requires_grad=True)
    level0, level2, gen = f.memory.parts
    (level0.weights.square().sum() + 2 * gen.weights.sum()).backward()  # level2 gets no gradient
    bg = block_grads(f, "cpu")
    assert sorted(bg.ids) == ["generic", "level0", "level2"]
    assert torch.equal(bg.grads["level0"], 2 * level0.weights.detach())
    assert torch.equal(bg.grads["generic"], torch.full_like(gen.weights, 2.0))
    assert torch.equal(bg.grads["level2"], torch.zeros_like(level2.weights))  # fetched but unused
    for k in bg.ids:
        assert torch.equal(bg.ids[k], f.block_ids[k]) and bg.grads[k].dtype == torch.float32
    every = fetch(bank, paths, torch.ones(4, dtype=torch.bool), requires_grad=True)
    every.memory.parts[-1].weights.sum().backward()
    assert list(block_grads(every, "cpu").ids) == ["generic"]  # empty level parts are left out


def test_block_grads_without_backward_is_refused():
    bank = MemoryBank.create(SPEC, seed=0)
    with pytest.raises(RuntimeError, match="no gradients"):
        block_grads(fetch(bank, random_paths(SPEC, 3)), "cpu")


def test_fetch_counts():
    bank = MemoryBank.create(SPEC, seed=4)
    counts = FetchCounts(SPEC)
    paths = random_paths(SPEC, 6, seed=2)
    use = torch.tensor([True, False, False, True, False, False])
    counts.add(fetch(bank, paths, use))
    assert counts.generic == 2
    assert counts.per_level[0].sum() == 4 and counts.per_level[1].sum() == 0 and counts.per_level[2].sum() == 4
    np.testing.assert_array_equal(counts.per_level[0], np.bincount(paths[~use.numpy(), 0], minlength=3))
    np.testing.assert_array_equal(counts.per_level[2], np.bincount(paths[~use.numpy(), 2], minlength=27))
    snap = counts.snapshot()
    counts.add(fetch(bank, paths))  # no generic row this time
    assert counts.generic == 2 and counts.per_level[0].sum() == 10
    np.testing.assert_array_equal(counts.per_level[2], snap[2] + np.bincount(paths[:, 2], minlength=27))
    assert snap[0].sum() == 4  # a snapshot is a copy
