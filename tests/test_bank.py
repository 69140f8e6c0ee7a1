"""memory/bank.py: creation, block I/O, save/load (RAM and on disk), storage dtypes, checksums and formats."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hiermem.errors import HiermemError
from hiermem.memory.bank import FORMAT, FORMAT_VERSION, MemoryBank, _init_block
from hiermem.memory.fetch import fetch
from hiermem.memory.files import crc32
from hiermem.memory.spec import BankSpec
from hiermem.memory.store import open_store
from hiermem.model.fetched import DOWN, GATE, UP

SPEC = BankSpec(d=8, n_layers=4, ranks=(3, 0, 2), branching=3, layers=(1, 3))
FIXTURE_BANK = Path(__file__).parent / "fixtures" / "run_v1" / "bank"


def random_paths(spec, B, seed=0):
    g = np.random.default_rng(seed)
    return np.stack([g.integers(0, spec.n_nodes(l), B) for l in range(spec.depth)], axis=1).astype(np.int64)


def arrays(bank):
    return {k: bank.read_part(k) for k in bank.parts()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def write_v2_bank(bank, d):
    """A bank as hiermem 0.1.x's second release wrote it: level<l>.npy files, crc32s in manifest.json."""
    d.mkdir(parents=True)
    parts = {}
    for k in bank.parts():
        a = bank.read_part(k).numpy()
        np.save(d / f"{k}.npy", a)
        parts[k] = {"file": f"{k}.npy", "shape": list(a.shape), "checksums": [crc32(b) for b in a]}
    (d / "manifest.json").write_text(json.dumps({
        "format": "hiermem-bank", "format_version": 2, "spec": bank.spec.to_dict(), "dtype": "float32",
        "checksum": "crc32", "parts": parts}))


