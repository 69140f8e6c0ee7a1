"""memory/store.py: format-3 bank folders. A committed generation is never overwritten, a generation is visible
only once committed (and to manifest.json once published), a commit costs the blocks written since the last."""

import json
import os

import numpy as np
import pytest
import torch

from hiermem.errors import HiermemError
from hiermem.memory.bank import MemoryBank
from hiermem.memory.spec import BankSpec
from hiermem.memory.store import BlockStore, open_store

SPEC = BankSpec(d=4, n_layers=2, ranks=(2, 3), branching=2)  # level0: 2 blocks, level1: 4, generic: 1


def record(store, key, value):
    lay = store.layouts[key]
    return np.full((lay.weight_bytes + lay.state_bytes) // 4, value, np.float32).view(np.uint8)


def value_of(store, key, i):
    lay = store.layouts[key]
    (rec,) = store.read(key, [i], lay.weight_bytes + lay.state_bytes, check=True)
    return float(rec.view(np.float32)[0])


def filled(d, value=1.0):
    store = BlockStore.create(d, SPEC, "float32", state=True)
    for key, lay in store.layouts.items():
        for i in range(lay.n_blocks):
            store.write(key, i, record(store, key, value))
    store.commit(0, store.writes)
    store.publish()
    return store


def test_writes_never_touch_the_committed_generation(tmp_path):
    store = filled(tmp_path)
    store.write("level1", 3, record(store, "level1", 2.0))
    assert value_of(store, "level1", 3) == 2.0  # the writer sees its write ...
    assert value_of(open_store(tmp_path), "level1", 3) == 1.0  # ... the committed generation does not
    store.commit(1, store.writes)
    assert value_of(open_store(tmp_path), "level1", 3) == 1.0  # committed, not yet published
    assert value_of(open_store(tmp_path, generation=1), "level1", 3) == 2.0
    assert value_of(open_store(tmp_path, generation=0), "level1", 3) == 1.0
    store.publish()
    assert value_of(open_store(tmp_path), "level1", 3) == 2.0
    assert not (tmp_path / "gen-000000.json").exists() and not (tmp_path / "table-000000.npz").exists()
    # the table names the file that holds each block: the written one moved to the other slot file
    assert open_store(tmp_path).slot["level1"].tolist() == [0, 0, 0, 1]
    assert json.loads((tmp_path / "manifest.json").read_text())["parts"]["level1"]["files"] == [
        "level1.0.bin", "level1.1.bin"]
    # the next write of that block goes back to slot 0, leaving generation 1's record alone
    store.write("level1", 3, record(store, "level1", 3.0))
    assert store.file_of("level1", 3).name == "level1.0.bin"
    assert value_of(open_store(tmp_path), "level1", 3) == 2.0
    with pytest.raises(ValueError, match="generation 1 after generation 1"):
        store.commit(1, store.writes)


def test_a_fresh_store_reads_zeros_and_takes_weights_alone_until_its_first_commit(tmp_path):
    store = BlockStore.create(tmp_path, SPEC, "float32", state=True)
    lay = store.layouts["level1"]
    assert value_of(store, "level1", 2) == 0.0  # a hole reads as zeros, and its checksum knows it
    store.write("level1", 2, np.full(lay.weight_bytes // 4, 5.0, np.float32).view(np.uint8))
    (rec,) = store.read("level1", [2], lay.weight_bytes + lay.state_bytes, check=True)
    assert (rec[:lay.weight_bytes].view(np.float32) == 5.0).all() and (rec[lay.weight_bytes:] == 0).all()
    with pytest.raises(ValueError, match="record of"):  # a block once written must be written whole
        store.write("level1", 2, np.zeros(lay.weight_bytes, np.uint8))
    st = os.stat(tmp_path / "level1.1.bin")
    assert st.st_size == 4 * lay.record_bytes and st.st_blocks == 0  # a slot never written takes no disk
    store.commit(0, store.writes)
    with pytest.raises(ValueError, match="record of"):
        store.write("level1", 3, np.zeros(lay.weight_bytes, np.uint8))


def test_a_compatible_store_is_reopened_and_another_bank_is_refused(tmp_path):
    filled(tmp_path)
    again = BlockStore.create(tmp_path, SPEC, "float32", state=True)
    assert again.generation == 0 and value_of(again, "level0", 1) == 1.0
    for spec, dtype, state in ((BankSpec(d=4, n_layers=2, ranks=(2, 2), branching=2), "float32", True),
                               (SPEC, "bfloat16", True), (SPEC, "float32", False)):
        with pytest.raises(HiermemError, match=r"already holds another memory bank"):
            BlockStore.create(tmp_path, spec, dtype, state)
    with pytest.raises(HiermemError, match=r"bank was opened read-only"):
        open_store(tmp_path).write("level0", 0, record(again, "level0", 1.0))


def test_a_commit_writes_only_the_blocks_written_since_the_last(tmp_path, monkeypatch):
    written = []
    write = BlockStore.write
    monkeypatch.setattr(BlockStore, "write", lambda self, key, i, rec: written.append((key, i)) or
                        write(self, key, i, rec))
    bank = MemoryBank.create(SPEC, seed=0)
    bank.enable_state()
    assert bank.commit(tmp_path, generation=1) == 1 and len(written) == 2 + 4 + 1  # a new folder: every block
    bank.publish()
    written.clear()
    bank.write_blocks("level1", torch.tensor([1, 3]), torch.ones(2, 2, 3, 3, 4))
    bank.write_blocks("level1", torch.tensor([3]), torch.zeros(1, 2, 3, 3, 4))
    assert bank.commit(generation=2) == 2 and sorted(written) == [("level1", 1), ("level1", 3)]
    bank.publish()
    written.clear()
    assert bank.commit() == 3 and written == []  # nothing changed: a new table, no block
