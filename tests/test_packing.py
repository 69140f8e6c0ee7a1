import json

import numpy as np
import pytest
import torch

from hiermem.data.packing import (
    PAD_SEGMENT,
    BatchSampler,
    DocTokens,
    PackedDataset,
    pack_sequences,
    token_dtype,
    write_doc_tokens,
)
from hiermem.errors import HiermemError
from hiermem.model.transformer import document_mask

EOS, PAD, P = 1, 0, PAD_SEGMENT
DOCS = [[10, 11, 12], [40], [20, 21], [30, 31, 32, 33, 34, 35], []]


@pytest.fixture()
def store(tmp_path):
    write_doc_tokens(tmp_path / "docs", (d for d in DOCS), np.uint16)  # a generator: streamed
    return DocTokens(tmp_path / "docs")


@pytest.fixture()
def packed(store, tmp_path):
    # Interleaved input order; doc 4 is empty (skipped). Group 7 = docs 0, 2, 3, 4; group 3 = doc 1.
    pack_sequences(
        store, np.array([0, 1, 2, 3, 4]), seq_len=4, eos_id=EOS, out_dir=tmp_path / "packed",
        group_of_doc=np.array([7, 3, 7, 7, 7]), path_of_group={7: (1, 2), 3: (4, 5)}, depth=2, pad_id=PAD,
    )
    return tmp_path / "packed"


def test_doc_store_round_trip(store, tmp_path):
    assert len(store) == len(DOCS)
    assert [store[i].tolist() for i in range(len(store))] == DOCS
    assert store.lengths.tolist() == [3, 1, 2, 6, 0]
    assert store.dtype == np.uint16
    tokens = np.load(tmp_path / "docs" / "tokens.npy", mmap_mode="r")
    assert isinstance(tokens, np.memmap) and tokens.tolist() == sum(DOCS, [])
    assert np.load(tmp_path / "docs" / "offsets.npy").tolist() == [0, 3, 4, 6, 12, 12]
    assert token_dtype(50_000) == np.uint16 and token_dtype(100_000) == np.uint32


def test_doc_store_uint32_and_range_check(tmp_path):
    write_doc_tokens(tmp_path / "d32", [np.array([70_000, 1])], np.uint32)
    assert DocTokens(tmp_path / "d32")[0].tolist() == [70_000, 1]
    with pytest.raises(ValueError, match="out of range"):
        write_doc_tokens(tmp_path / "d16", [[1], [70_000]], np.uint16)
    assert not (tmp_path / "d16").exists()


def test_pack_layout_by_hand(packed):
    tokens = np.load(packed / "tokens.npy", mmap_mode="r")
    segments = np.load(packed / "segments.npy", mmap_mode="r")
    # Group 3 first (ascending ids), then group 7: 10 11 12 E | 20 21 E | 30 .. 35 E, cut every 5 tokens.
    assert tokens.tolist() == [
        [40, EOS, PAD, PAD, PAD],
        [10, 11, 12, EOS, 20],
        [21, EOS, 30, 31, 32],
        [33, 34, 35, EOS, PAD],
    ]
    assert segments.tolist() == [
        [0, 0, P, P, P],
        [0, 0, 0, 0, 1],
        [0, 0, 1, 1, 1],  # doc 2 continues as segment 0; doc 3 starts as segment 1
        [0, 0, 0, 0, P],
    ]
    assert segments.dtype == np.uint16 and tokens.dtype == np.uint16
    assert np.load(packed / "groups.npy").tolist() == [3, 7, 7, 7]
    assert np.load(packed / "paths.npy").tolist() == [[4, 5], [1, 2], [1, 2], [1, 2]]
    meta = json.loads((packed / "meta.json").read_text())
    assert meta["n_sequences"] == 4 and meta["n_tokens"] == 2 + 14 and meta["seq_len"] == 4
    assert meta["depth"] == 2 and meta["eos_id"] == EOS and meta["dtype"] == "uint16"
    assert len(meta["inputs_sha256"]) == 64


def test_batch_targets_positions_paths(packed):
    ds = PackedDataset(packed)
    assert len(ds) == 4 and ds.n_tokens == 16
    b = ds.batch(np.array([1, 2, 3, 0]))
    assert b["input_ids"].tolist() == [[10, 11, 12, EOS], [21, EOS, 30, 31], [33, 34, 35, EOS], [40, EOS, PAD, PAD]]
    X = -100
    assert b["targets"].tolist() == [
        [11, 12, EOS, X],  # eos is predicted; the next document's first token is not
        [EOS, X, 31, 32],
        [34, 35, EOS, X],  # padding is never a target
        [EOS, X, X, X],
    ]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, -1, -1]]
    assert b["positions"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 2, 3], [0, 1, 0, 0]]
    assert b["paths"].tolist() == [[1, 2], [1, 2], [1, 2], [4, 5]]
    assert all(t.dtype == torch.int64 for t in b.values())


