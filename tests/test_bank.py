"""memory/bank.py: creation, block I/O, save/load (RAM and memory-mapped), checksums and the manifest format."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hiermem.errors import HiermemError
from hiermem.memory.bank import FORMAT, FORMAT_VERSION, MemoryBank
from hiermem.memory.fetch import fetch
from hiermem.memory.spec import BankSpec
from hiermem.model.fetched import DOWN, GATE, UP

SPEC = BankSpec(d=8, n_layers=4, ranks=(3, 0, 2), branching=3, layers=(1, 3))
FIXTURE_BANK = Path(__file__).parent / "fixtures" / "run_v1" / "bank"


def random_paths(spec, B, seed=0):
    g = np.random.default_rng(seed)
    return np.stack([g.integers(0, spec.n_nodes(l), B) for l in range(spec.depth)], axis=1).astype(np.int64)


def test_parts_and_shapes():
    bank = MemoryBank.create(SPEC, seed=0)
    assert bank.parts() == ["level0", "level2", "generic"]
    assert {k: tuple(bank.part(k).shape) for k in bank.parts()} == {
        "level0": (3, 2, 3, 3, 8), "level2": (27, 2, 3, 2, 8), "generic": (1, 2, 3, 5, 8)}
    assert all(bank.part(k).dtype == torch.float32 for k in bank.parts())
    assert bank.dir is None and not any(bank.is_mapped(k) for k in bank.parts())
    full = BankSpec(d=8, n_layers=4, ranks=(1,), branching=2, generic=False)
    assert MemoryBank.create(full, 0).parts() == ["level0"]


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


def test_read_and_write_blocks():
    bank = MemoryBank.create(SPEC, seed=2)
    ids = torch.tensor([4, 9])
    assert torch.equal(bank.read_blocks("level2", ids), bank.part("level2")[ids])
    new = torch.randn(2, 2, 3, 2, 8)
    bank.write_blocks("level2", ids, new)
    assert torch.equal(bank.part("level2")[ids], new) and torch.equal(bank.read_blocks("level2", ids), new)
    copy = bank.read_blocks("level2", ids)
    copy.zero_()  # read_blocks hands out a copy, never a view of the bank
    assert torch.equal(bank.part("level2")[ids], new)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    bank = MemoryBank.create(SPEC, seed=5)
    bank.write_blocks("level2", torch.tensor([4, 9]), torch.randn(2, 2, 3, 2, 8))
    bank.save(tmp_path / "bank")
    man = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    assert sorted(man["parts"]) == ["generic", "level0", "level2"] and len(man["parts"]["level2"]["checksums"]) == 27
    assert man["format"] == FORMAT == "hiermem-bank" and man["format_version"] == FORMAT_VERSION == 2
    for kw in (dict(mmap=True, cache_levels=1), dict(mmap=False), dict(mmap=True, cache_levels=0, verify="all")):
        back = MemoryBank.load(tmp_path / "bank", **kw)
        assert back.spec == SPEC
        for k in bank.parts():
            assert torch.equal(bank.part(k), back.part(k))
    back = MemoryBank.load(tmp_path / "bank", cache_levels=1)
    assert not back.is_mapped("level0") and back.is_mapped("level2") and not back.is_mapped("generic")
    paths = random_paths(SPEC, 5)
    for a, b in zip(fetch(back, paths).memory.parts, fetch(bank, paths).memory.parts):
        assert torch.equal(a.weights, b.weights) and torch.equal(a.index, b.index)
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
    back.check_compatible(BankSpec(d=8, n_layers=4, ranks=(3, 0, 2), branching=3, layers=(1, 3), init_std=0.5))


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


def test_read_only_and_mapped_banks_refuse_what_they_cannot_do(tmp_path):
    MemoryBank.create(SPEC, seed=3).save(tmp_path / "bank")
    ro = MemoryBank.load(tmp_path / "bank", writable=False, cache_levels=0)
    with pytest.raises(HiermemError, match="opened read-only"):
        ro.write_blocks("level0", torch.tensor([0]), torch.zeros(1, 2, 3, 3, 8))
    with pytest.raises(HiermemError, match="memory-mapped bank stays on the CPU"):
        ro.to("cpu")
    ram = MemoryBank.load(tmp_path / "bank", mmap=False)
    assert ram.to("cpu").device == torch.device("cpu")
    with pytest.raises(ValueError, match="verify must be"):
        MemoryBank.load(tmp_path / "bank", verify="sometimes")
    with pytest.raises(ValueError, match="has no folder"):
        MemoryBank.create(SPEC, seed=3).save()


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
    fetch(bank, np.array([[0, 0, 16], [1, 0, 18]]))
    msg = f"{d / 'level2.npy'}: block 17 of level 2 is corrupted (checksum mismatch)"
    with pytest.raises(HiermemError) as e:
        fetch(bank, np.array([[0, 0, 3], [2, 0, 17]]))
    assert str(e.value) == msg
    with pytest.raises(HiermemError) as e:
        MemoryBank.load(d, verify="all")
    assert str(e.value) == msg
    fetch(MemoryBank.load(d, verify="none"), np.array([[0, 0, 17]]))  # trusted as asked


def test_corrupted_generic_block_is_named(tmp_path):
    d = tmp_path / "bank"
    MemoryBank.create(SPEC, seed=6).save(d)
    _flip_byte(d / "generic.npy", SPEC.part_shape("generic"), block=0)
    with pytest.raises(HiermemError) as e:
        MemoryBank.load(d, verify="all")
    assert str(e.value) == f"{d / 'generic.npy'}: the generic block is corrupted (checksum mismatch)"


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

    bad = json.loads(json.dumps(man))
    bad["parts"]["level2"]["checksums"] = bad["parts"]["level2"]["checksums"][:-1]
    man_path.write_text(json.dumps(bad))
    with pytest.raises(HiermemError, match=r"manifest.json: level2 lists 26 checksums for 27 blocks"):
        MemoryBank.load(d)

    bad = json.loads(json.dumps(man))
    del bad["parts"]["generic"]
    man_path.write_text(json.dumps(bad))
    with pytest.raises(HiermemError, match=r"manifest.json: lists parts \['level0', 'level2'\], its spec needs"):
        MemoryBank.load(d)

    man_path.write_text("{not json")
    with pytest.raises(HiermemError, match=r"manifest.json: unreadable manifest"):
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


def test_format_versions(tmp_path):
    d = tmp_path / "bank"
    bank = MemoryBank.create(SPEC, seed=8)
    bank.write_blocks("level0", torch.tensor([1]), torch.randn(1, 2, 3, 3, 8))
    bank.save(d)
    man_path = d / "manifest.json"
    man = json.loads(man_path.read_text())

    old = {k: v for k, v in man.items() if k != "format_version"} | {"format": "hiermem-bank/1"}  # hiermem 0.1.0
    man_path.write_text(json.dumps(old))
    back = MemoryBank.load(d, verify="all")
    for k in bank.parts():
        assert torch.equal(back.part(k), bank.part(k))
    back.save()  # re-saved in the current format
    assert json.loads(man_path.read_text())["format_version"] == FORMAT_VERSION

    man_path.write_text(json.dumps(man | {"format_version": 99}))
    with pytest.raises(HiermemError) as e:
        MemoryBank.load(d)
    assert str(man_path) in str(e.value) and "version 99" in str(e.value)
    for bad in (man | {"format": "something-else"}, {k: v for k, v in man.items() if k != "format_version"}):
        man_path.write_text(json.dumps(bad))
        with pytest.raises(HiermemError, match=r"manifest.json: not a hiermem bank manifest"):
            MemoryBank.load(d)


def test_a_bank_written_by_hiermem_0_1_0_still_loads():
    man = json.loads((FIXTURE_BANK / "manifest.json").read_text())
    assert man["format"] == "hiermem-bank/1" and "format_version" not in man
    bank = MemoryBank.load(FIXTURE_BANK, mmap=False, verify="all", writable=False)
    assert sorted(bank.parts()) == sorted(man["parts"]) and bank.spec.to_dict() == man["spec"]
