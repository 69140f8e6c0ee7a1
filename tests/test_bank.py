import json

import numpy as np
import pytest
import torch

from hiermem.errors import HiermemError
from hiermem.memory.bank import BankSpec, MemoryBank, Prefetcher, bank_param_counts
from hiermem.model.fetched import DOWN, GATE, UP

SPEC = BankSpec(d=8, n_layers=4, ranks=(3, 0, 2), branching=3, layers=(1, 3))


def reference_weights(bank, paths, use_generic=None):
    """Plain per-sequence Python: cat of the path's blocks per level (or the generic block)."""
    rows = []
    for b, path in enumerate(paths.tolist()):
        if use_generic is not None and use_generic[b]:
            rows.append(bank.generic[0])
        else:
            rows.append(torch.cat([lvl[path[l]] for l, lvl in enumerate(bank.levels) if lvl is not None], dim=2))
    return torch.stack(rows)


def random_paths(spec, B, seed=0):
    g = np.random.default_rng(seed)
    return np.stack([g.integers(0, spec.n_nodes(l), B) for l in range(spec.depth)], axis=1).astype(np.int64)


def test_param_counts_match_the_paper():
    paper = BankSpec(d=512, n_layers=35, ranks=(256, 64, 16, 0), branching=16)
    c = bank_param_counts(paper)
    assert c["fetched"] == 18_063_360 and c["bank"] == 4_624_220_160
    assert c["generic"] == c["fetched"] and sum(c["per_level"]) == c["bank"] and c["per_level"][3] == 0
    loc = bank_param_counts(BankSpec(d=512, n_layers=35, ranks=(0, 64, 0, 0), branching=16, generic=False))
    assert loc["fetched"] == 3_440_640 and loc["bank"] == 880_803_840 and loc["generic"] == 0


def test_shapes_levels_and_layer_placement():
    bank = MemoryBank.create(SPEC, seed=0)
    assert SPEC.n_mem_layers == 2 and SPEC.first_layer == 1 and SPEC.fetched_rank == 5
    assert [None if t is None else tuple(t.shape) for t in bank.levels] == [(3, 2, 3, 3, 8), None, (27, 2, 3, 2, 8)]
    assert tuple(bank.generic.shape) == (1, 2, 3, 5, 8)
    assert bank.parts() == ["level0", "level2", "generic"]
    f = bank.fetch(random_paths(SPEC, 4))
    assert tuple(f.memory.weights.shape) == (4, 2, 3, 5, 8) and f.memory.first_layer == 1
    assert f.memory.for_layer(0) is None and f.memory.for_layer(2) is not None and f.memory.for_layer(3) is None
    full = BankSpec(d=8, n_layers=4, ranks=(1,), branching=2, generic=False)
    assert full.n_mem_layers == 4 and full.first_layer == 0 and MemoryBank.create(full, 0).generic is None
    with pytest.raises(HiermemError, match=r"memory.layers"):
        BankSpec(d=8, n_layers=4, ranks=(1,), branching=2, layers=(2, 5))
    with pytest.raises(HiermemError, match=r"memory.ranks"):
        BankSpec(d=8, n_layers=4, ranks=(0, 0), branching=2)


def test_init_distribution_and_determinism(tmp_path):
    spec = BankSpec(d=64, n_layers=2, ranks=(16, 8), branching=4)
    bank = MemoryBank.create(spec, seed=1)
    std = 64 ** -0.5
    for t in bank.parts():
        w = bank.part(t)
        assert torch.count_nonzero(w[:, :, DOWN]) == 0
        gu = w[:, :, [GATE, UP]]
        assert gu.abs().max() <= 3 * std + 1e-6
        assert abs(gu.std().item() - 0.9866 * std) < 0.05 * std  # trunc-normal at ±3σ shrinks σ by 1.3 %
        assert abs(gu.mean().item()) < 0.05 * std
    again = MemoryBank.create(spec, seed=1)
    on_disk = MemoryBank.create(spec, seed=1, dir=tmp_path / "bank")  # block-by-block init, same values
    other = MemoryBank.create(spec, seed=2)
    for k in bank.parts():
        assert torch.equal(bank.part(k), again.part(k)) and torch.equal(bank.part(k), on_disk.part(k))
        assert not torch.equal(bank.part(k), other.part(k))
    assert on_disk.is_mapped("level1") and (tmp_path / "bank" / "manifest.json").is_file()
    with pytest.raises(HiermemError, match="already holds a memory bank"):
        MemoryBank.create(spec, seed=1, dir=tmp_path / "bank")


