"""memory/cache.py: the block cache never holds more than its budget, keeps pinned parts, writes dirty blocks
back before they go, and gives the same values as no cache at all, also with a second thread at work."""

import random
import threading

import numpy as np
import pytest

from hiermem.errors import HiermemError
from hiermem.memory.cache import BlockCache, pinned_parts
from hiermem.memory.spec import BankSpec

SIZES = {"level0": 40, "level1": 24}  # bytes per record
BLOCKS = {"level0": 3, "level1": 20}


class FakeStore:
    """The disk: a dict of records; counts reads and writes per block."""

    def __init__(self):
        self.data = {(k, i): np.full(SIZES[k], i % 251, np.uint8) for k, n in BLOCKS.items() for i in range(n)}
        self.reads, self.writes = [], []

    def load(self, key, ids):
        self.reads += [(key, int(i)) for i in ids]
        return [self.data[(key, int(i))].copy() for i in ids]

    def write(self, key, i, buf):
        self.writes.append((key, i))
        self.data[(key, i)] = buf.copy()


def make(budget, pinned=(), store=None):
    store = store or FakeStore()
    return store, BlockCache(store.load, store.write, budget, SIZES, BLOCKS, list(pinned))


def test_lru_within_budget_and_write_back_before_eviction():
    store, cache = make(budget=3 * 24)  # room for three level1 records
    cache.get("level1", [0, 1, 2])
    cache.put("level1", [1], [np.full(24, 77, np.uint8)])  # dirty
    cache.get("level1", [0])  # 0 is now the most recent; 2 the oldest
    cache.get("level1", [5])
    assert cache.resident_bytes == 72 and store.writes == []  # 2 went, clean: nothing written
    cache.get("level1", [6])  # evicts 1, dirty: written back first
    assert store.writes == [("level1", 1)] and (store.data[("level1", 1)] == 77).all()
    assert cache.get("level1", [1])[0][0] == 77  # read back from the store
    stats = cache.stats()
    assert stats["peak_bytes"] <= 72 and stats["evictions"] == 3 and stats["misses"] == 6
    cache.put("level1", [6], [np.full(24, 9, np.uint8)])
    assert cache.flush() == 1 and (store.data[("level1", 6)] == 9).all() and cache.flush() == 0


def test_pinned_parts_stay_and_their_room_is_reserved():
    store, cache = make(budget=3 * 40 + 2 * 24, pinned=["level0"])
    for i in range(10):
        cache.get("level0", [i % 3])
        cache.get("level1", [i])
    assert store.reads.count(("level0", 0)) == 1  # read once, never evicted
    assert cache.resident_bytes == 3 * 40 + 2 * 24 and cache.pinned_bytes == 120
    with pytest.raises(HiermemError) as e:
        make(budget=3 * 40 + 10, pinned=["level0"])[1].get("level1", [0])
    assert str(e.value) == ("memory.cache_bytes=130: too small, a block of level1 needs 24 bytes beyond the 120 "
                            "reserved for the pinned parts (level0)")


def test_a_request_larger_than_the_cache_is_served_in_rounds():
    store, cache = make(budget=2 * 24)
    recs = cache.get("level1", [3, 4, 5, 6, 7])
    assert [int(r[0]) for r in recs] == [3, 4, 5, 6, 7] and cache.stats()["peak_bytes"] <= 48


def test_pinned_parts_rule():
    spec = BankSpec(d=4, n_layers=1, ranks=(2, 2, 2), branching=2)
    sizes = {"generic": 10, "level0": 20, "level1": 40, "level2": 80}
    assert pinned_parts(spec, sizes, 2 * 70) == ["generic", "level0", "level1"]
    assert pinned_parts(spec, sizes, 2 * 69) == ["generic", "level0"]
    assert pinned_parts(spec, sizes, 10) == []


def test_random_use_from_two_threads_matches_a_plain_dict_and_stays_within_budget():
    """The trainer's thread reads and writes blocks at random; a worker prefetches and cleans meanwhile. Every
    value read is the last one written, the budget holds at every reservation, and a flush leaves the store
    equal to the reference."""
    store, cache = make(budget=40 * 3 + 24 * 5, pinned=["level0"])
    reference = {k: v.copy() for k, v in store.data.items()}
    stop = threading.Event()
    errors = []

    def worker():
        rng = random.Random(1)
        try:
            while not stop.is_set():
                cache.prefetch("level1", rng.sample(range(20), 3))
                cache.clean(reserve=24 * 2)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    rng = random.Random(0)
    try:
        for n in range(3000):
            key = "level0" if rng.random() < 0.2 else "level1"
            ids = rng.sample(range(BLOCKS[key]), rng.randint(1, 3))
            for i, rec in zip(ids, cache.get(key, ids)):
                assert (rec == reference[(key, i)]).all(), (n, key, i)
            if rng.random() < 0.5:
                new = [np.full(SIZES[key], rng.randrange(256), np.uint8) for _ in ids]
                cache.put(key, ids, new)
                reference.update({(key, i): r for i, r in zip(ids, new)})
    finally:
        stop.set()
        t.join()
    assert not errors
    assert cache.stats()["peak_bytes"] <= cache.budget
    cache.flush()
    assert all((store.data[k] == v).all() for k, v in reference.items())