def test_groups_never_mixed_random(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 50, size=rng.integers(1, 12)).tolist() for _ in range(60)]
    write_doc_tokens(tmp_path / "docs", docs, np.uint16)
    store = DocTokens(tmp_path / "docs")
    groups = rng.integers(0, 5, size=60)
    paths = np.arange(10).reshape(5, 2) * 10  # array form: row g is group g's path
    pack_sequences(store, np.arange(60), 7, EOS, tmp_path / "p", group_of_doc=groups, path_of_group=paths, depth=2)
    ds = PackedDataset(tmp_path / "p")
    b = ds.batch(np.arange(len(ds)))
    rows_groups = ds.groups.tolist()
    assert rows_groups == sorted(rows_groups)
    for g in range(5):  # each group's rows, unpacked, equal its docs (+eos) in order
        rows = np.flatnonzero(ds.groups == g)
        stream = [t for r in rows for t, s in zip(ds.tokens[r], ds.segments[r]) if s != P]
        assert stream == [t for i in np.flatnonzero(groups == g) for t in docs[i] + [EOS]]
        assert (b["paths"][rows] == torch.tensor(paths[g])).all()
    # Any unmasked target is the next token of the same document.
    m = b["targets"] != -100
    assert (b["targets"][m] == torch.from_numpy(ds.tokens[:, 1:].astype(np.int64))[m]).all()


def test_attention_mask_matches_reference():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 1, 2, 2, -1, -1], [0, 0, 0, 0, 0, 0]])
    mask = document_mask(seg, "sdpa")  # dense: some rows hold several documents or padding
    assert mask.shape == (3, 1, 6, 6) and mask.dtype == torch.bool
    for b in range(3):
        for i in range(6):
            for j in range(6):
                s_i, s_j = seg[b, i].item(), seg[b, j].item()
                want = (s_i == s_j and j <= i and s_j >= 0) if s_i >= 0 else (i == j)
                assert mask[b, 0, i, j].item() == want, (b, i, j)
    # Usable by SDPA without NaN, padding rows included.
    q = torch.randn(3, 1, 6, 4)
    out = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert torch.isfinite(out).all()
    # a batch whose every row is one whole document needs no mask: plain causal attention
    assert document_mask(seg[2:], "sdpa") is None
    causal = torch.nn.functional.scaled_dot_product_attention(q[2:], q[2:], q[2:], is_causal=True)
    torch.testing.assert_close(causal, out[2:])


def test_sampler_epochs_cover_everything():
    s = BatchSampler(10, 4, seed=3)
    assert s.batches_per_epoch == 3
    it = iter(s)
    epoch0 = [next(it) for _ in range(3)]
    assert [len(b) for b in epoch0] == [4, 4, 2]
    assert sorted(np.concatenate(epoch0).tolist()) == list(range(10))
    assert np.concatenate(epoch0).tolist() == np.random.default_rng(3).permutation(10).tolist()
    epoch1 = np.concatenate([next(it) for _ in range(3)])
    assert epoch1.tolist() == np.random.default_rng(4).permutation(10).tolist()
    assert s.state_dict() == {"epoch": 1, "cursor": 10, "seed": 3, "n": 10}
    d = BatchSampler(10, 4, seed=3, drop_last=True)
    assert d.batches_per_epoch == 2
    it = iter(d)
    assert [len(next(it)) for _ in range(4)] == [4, 4, 4, 4]


def test_sampler_exact_resume():
    ref = iter(BatchSampler(11, 3, seed=5))
    expected = [next(ref).tolist() for _ in range(12)]
    s = BatchSampler(11, 3, seed=5)
    it = iter(s)
    got = [next(it).tolist() for _ in range(5)]  # stop mid epoch 1
    state = json.loads(json.dumps(s.state_dict()))  # survives a JSON checkpoint
    resumed = BatchSampler(11, 3, seed=0)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    got += [next(it2).tolist() for _ in range(7)]
    assert got == expected
    with pytest.raises(HiermemError, match="dataset of 11 sequences, this one has 12"):
        BatchSampler(12, 3).load_state_dict(state)


def test_atomic_failure_leaves_no_output(store, tmp_path):
    class Broken(DocTokens):
        def __getitem__(self, i):
            if i == 3:
                raise OSError("disk on fire")
            return super().__getitem__(i)

    broken = Broken(tmp_path / "docs")
    with pytest.raises(OSError, match="disk on fire"):
        pack_sequences(broken, np.arange(4), 4, EOS, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["docs"]  # no temp folder left either

    def gen():
        yield [1, 2]
        raise RuntimeError("tokenizer crashed")

    with pytest.raises(RuntimeError):
        write_doc_tokens(tmp_path / "docs2", gen(), np.uint16)
    assert [p.name for p in tmp_path.iterdir()] == ["docs"]
    # A failure does not clobber a previous good output either.
    pack_sequences(store, np.arange(4), 4, EOS, tmp_path / "out")
    with pytest.raises(OSError):
        pack_sequences(broken, np.arange(4), 4, EOS, tmp_path / "out")
    assert len(PackedDataset(tmp_path / "out")) == 4


def test_bad_inputs(store, tmp_path):
    with pytest.raises(HiermemError, match="nothing to pack"):
        pack_sequences(store, np.array([4]), 4, EOS, tmp_path / "o")
    with pytest.raises(ValueError, match="no path for group 9"):
        pack_sequences(store, np.array([0]), 4, EOS, tmp_path / "o", np.array([9]), {1: (0,)}, depth=1)
    with pytest.raises(ValueError, match="group_of_doc has 1 entries"):
        pack_sequences(store, np.array([0, 1]), 4, EOS, tmp_path / "o", np.array([9]))
    with pytest.raises(HiermemError, match="no such packed-data folder"):
        PackedDataset(tmp_path / "missing")
    assert not (tmp_path / "o").exists()


def test_depth_zero_paths(store, tmp_path):
    pack_sequences(store, np.arange(5), 8, EOS, tmp_path / "p")
    ds = PackedDataset(tmp_path / "p")
    assert np.load(tmp_path / "p" / "paths.npy").shape == (len(ds), 0)
    assert ds.batch([0])["paths"].shape == (1, 0)
