"""memory/disk.py: a bank on disk behind the block cache gives the bits of the same bank in RAM (fp32 and bf16),
pins its shallow levels, writes back at commit only what changed, and hands out read-only views safely."""

import numpy as np
import pytest
import torch

from hiermem.memory.bank import MemoryBank
from hiermem.memory.fetch import block_grads, fetch
from hiermem.memory.optim import LazyAdamW
from hiermem.memory.spec import BankSpec
from hiermem.memory.store import BlockStore

SPEC = BankSpec(d=8, n_layers=2, ranks=(4, 2, 2), branching=3)


def train(bank, steps=8, seed=0):
    opt = LazyAdamW(bank, lr=3e-2, weight_decay=0.1)
    rng = np.random.default_rng(seed)
    for s in range(steps):
        paths = np.stack([rng.integers(0, SPEC.n_nodes(l), 5) for l in range(3)], 1)
        f = fetch(bank, paths, torch.from_numpy(rng.random(5) < 0.25), requires_grad=True)
        loss = sum((p.weights.sin() * (j + 1)).sum() for j, p in enumerate(f.memory.parts))
        loss.backward()
        opt.step(block_grads(f, bank.device))
    return opt


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_bank_on_disk_trains_bit_identically_to_the_same_bank_in_ram(tmp_path, dtype):
    ram = MemoryBank.create(SPEC, seed=1, dtype=dtype)
    disk = MemoryBank.create(SPEC, seed=1, dir=tmp_path / "bank", dtype=dtype, cache_bytes=16_000)
    train(ram), train(disk)
    assert disk.io_stats()["evictions"] > 0
    for k in ram.parts():
        for field in "wmv":
            assert torch.equal(disk.read_part(k, field), ram.read_part(k, field)), (k, field)
    disk.save()
    for mmap in (False, True):  # and what it committed reads back the same either way
        back = MemoryBank.load(tmp_path / "bank", mmap=mmap, verify="all")
        for k in ram.parts():
            for field in "wmv":
                assert torch.equal(back.read_part(k, field), ram.read_part(k, field)), (mmap, k, field)


def test_shallow_levels_are_pinned_and_a_commit_writes_only_changed_blocks(tmp_path, monkeypatch):
    written = []
    write = BlockStore.write
    monkeypatch.setattr(BlockStore, "write", lambda self, key, i, r: written.append((key, i)) or write(self, key, i, r))
    disk = MemoryBank.create(SPEC, seed=2, dir=tmp_path / "bank", cache_bytes=30_000)
    rec = {k: disk.store.layouts[k].weight_bytes + disk.store.layouts[k].state_bytes for k in disk.parts()}
    assert rec["level0"] * 3 + rec["generic"] <= 15_000 < rec["level0"] * 3 + rec["generic"] + rec["level1"] * 9
    assert disk.cache.pinned == {"generic", "level0"}
    written.clear()  # (creating it wrote every block)
    disk.enable_state()
    disk.write_blocks("level2", torch.tensor([0, 5]), torch.ones(2, 2, 3, 2, 8))
    disk.write_blocks("level0", torch.tensor([1]), torch.ones(1, 2, 3, 4, 8))
    disk.commit(generation=1)
    assert sorted(written) == [("level0", 1), ("level2", 0), ("level2", 5)]
    written.clear()
    disk.commit(generation=2)
    assert written == []


def test_a_read_only_view_stays_valid_when_the_block_changes(tmp_path):
    disk = MemoryBank.create(SPEC, seed=3, dir=tmp_path / "bank")
    one = torch.tensor([4])
    view = disk.read_blocks("level2", one, copy=False)
    before = view.clone()
    disk.write_blocks("level2", one, torch.full((1, 2, 3, 2, 8), 2.0))  # replaces the cached record
    assert torch.equal(view, before) and torch.equal(disk.read_blocks("level2", one), torch.full_like(view, 2.0))
