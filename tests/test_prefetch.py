"""memory/prefetch.py: the background reader fills the cache ahead of use, ends when idle, hands its errors over,
and changes no value: training a bank on disk with and without it gives the same bits."""

import time

import numpy as np
import pytest
import torch

from hiermem.memory import prefetch as prefetch_mod
from hiermem.memory.bank import MemoryBank
from hiermem.memory.cache import BlockCache
from hiermem.memory.fetch import block_grads, fetch, needed_blocks
from hiermem.memory.optim import LazyAdamW
from hiermem.memory.prefetch import Prefetcher
from hiermem.memory.spec import BankSpec

SPEC = BankSpec(d=8, n_layers=2, ranks=(4, 2, 2), branching=3)


def test_requested_blocks_are_read_in_the_background_and_the_thread_ends_when_idle(monkeypatch):
    monkeypatch.setattr(prefetch_mod, "IDLE_S", 0.05)
    reads = []

    def load(key, ids):
        reads.extend(int(i) for i in ids)
        return [np.zeros(8, np.uint8) for _ in ids]

    cache = BlockCache(load, None, budget=80, record_bytes={"level2": 8}, n_blocks={"level2": 27}, pinned=[])
    p = Prefetcher(cache, reserve=16)
    p.request({"level2": np.array([3, 4, 5])})
    p.drain()
    assert sorted(reads) == [3, 4, 5]
    cache.get("level2", [3, 4, 5])
    assert cache.stats()["hits"] == 3 and cache.stats()["misses"] == 0
    time.sleep(0.3)
    assert p._thread is None  # gone; the next request starts another
    p.request({"level2": np.array([6])})
    p.drain()
    assert reads[-1] == 6


def test_an_error_in_the_thread_reaches_the_caller():
    def load(key, ids):
        raise OSError("disk on fire")

    cache = BlockCache(load, None, budget=80, record_bytes={"level2": 8}, n_blocks={"level2": 27}, pinned=[])
    p = Prefetcher(cache, reserve=16)
    p.request({"level2": np.array([1])})
    with pytest.raises(OSError, match="disk on fire"):
        p.drain()


def _train(bank, opt, steps, ahead):
    """Random batches with a random linear loss; the blocks of the next `ahead` batches are asked for first."""
    rng = np.random.default_rng(0)
    batches = [np.stack([rng.integers(0, SPEC.n_nodes(l), 6) for l in range(3)], 1) for _ in range(steps)]
    gens = [torch.from_numpy(rng.random(6) < 0.2) for _ in range(steps)]
    for s in range(steps):
        for a in range(1, ahead + 1):
            if s + a < steps:
                bank.prefetch(needed_blocks(SPEC, batches[s + a], gens[s + a]))
        f = fetch(bank, batches[s], gens[s], requires_grad=True)
        loss = sum((p.weights * torch.randn(p.weights.shape, generator=torch.Generator().manual_seed(s))).sum()
                   for p in f.memory.parts)
        loss.backward()
        opt.step(block_grads(f, bank.device), lr=1e-2)


def test_training_is_the_same_with_and_without_prefetch(tmp_path):
    ram = MemoryBank.create(SPEC, seed=4)
    _train(ram, LazyAdamW(ram, lr=1e-2), steps=12, ahead=0)
    for ahead, prefetch in ((0, False), (2, True)):
        d = tmp_path / f"p{ahead}"
        disk = MemoryBank.create(SPEC, seed=4, dir=d, cache_bytes=12_000, prefetch=prefetch)
        _train(disk, LazyAdamW(disk, lr=1e-2), steps=12, ahead=ahead)
        stats = disk.io_stats()
        assert stats["evictions"] > 0 and stats["peak_bytes"] <= 12_000
        for k in ram.parts():
            for field in "wmv":
                assert torch.equal(disk.read_part(k, field), ram.read_part(k, field)), (ahead, k, field)