def test_parts_and_shapes():
    bank = MemoryBank.create(SPEC, seed=0)
    assert bank.parts() == ["level0", "level2", "generic"]
    assert {k: tuple(bank.part(k).shape) for k in bank.parts()} == {
        "level0": (3, 2, 3, 3, 8), "level2": (27, 2, 3, 2, 8), "generic": (1, 2, 3, 5, 8)}
    assert all(bank.part(k).dtype == torch.float32 for k in bank.parts())
    assert bank.dir is None and not bank.on_disk and bank.block_bytes("level2") == 2 * 3 * 2 * 8 * 4
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
        assert torch.equal(bank.part(k), again.part(k)) and torch.equal(bank.part(k), on_disk.read_part(k))
        assert not torch.equal(bank.part(k), other.part(k))
    assert on_disk.on_disk and (tmp_path / "bank" / "manifest.json").is_file()
    with pytest.raises(HiermemError, match="already holds a memory bank"):
        MemoryBank.create(spec, seed=1, dir=tmp_path / "bank")
    copied = MemoryBank.create(spec, seed=5, weights_from=on_disk)  # train.init_from: its weights, no moments
    assert_same(arrays(copied), arrays(bank))
    with pytest.raises(HiermemError, match=r"^memory\.ranks: bank has \(16, 8\), config has \(16, 4\)$"):
        MemoryBank.create(BankSpec(d=64, n_layers=2, ranks=(16, 4), branching=4), seed=0, weights_from=bank)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_threaded_init_equals_one_thread(tmp_path, dtype):
    """create() initialises blocks on torch's threads; every block must be its own generator's, in place."""
    spec = BankSpec(d=32, n_layers=2, ranks=(8, 4), branching=4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = MemoryBank.create(spec, seed=3, dtype=dtype)
        torch.set_num_threads(4)
        threaded = MemoryBank.create(spec, seed=3, dtype=dtype)
        on_disk = MemoryBank.create(spec, seed=3, dtype=dtype, dir=tmp_path / "bank")
    finally:
        torch.set_num_threads(before)
    for k in serial.parts():
        assert torch.equal(threaded.part(k), serial.part(k)) and torch.equal(on_disk.read_part(k), serial.part(k))
    if dtype == "float32":  # (bf16 rounds each block stochastically on its own seed: compared above)
        assert torch.equal(serial.part("level1")[9], _init_block(spec, 3, "level1", 9))


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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_update_state_hands_out_views_of_a_float32_bank_and_copies_otherwise(dtype):
    """The optimizer's way in: a float32 RAM bank hands update() views of its own rows (nothing copied), a bf16
    bank float32 copies that it stores (rounded) afterwards; either way the blocks and moments change as update
    changed them, the others not at all, and the blocks count as written."""
    bank = MemoryBank.create(SPEC, seed=2, dtype=dtype)
    bank.enable_state()
    ids = torch.tensor([9, 4])
    before = {f: bank.read_part("level2", f) for f in "wmv"}
    seen = {}

    def update(w, m, v):
        seen["views"] = [t.untyped_storage().data_ptr() for t in (w[0], m[0], v[0])]
        assert len(w) == len(m) == len(v) == 2 and all(t.dtype == torch.float32 for t in w + m + v)
        for j, (wj, mj, vj) in enumerate(zip(w, m, v)):
            wj.add_(1.0 + j), mj.fill_(0.5 + j), vj.fill_(2.0 + j)

    bank.update_state("level2", ids, update)
    own = [bank.part("level2"), *bank._state["level2"]]
    assert (seen["views"] == [t.untyped_storage().data_ptr() for t in own]) == (dtype == "float32")
    after = {f: bank.read_part("level2", f) for f in "wmv"}
    for j, i in enumerate(ids.tolist()):
        want = (before["w"][i] + 1.0 + j).to(bank.part("level2").dtype).float()
        assert torch.allclose(after["w"][i], want, atol=0 if dtype == "float32" else 0.02)
        assert (after["m"][i] == 0.5 + j).all() and (after["v"][i] == 2.0 + j).all()
    rest = torch.ones(len(before["w"]), dtype=torch.bool)
    rest[ids] = False
    assert all(torch.equal(after[f][rest], before[f][rest]) for f in "wmv")
    assert bank._writes["level2"][ids.numpy()].tolist() == [1, 1] and bank._dirty["level2"][ids.numpy()].all()
    with pytest.raises(HiermemError, match="not held|read-only"):
        ro = MemoryBank.create(SPEC, seed=2, dtype=dtype)
        ro.enable_state()
        ro.writable = False
        ro.update_state("level2", ids, update)


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip_is_bit_exact(tmp_path, mmap):
    bank = MemoryBank.create(SPEC, seed=5)
    bank.write_blocks("level2", torch.tensor([4, 9]), torch.randn(2, 2, 3, 2, 8))
    bank.save(tmp_path / "bank")
    man = json.loads((tmp_path / "bank" / "manifest.json").read_text())
    assert sorted(man["parts"]) == ["generic", "level0", "level2"]
    assert man["format"] == FORMAT == "hiermem-bank" and man["format_version"] == FORMAT_VERSION == 3
    assert man["parts"]["level2"]["files"] == ["level2.0.bin", "level2.1.bin"] and man["state"] is False
    for kw in (dict(mmap=mmap), dict(mmap=mmap, verify="all"), dict(mmap=mmap, writable=False)):
        back = MemoryBank.load(tmp_path / "bank", **kw)
        assert back.spec == SPEC and back.on_disk == mmap
        assert_same(arrays(back), arrays(bank))
    back = MemoryBank.load(tmp_path / "bank", mmap=mmap, cache_bytes=4000)
    paths = random_paths(SPEC, 5)
    for a, b in zip(fetch(back, paths).memory.parts, fetch(bank, paths).memory.parts):
        assert torch.equal(a.weights, b.weights) and torch.equal(a.index, b.index)
    # an in-place save writes a new generation of the blocks written since; the reload verifies them
    back.write_blocks("level2", torch.tensor([1]), torch.ones(1, 2, 3, 2, 8))
    back.write_blocks("level0", torch.tensor([2]), torch.ones(1, 2, 3, 3, 8))
    back.save()
    assert json.loads((tmp_path / "bank" / "manifest.json").read_text())["generation"] == 1
    again = MemoryBank.load(tmp_path / "bank", verify="all", mmap=not mmap)
    assert torch.equal(again.read_part("level2")[1], torch.ones(2, 3, 2, 8))
    assert torch.equal(again.read_part("level0")[2], torch.ones(2, 3, 3, 8))
    assert torch.equal(again.read_part("level2")[4], bank.part("level2")[4])

    back.check_compatible(SPEC)
    other = BankSpec(d=8, n_layers=4, ranks=(4, 0, 2), branching=3, layers=(1, 3))
    with pytest.raises(HiermemError, match=r"^memory\.ranks: bank has \(3, 0, 2\), config has \(4, 0, 2\)$"):
        back.check_compatible(other)
    back.check_compatible(BankSpec(d=8, n_layers=4, ranks=(3, 0, 2), branching=3, layers=(1, 3), init_std=0.5))


def test_in_place_save_after_a_save_elsewhere_writes_ram_parts(tmp_path):
    """A copy into another folder must not make the next in-place save skip blocks written before that copy."""
    MemoryBank.create(SPEC, seed=1).save(tmp_path / "bank")
    bank = MemoryBank.load(tmp_path / "bank", mmap=False)
    bank.write_blocks("level0", torch.tensor([2]), torch.full((1, 2, 3, 3, 8), 7.0))
    bank.write_blocks("generic", torch.tensor([0]), torch.full((1, 2, 3, 5, 8), 3.0))
    bank.save(tmp_path / "checkpoint")
    assert bank.dir == tmp_path / "bank"  # a copy elsewhere leaves the bank's own folder as it was
    bank.save()
    for folder in ("bank", "checkpoint"):
        again = MemoryBank.load(tmp_path / folder, verify="all", mmap=False)
        assert_same(arrays(again), arrays(bank))


@pytest.mark.parametrize("mmap", [False, True])
def test_bf16_storage_halves_the_bytes_and_round_trips_exactly(tmp_path, mmap):
    fp32 = MemoryBank.create(SPEC, seed=3)
    bank = MemoryBank.create(SPEC, seed=3, dir=tmp_path / "b" if mmap else None, dtype="bf16")
    assert bank.dtype == "bfloat16" and bank.block_bytes("level2") == fp32.block_bytes("level2") // 2
    for k in bank.parts():  # the fp32 init rounded to one of its two bf16 neighbours (memory/precision.py)
        w, x = bank.read_part(k), fp32.part(k)
        down = x.view(torch.int32) & -65536  # towards zero
        lower, upper = down.view(torch.float32), (down + 65536).view(torch.float32)
        assert w.dtype == torch.float32 and ((w == lower) | (w == upper)).all()
        assert torch.equal(w[:, :, DOWN], x[:, :, DOWN])  # zeros are exact
    if not mmap:
        bank.save(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["dtype"] == "bfloat16"
    for other_mmap in (False, True):
        assert_same(arrays(MemoryBank.load(tmp_path / "b", mmap=other_mmap, verify="all")), arrays(bank))
    with pytest.raises(HiermemError, match=r"memory\.dtype: 'float16' is not a bank storage dtype"):
        MemoryBank.create(SPEC, seed=3, dtype="float16")


def test_read_only_and_on_disk_banks_refuse_what_they_cannot_do(tmp_path):
    MemoryBank.create(SPEC, seed=3).save(tmp_path / "bank")
    ro = MemoryBank.load(tmp_path / "bank", writable=False)
    with pytest.raises(HiermemError, match="opened read-only"):
        ro.write_blocks("level0", torch.tensor([0]), torch.zeros(1, 2, 3, 3, 8))
    with pytest.raises(HiermemError, match="a bank on disk stays on the CPU"):
        ro.to("cpu")
    with pytest.raises(HiermemError, match="opened read-only; it cannot train"):
        ro.enable_state()
    ram = MemoryBank.load(tmp_path / "bank", mmap=False)
    assert ram.to("cpu").device == torch.device("cpu")
    with pytest.raises(ValueError, match="verify must be"):
        MemoryBank.load(tmp_path / "bank", verify="sometimes")
    with pytest.raises(ValueError, match="has no folder"):
        MemoryBank.create(SPEC, seed=3).save()
    with pytest.raises(HiermemError, match="was saved without optimizer state; it cannot train"):
        MemoryBank.load(tmp_path / "bank").enable_state()


def _flip_byte(path, offset):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_corrupted_block_is_named(tmp_path):
    d = tmp_path / "bank"
    MemoryBank.create(SPEC, seed=6, dir=d)
    record = json.loads((d / "manifest.json").read_text())["parts"]["level2"]["record_bytes"]
    _flip_byte(d / "level2.0.bin", 17 * record + 5)
    msg = f"{d / 'level2.0.bin'}: block 17 of level 2 is corrupted (checksum mismatch)"
    for mmap in (True, False):  # lazy: only fetched blocks are checked
        bank = MemoryBank.load(d, mmap=mmap, verify="fetch")
        fetch(bank, np.array([[0, 0, 16], [1, 0, 18]]))
        with pytest.raises(HiermemError) as e:
            fetch(bank, np.array([[0, 0, 3], [2, 0, 17]]))
        assert str(e.value) == msg
        bank.enable_state()
        with pytest.raises(HiermemError) as e:  # the optimizer's in-place update checks a block not read yet
            bank.update_state("level2", torch.tensor([17]), lambda w, m, v: None)
        assert str(e.value) == msg
        with pytest.raises(HiermemError) as e:
            MemoryBank.load(d, mmap=mmap, verify="all")
        assert str(e.value) == msg
        fetch(MemoryBank.load(d, mmap=mmap, verify="none"), np.array([[0, 0, 17]]))  # trusted as asked
    # the moments are checked too, when a bank is opened to train
    _flip_byte(d / "level2.0.bin", 17 * record + 5)
    _flip_byte(d / "level2.0.bin", 3 * record + 2 * 3 * 2 * 8 * 4 + 1)
    with pytest.raises(HiermemError, match=r"the optimizer state of block 3 of level 2 is corrupted"):
        MemoryBank.load(d, mmap=False)


def test_corrupted_generic_block_is_named(tmp_path):
    d = tmp_path / "bank"
    MemoryBank.create(SPEC, seed=6).save(d)
    _flip_byte(d / "generic.0.bin", 3)
    with pytest.raises(HiermemError) as e:
        MemoryBank.load(d, verify="all")
    assert str(e.value) == f"{d / 'generic.0.bin'}: the generic block is corrupted (checksum mismatch)"


def test_manifest_and_file_mismatches_are_refused(tmp_path):
    d = tmp_path / "bank"
    MemoryBank.create(SPEC, seed=7).save(d)
    man_path = d / "manifest.json"
    man = json.loads(man_path.read_text())

    def refused(bad, pattern):
        man_path.write_text(json.dumps(bad) if isinstance(bad, dict) else bad)
        with pytest.raises(HiermemError, match=pattern):
            MemoryBank.load(d)

    bad = json.loads(json.dumps(man))
    bad["parts"]["level2"]["shape"] = [27, 2, 3, 4, 8]
    refused(bad, r"manifest.json: level2 has shape \(27, 2, 3, 4, 8\), its spec needs")
    bad = json.loads(json.dumps(man))
    bad["parts"]["level2"]["record_bytes"] = 8
    refused(bad, r"manifest.json: level2 records of 8 bytes, its spec and dtype need 4096")
    bad = json.loads(json.dumps(man))
    del bad["parts"]["generic"]
    refused(bad, r"manifest.json: lists parts \['level0', 'level2'\], its spec needs")
    refused("{not json", r"manifest.json: unreadable manifest")
    refused(man | {"table": {"file": man["table"]["file"], "crc32": 1}}, r"table-000000.npz: corrupted block table")
    refused(man | {"table": {"file": "table-000009.npz", "crc32": 1}}, r"table-000009.npz: missing")
    man_path.write_text(json.dumps(man))
    (d / "level0.1.bin").unlink()
    with pytest.raises(HiermemError, match=r"level0.1.bin: missing"):
        MemoryBank.load(d)
    man_path.unlink()
    with pytest.raises(HiermemError, match=r"manifest.json: missing"):
        MemoryBank.load(d)
    with pytest.raises(HiermemError, match=r"gen-000004.json: missing"):
        MemoryBank.load(d, generation=4)


def test_a_format_2_bank_loads_and_is_saved_as_format_3(tmp_path):
    d = tmp_path / "bank"
    bank = MemoryBank.create(SPEC, seed=8)
    bank.write_blocks("level0", torch.tensor([1]), torch.randn(1, 2, 3, 3, 8))
    write_v2_bank(bank, d)
    man_path = d / "manifest.json"
    man = json.loads(man_path.read_text())
    for mmap in (False, True):
        assert_same(arrays(MemoryBank.load(d, mmap=mmap, writable=not mmap, verify="all")), arrays(bank))
    with pytest.raises(HiermemError, match=r"manifest.json: a format-2 bank opens on disk only read-only"):
        MemoryBank.load(d, mmap=True)
    back = MemoryBank.load(d, mmap=False)
    back.save()  # re-saved in the current format, in place; the old files go once it is published
    assert json.loads(man_path.read_text())["format_version"] == FORMAT_VERSION
    assert not (d / "level0.npy").exists() and (d / "level0.0.bin").is_file()
    assert_same(arrays(MemoryBank.load(d, verify="all")), arrays(bank))

    write_v2_bank(bank, tmp_path / "v2")
    bad = json.loads(json.dumps(man))
    bad["parts"]["level2"]["checksums"] = bad["parts"]["level2"]["checksums"][:-1]
    (tmp_path / "v2" / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(HiermemError, match=r"manifest.json: level2 lists 26 checksums for 27 blocks"):
        MemoryBank.load(tmp_path / "v2", mmap=False)
    (tmp_path / "v2" / "manifest.json").write_text(json.dumps(man))
    np.save(tmp_path / "v2" / "level0.npy", np.zeros((3, 2, 3, 4, 8), np.float32))
    with pytest.raises(HiermemError, match=r"level0.npy: shape \(3, 2, 3, 4, 8\) does not match"):
        MemoryBank.load(tmp_path / "v2", mmap=False)
    np.save(tmp_path / "v2" / "level0.npy", np.zeros((3, 2, 3, 3, 8), np.float64))
    with pytest.raises(HiermemError, match=r"level0.npy: dtype float64 does not match"):
        MemoryBank.load(tmp_path / "v2", mmap=False)
    (tmp_path / "v2" / "level0.npy").unlink()
    with pytest.raises(HiermemError, match=r"level0.npy: missing"):
        MemoryBank.load(tmp_path / "v2", mmap=False)


def test_newer_and_unknown_formats_are_refused(tmp_path):
    d = tmp_path / "bank"
    MemoryBank.create(SPEC, seed=8).save(d)
    man_path = d / "manifest.json"
    man = json.loads(man_path.read_text())
    man_path.write_text(json.dumps(man | {"format_version": 99}))
    with pytest.raises(HiermemError) as e:
        MemoryBank.load(d)
    assert str(e.value) == (f"{man_path}: bank format version 99 is newer than this hiermem reads "
                            f"({FORMAT_VERSION}); upgrade hiermem")
    for bad in (man | {"format": "something-else"}, {k: v for k, v in man.items() if k != "format_version"}):
        man_path.write_text(json.dumps(bad))
        with pytest.raises(HiermemError, match=r"manifest.json: not a hiermem bank manifest"):
            MemoryBank.load(d)


def test_a_bank_written_by_hiermem_0_1_0_still_loads():
    man = json.loads((FIXTURE_BANK / "manifest.json").read_text())
    assert man["format"] == "hiermem-bank/1" and "format_version" not in man
    bank = MemoryBank.load(FIXTURE_BANK, mmap=False, verify="all", writable=False)
    assert sorted(bank.parts()) == sorted(man["parts"]) and bank.spec.to_dict() == man["spec"]
    on_disk = MemoryBank.load(FIXTURE_BANK, mmap=True, verify="all", writable=False)
    assert_same(arrays(on_disk), arrays(bank))
    assert open_store(FIXTURE_BANK).version == 1


def test_a_shard_holds_only_its_blocks_with_the_whole_banks_values(tmp_path):
    """A rank's shard (memory/shard.py): read from the store, only its blocks and their moments are in memory,
    each equal to the whole bank's; the lazy AdamW moves them as it moves the whole bank's, with step counts
    for the shard's blocks only, saved whole after gathered(); a block the shard lacks is an error."""
    from hiermem.memory.fetch import BlockGrads
    from hiermem.memory.optim import LazyAdamW

    whole = MemoryBank.create(SPEC, seed=3)
    LazyAdamW(whole, lr=1e-2)  # moments, so that the store holds them
    whole.save(tmp_path / "bank")
    held = {"level0": np.array([1]), "level2": np.array([9, 12, 13]), "generic": np.array([0])}
    shard = MemoryBank.load(tmp_path / "bank", mmap=False, held=held)
    full = MemoryBank.load(tmp_path / "bank", mmap=False)
    block = {k: full.part(k)[0].nbytes for k in full.parts()}
    assert shard.resident_bytes() == 3 * sum(len(h) * block[k] for k, h in held.items()) < full.resident_bytes()
    assert {k: shard.part(k).shape[0] for k in shard.parts()} == {k: len(h) for k, h in held.items()}
    for k, h in held.items():
        assert torch.equal(shard.read_blocks(k, torch.from_numpy(h)), full.read_blocks(k, torch.from_numpy(h)))
    f = fetch(shard, [[1, 3, 9], [1, 4, 13]], torch.tensor([False, True]))
    assert f.block_ids["level2"].tolist() == [9] and f.block_ids["generic"].tolist() == [0]

    ids = {"level2": torch.tensor([9, 13]), "generic": torch.tensor([0])}
    opts = [LazyAdamW(b, lr=1e-2) for b in (shard, full)]
    for opt in opts:
        opt.step(BlockGrads(dict(ids), {k: torch.full((len(i), *SPEC.part_shape(k)[1:]), 0.5)
                                        for k, i in ids.items()}))
    for k, h in held.items():
        ht = torch.from_numpy(h)
        for a, b in zip(shard.read_state(k, ht), full.read_state(k, ht)):
            assert torch.equal(a, b), k
    assert opts[0].steps["level2"].tolist() == [1, 0, 1] and len(opts[0].steps["level0"]) == 1
    with pytest.raises(ValueError, match="gathered"):
        opts[0].save(tmp_path / "steps.npz")
    opts[0].gathered(lambda mine: [mine]).save(tmp_path / "steps.npz")  # one rank's job: its counts, whole
    opts[1].save(tmp_path / "whole.npz")
    again = LazyAdamW(MemoryBank.load(tmp_path / "bank", mmap=False, held=held), lr=1e-2)
    again.load(tmp_path / "whole.npz")
    assert all(np.array_equal(again.steps[k], opts[0].steps[k]) for k in held)
    assert all(np.array_equal(np.load(tmp_path / "steps.npz")[f"steps.{k}"], opts[1].steps[k]) for k in held)

    with pytest.raises(HiermemError, match="block 0 of level 0 is not held by this bank shard"):
        fetch(shard, [[0, 0, 0]])
    with pytest.raises(HiermemError, match="block 10 of level 2 is not held"):
        shard.write_blocks("level2", torch.tensor([9, 10]), torch.zeros(2, *SPEC.part_shape("level2")[1:]))
    assert shard._writes["level2"][9] == 1  # the refused write changed nothing
    with pytest.raises(HiermemError, match="shard"):
        shard.read_part("level2")
    with pytest.raises(HiermemError, match="shard"):
        shard.save(tmp_path / "copy")
    with pytest.raises(ValueError, match="held is for mmap=False"):
        MemoryBank.load(tmp_path / "bank", mmap=True, held=held)