def test_fetch_concatenates_levels_in_order_like_a_python_reference():
    bank = MemoryBank.create(SPEC, seed=3)
    # give down rows values too, so every slice of the reference comparison is informative
    for k in bank.parts():
        bank.write_blocks(k, torch.arange(bank.part(k).shape[0]), torch.randn(bank.part(k).shape))
    paths = random_paths(SPEC, 7, seed=1)
    paths[1] = paths[0]  # shared blocks
    f = bank.fetch(torch.from_numpy(paths))
    assert torch.equal(f.memory.weights, reference_weights(bank, paths))
    assert not f.memory.weights.requires_grad
    g = bank.fetch(paths, requires_grad=True)
    assert g.memory.weights.is_leaf and g.memory.weights.requires_grad


def test_generic_substitution_and_fetch_counts():
    bank = MemoryBank.create(SPEC, seed=4)
    bank.write_blocks("generic", torch.tensor([0]), torch.randn(bank.generic.shape))
    paths = random_paths(SPEC, 6, seed=2)
    use = torch.tensor([True, False, False, True, False, False])
    f = bank.fetch(paths, use)
    assert torch.equal(f.memory.weights, reference_weights(bank, paths, use))
    bank.record(f)
    assert bank.generic_fetch_count == 2
    assert bank.fetch_counts[0].sum() == 4 and bank.fetch_counts[1].sum() == 0 and bank.fetch_counts[2].sum() == 4
    np.testing.assert_array_equal(bank.fetch_counts[0], np.bincount(paths[~use.numpy(), 0], minlength=3))
    no_generic = MemoryBank.create(BankSpec(d=8, n_layers=4, ranks=(3,), branching=3, generic=False), 0)
    with pytest.raises(HiermemError, match="no generic block"):
        no_generic.fetch(np.zeros((2, 1), np.int64), torch.tensor([True, False]))


def test_bad_paths_are_refused():
    bank = MemoryBank.create(SPEC, seed=0)
    with pytest.raises(HiermemError, match=r"level 2 node ids must be in \[0, 27\), got 27"):
        bank.fetch(np.array([[0, 0, 27]]))
    with pytest.raises(HiermemError, match=r"expected shape \[B, 3\]"):
        bank.fetch(np.array([[0, 0]]))


def test_save_load_round_trip_is_bit_exact(tmp_path):
    bank = MemoryBank.create(SPEC, seed=5)
    bank.write_blocks("level2", torch.tensor([4, 9]), torch.randn(2, 2, 3, 2, 8))
    bank.save(tmp_path / "bank")
    man = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    assert sorted(man["parts"]) == ["generic", "level0", "level2"] and len(man["parts"]["level2"]["checksums"]) == 27
    for kw in (dict(mmap=True, cache_levels=1), dict(mmap=False), dict(mmap=True, cache_levels=0, verify="all")):
        back = MemoryBank.load(tmp_path / "bank", **kw)
        assert back.spec == SPEC
        for k in bank.parts():
            assert torch.equal(bank.part(k), back.part(k))
    back = MemoryBank.load(tmp_path / "bank", cache_levels=1)
    assert not back.is_mapped("level0") and back.is_mapped("level2") and not back.is_mapped("generic")
    paths = random_paths(SPEC, 5)
    assert torch.equal(back.fetch(paths).memory.weights, bank.fetch(paths).memory.weights)
    # in-place save of a memory-mapped bank re-checksums the written blocks; the reload verifies them
    back.write_blocks("level2", torch.tensor([1]), torch.ones(1, 2, 3, 2, 8))
    back.write_blocks("level0", torch.tensor([2]), torch.ones(1, 2, 3, 3, 8))
    back.save()
    again = MemoryBank.load(tmp_path / "bank", verify="all", cache_levels=0)
    assert torch.equal(again.part("level2")[1], torch.ones(2, 3, 2, 8))
    assert torch.equal(again.part("level0")[2], torch.ones(2, 3, 3, 8))

    back.check_compatible(SPEC)
    other = BankSpec(d=8, n_layers=4, ranks=(4, 0, 2), branching=3, layers=(1, 3))
    with pytest.raises(HiermemError, match=r"^memory\.ranks: bank has \(3, 0, 2\), config has \(4, 0, 2\)$"):
        back.check_compatible(other)


def test_in_place_save_after_a_save_elsewhere_writes_ram_parts(tmp_path):
    """A checkpoint copy (save into another folder) must not make the next in-place save skip a part held
    in RAM (cached level, generic) that was written before that copy."""
    MemoryBank.create(SPEC, seed=1).save(tmp_path / "bank")
    bank = MemoryBank.load(tmp_path / "bank", mmap=True, cache_levels=1)
    assert not bank.is_mapped("level0") and not bank.is_mapped("generic")
    bank.write_blocks("level0", torch.tensor([2]), torch.full((1, 2, 3, 3, 8), 7.0))
    bank.write_blocks("generic", torch.tensor([0]), torch.full((1, 2, 3, 5, 8), 3.0))
    bank.save(tmp_path / "checkpoint")
    bank.save()
    for folder in ("bank", "checkpoint"):
        again = MemoryBank.load(tmp_path / folder, verify="all", mmap=False)
        for k in bank.parts():
            assert torch.equal(again.part(k), bank.part(k)), (folder, k)


def _flip_byte(path, key_shape, block, byte_in_block=5):
    offset = np.load(path, mmap_mode="r").offset
    block_bytes = int(np.prod(key_shape[1:])) * 4
    with open(path, "r+b") as fh:
        fh.seek(offset + block * block_bytes + byte_in_block)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_corrupted_block_is_named(tmp_path):
    d = tmp_path / "bank"
    MemoryBank.create(SPEC, seed=6, dir=d)
    _flip_byte(d / "level2.npy", SPEC.part_shape("level2"), block=17)
    bank = MemoryBank.load(d, verify="fetch", cache_levels=1)  # lazy: only fetched blocks are checked
    bank.fetch(np.array([[0, 0, 16], [1, 0, 18]]))
    msg = f"{d / 'level2.npy'}: block 17 of level 2 is corrupted (checksum mismatch)"
    with pytest.raises(HiermemError) as e:
        bank.fetch(np.array([[0, 0, 3], [2, 0, 17]]))
    assert str(e.value) == msg
    with pytest.raises(HiermemError) as e:
        MemoryBank.load(d, verify="all")
    assert str(e.value) == msg
    MemoryBank.load(d, verify="none").fetch(np.array([[0, 0, 17]]))  # trusted as asked


def test_manifest_and_file_mismatches_are_refused(tmp_path):
    d = tmp_path / "bank"
    MemoryBank.create(SPEC, seed=7).save(d)
    man_path = d / "manifest.json"
    man = json.loads(man_path.read_text())

    bad = json.loads(json.dumps(man))
    bad["parts"]["level2"]["shape"] = [27, 2, 3, 4, 8]
    man_path.write_text(json.dumps(bad))
    with pytest.raises(HiermemError, match=r"manifest.json: level2 has shape \(27, 2, 3, 4, 8\), its spec needs"):
        MemoryBank.load(d)

    man_path.write_text(json.dumps(man))
    np.save(d / "level0.npy", np.zeros((3, 2, 3, 4, 8), np.float32))
    with pytest.raises(HiermemError, match=r"level0.npy: shape \(3, 2, 3, 4, 8\) does not match"):
        MemoryBank.load(d)
    np.save(d / "level0.npy", np.zeros((3, 2, 3, 3, 8), np.float64))
    with pytest.raises(HiermemError, match=r"level0.npy: dtype float64 does not match"):
        MemoryBank.load(d)
    (d / "level0.npy").unlink()
    with pytest.raises(HiermemError, match=r"level0.npy: missing"):
        MemoryBank.load(d)
    man_path.unlink()
    with pytest.raises(HiermemError, match=r"manifest.json: missing"):
        MemoryBank.load(d)


def test_prefetcher_returns_what_fetch_returns():
    bank = MemoryBank.create(SPEC, seed=8)
    paths = random_paths(SPEC, 5, seed=3)
    use = torch.tensor([False, True, False, False, False])
    with Prefetcher(bank, requires_grad=True) as pf:
        pf.submit(paths, use)
        got = pf.result()
        want = bank.fetch(paths, use)
        assert torch.equal(got.memory.weights, want.memory.weights) and got.memory.weights.requires_grad
        for k in want.node_ids:
            assert torch.equal(got.node_ids[k], want.node_ids[k]) and torch.equal(got.inverse[k], want.inverse[k])
        # a block written after the prefetch gathered it (an optimizer step) is re-read by result()
        pf.submit(paths, use)
        pf._pending.result()
        bank.write_blocks("level0", torch.from_numpy(paths[:1, 0]), torch.full((1, 2, 3, 3, 8), 7.0))
        bank.write_blocks("generic", torch.tensor([0]), torch.full((1, 2, 3, 5, 8), 3.0))
        got = pf.result()
        assert torch.equal(got.memory.weights, bank.fetch(paths, use).memory.weights)
        assert torch.equal(got.memory.weights[1], torch.full((2, 3, 5, 8), 3.0))
