import hashlib
import json

import numpy as np
import pytest
import torch
from traced import traced_peak

from hiermem.data.packing import (
    PAD_SEGMENT,
    BatchSampler,
    DocTokens,
    PackedDataset,
    best_fit_decreasing,
    pack_sequences,
    token_dtype,
    write_doc_tokens,
)
from hiermem.data.prepare import DataDir
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


def test_sampler_order_in_a_file_is_the_same_order_and_not_held_in_ram(tmp_path, monkeypatch):
    """With a work_dir the order of a large dataset is shuffled in a memory-mapped file: the same batches, epoch
    after epoch, nothing left in the folder, and tracemalloc's peak for the first batch does not grow with the
    rows (in RAM it holds 8 bytes a row: +2.4 MB from 100k to 400k rows)."""
    monkeypatch.setattr("hiermem.data.npyfile.MMAP_ORDER_ROWS", 0)
    ref, filed = iter(BatchSampler(1001, 64, seed=3)), iter(BatchSampler(1001, 64, seed=3, work_dir=tmp_path))
    assert [next(ref).tolist() for _ in range(40)] == [next(filed).tolist() for _ in range(40)]  # 2.5 epochs
    assert list(tmp_path.iterdir()) == []
    peaks = {n: traced_peak(lambda: next(iter(BatchSampler(n, 64, seed=0, work_dir=tmp_path))))
             for n in (1000, 100_000, 400_000)}  # the first builds numpy's caches
    assert peaks[400_000] - peaks[100_000] < 100_000, peaks
    in_ram = {n: traced_peak(lambda: next(iter(BatchSampler(n, 64, seed=0)))) for n in (100_000, 400_000)}
    assert in_ram[400_000] - in_ram[100_000] > 2_000_000, in_ram  # what the test would see without the file


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


# --- packing algorithms --------------------------------------------------------------------------------


def _digest(folder) -> str:
    h = hashlib.sha256()
    for name in ("tokens", "segments", "groups", "paths"):
        a = np.load(folder / f"{name}.npy")
        h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("chunk", [1 << 16, 7])
def test_concat_bit_identical_to_before(tmp_path, monkeypatch, chunk):
    # digests of the arrays written by the packer before packing algos existed (same inputs, same seed), also
    # when the documents are read a few at a time
    monkeypatch.setattr("hiermem.data.packing.PACK_CHUNK", chunk)
    rng = np.random.default_rng(42)
    docs = [rng.integers(2, 500, size=rng.integers(0, 40)).tolist() for _ in range(300)]
    write_doc_tokens(tmp_path / "docs", docs, np.uint16)
    store = DocTokens(tmp_path / "docs")
    groups, paths = rng.integers(0, 6, size=300), np.arange(12).reshape(6, 2)
    pack_sequences(store, np.arange(300), 16, EOS, tmp_path / "p", group_of_doc=groups, path_of_group=paths,
                   depth=2, pad_id=PAD, algo="concat")
    assert _digest(tmp_path / "p") == "abac33820b54f1f815c79da5801b11e6f6d84b4ae13d47e186705fb9cb150596"
    pack_sequences(store, rng.permutation(300)[:200], 9, EOS, tmp_path / "q")  # the default is concat
    assert _digest(tmp_path / "q") == "7aa32f8a81f06b60bdcef169df59c8a0ee2732ba4fa109d36060b43148df0abf"
    assert json.loads((tmp_path / "q" / "meta.json").read_text())["packing_algo"] == "concat"


def test_concat_stats(packed):
    meta = json.loads((packed / "meta.json").read_text())
    # 16 tokens in 4 rows of 5; doc 2 (positions 4-6) and doc 3 (7-13) cross a row boundary
    assert meta["padding_fraction"] == pytest.approx(1 - 16 / 20) and meta["n_docs_split"] == 2
    assert PackedDataset(packed).packing_stats() == {"algo": "concat", "rows": 4, "tokens": 16,
                                                     "padding_fraction": pytest.approx(0.2), "docs_split": 2}


def test_best_fit_layout_by_hand(store, tmp_path):
    pack_sequences(
        store, np.array([0, 1, 2, 3, 4]), seq_len=4, eos_id=EOS, out_dir=tmp_path / "bf",
        group_of_doc=np.array([7, 3, 7, 7, 7]), path_of_group={7: (1, 2), 3: (4, 5)}, depth=2, pad_id=PAD,
        algo="best_fit",
    )
    ds = PackedDataset(tmp_path / "bf")
    # Group 7's pieces, longest first: doc 3's first chunk (5), doc 0 (4), doc 2 (3), doc 3's tail "35 E" (2),
    # which goes to the row with the least room that holds it (doc 2's, room 2), not doc 0's (room 1).
    assert ds.tokens.tolist() == [
        [40, EOS, PAD, PAD, PAD],
        [30, 31, 32, 33, 34],
        [10, 11, 12, EOS, PAD],
        [20, 21, EOS, 35, EOS],
    ]
    assert ds.segments.tolist() == [[0, 0, P, P, P], [0, 0, 0, 0, 0], [0, 0, 0, 0, P], [0, 0, 0, 1, 1]]
    assert ds.groups.tolist() == [3, 7, 7, 7] and ds.paths.tolist() == [[4, 5], [1, 2], [1, 2], [1, 2]]
    b = ds.batch([3])
    assert b["positions"].tolist() == [[0, 1, 2, 0]] and b["targets"].tolist() == [[21, EOS, -100, EOS]]
    assert ds.packing_stats() == {"algo": "best_fit", "rows": 4, "tokens": 16,
                                  "padding_fraction": pytest.approx(0.2), "docs_split": 1}


def _unique_token_corpus(tmp_path, n_docs, max_len, seed):
    """Documents whose token ids encode (document, offset): id = 1000 * doc + offset + 2 (0 = pad, 1 = eos)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len + 1, size=n_docs)
    docs = [1000 * d + np.arange(n) + 2 for d, n in enumerate(lengths)]
    write_doc_tokens(tmp_path / "docs", docs, np.uint32)
    return DocTokens(tmp_path / "docs"), lengths, rng


@pytest.mark.parametrize("window", [1 << 20, 37])
def test_best_fit_keeps_documents_whole(tmp_path, monkeypatch, window):
    """Also when a group's documents are placed one window at a time."""
    monkeypatch.setattr("hiermem.data.packing.BEST_FIT_WINDOW", window)
    seq_len = 15
    L = seq_len + 1
    store, lengths, rng = _unique_token_corpus(tmp_path, 400, 40, seed=1)
    doc_index = rng.permutation(400)[:350]
    groups = rng.integers(0, 5, size=350)
    group_of = dict(zip(doc_index.tolist(), groups.tolist()))
    paths = np.arange(10).reshape(5, 2) + 100
    args = dict(group_of_doc=groups, path_of_group=paths, depth=2, pad_id=PAD, algo="best_fit")
    pack_sequences(store, doc_index, seq_len, EOS, tmp_path / "a", **args)
    pack_sequences(store, doc_index, seq_len, EOS, tmp_path / "b", **args)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # deterministic
    ds = PackedDataset(tmp_path / "a")
    assert ds.tokens.shape == (len(ds), L)  # no row holds more than seq_len + 1 tokens

    seen = []  # (doc, offset) of every non-eos token; eos counted per document
    eos_of = []
    for r in range(len(ds)):
        tok, seg = ds.tokens[r].tolist(), ds.segments[r].tolist()
        n_used = sum(s != P for s in seg)
        assert all(s == P for s in seg[n_used:]) and all(t == PAD for t in tok[n_used:])  # padding: the tail
        runs = np.split(np.arange(n_used), np.flatnonzero(np.diff(seg[:n_used])) + 1)
        assert [seg[run[0]] for run in runs] == list(range(len(runs)))
        for run in runs:
            piece = [tok[i] for i in run]
            body = piece[:-1] if piece[-1] == EOS else piece
            if not body:  # a chunk holding only a long document's eos: the document is known by elimination
                eos_of.append(None)
                continue
            d, first = divmod(body[0] - 2, 1000)
            assert body == [1000 * d + first + 2 + i for i in range(len(body))]  # one contiguous slice
            if piece[-1] == EOS:  # eos exactly at the doc's end; any other piece is a full row-sized chunk
                assert first + len(body) == lengths[d]
            else:
                assert len(piece) == L
            assert first % L == 0  # pieces start at a row-sized chunk boundary
            if lengths[d] + 1 <= L:  # a document that fits is whole, from position 0 of its run
                assert first == 0 and piece[-1] == EOS
            assert group_of[d] == ds.groups[r] and ds.paths[r].tolist() == paths[group_of[d]].tolist()
            seen += [(d, first + i) for i in range(len(body))]
            if piece[-1] == EOS:
                eos_of.append(d)
    kept = [d for d in doc_index.tolist() if lengths[d] > 0]
    assert sorted(seen) == sorted((d, o) for d in kept for o in range(lengths[d]))  # every token exactly once
    assert sorted(d for d in eos_of if d is not None) == sorted(d for d in kept if (lengths[d] + 1) % L != 1)
    assert eos_of.count(None) == sum((lengths[d] + 1) % L == 1 for d in kept)
    stats = ds.packing_stats()
    assert stats["docs_split"] == sum(lengths[d] + 1 > L for d in kept) > 0
    assert stats["tokens"] == sum(lengths[d] + 1 for d in kept)
    assert stats["padding_fraction"] == pytest.approx(1 - stats["tokens"] / (len(ds) * L))


@pytest.mark.parametrize("algo,window", [("concat", 1 << 20), ("best_fit", 1 << 20), ("best_fit", 37)])
def test_row_tokens_file_equals_the_count_of_segments(tmp_path, monkeypatch, algo, window):
    """row_tokens.npy (what a data-sharded run plans from) holds each row's non-padding tokens, as counted
    from the segments; a folder packed before the file existed is counted from its segments instead."""
    monkeypatch.setattr("hiermem.data.packing.BEST_FIT_WINDOW", window)
    store, lengths, rng = _unique_token_corpus(tmp_path, 300, 40, seed=3)
    groups = rng.integers(0, 4, size=300)
    pack_sequences(store, np.arange(300), 15, EOS, tmp_path / "p", group_of_doc=groups,
                   path_of_group=np.arange(8).reshape(4, 2), depth=2, pad_id=PAD, algo=algo)
    ds = PackedDataset(tmp_path / "p")
    counted = (np.asarray(ds.segments) != P).sum(axis=1)
    assert ds.fill is not None and ds.fill.dtype == np.int32
    assert np.array_equal(ds.row_tokens(0, len(ds)), counted) and counted.min() < 16  # some rows are padded
    assert np.array_equal(ds.row_tokens(5, 9), counted[5:9]) and ds.row_tokens(0, 10**9).sum() == ds.n_tokens
    (tmp_path / "p" / "row_tokens.npy").unlink()
    old = PackedDataset(tmp_path / "p")
    assert old.fill is None and np.array_equal(old.row_tokens(0, len(old), chunk=7), counted)


def test_best_fit_decreasing_by_hand():
    # 7 opens bin 0 (room 3); 5 opens bin 1 (room 5); 4 -> bin 1 (room 1); 3 -> bin 0 (full);
    # 2 fits nowhere -> bin 2; 1 -> bin 1, the least room that holds it
    bins, offsets, n = best_fit_decreasing(np.array([7, 5, 4, 3, 2, 1]), 10)
    assert bins.tolist() == [0, 1, 1, 0, 2, 1] and offsets.tolist() == [0, 0, 5, 7, 0, 9] and n == 3
    # ties: equal lengths keep their order, equal rooms go to the lower bin
    bins, offsets, n = best_fit_decreasing(np.array([3, 3, 3, 6, 6]), 10)
    assert bins.tolist() == [0, 1, 2, 0, 1] and offsets.tolist() == [6, 6, 0, 0, 0] and n == 3
    with pytest.raises(ValueError, match=r"item lengths must be in \[1, 10\]"):
        best_fit_decreasing(np.array([11]), 10)


def _reference_best_fit_decreasing(lengths, capacity):
    """Plain O(n^2): scan every bin for the least room that holds the item."""
    rooms, bins, offsets = [], [0] * len(lengths), [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b, room in enumerate(rooms) if room >= lengths[i]]
        b = min(fits, key=lambda b: (rooms[b], b)) if fits else len(rooms)
        if not fits:
            rooms.append(capacity)
        bins[i], offsets[i] = b, capacity - rooms[b]
        rooms[b] -= lengths[i]
    return bins, offsets, len(rooms)


def test_best_fit_decreasing_matches_reference():
    rng = np.random.default_rng(7)
    for trial in range(40):
        capacity = int(rng.integers(1, 100))
        hi = int(rng.integers(1, capacity + 1))  # short items in some trials, up to a full bin in others
        lengths = rng.integers(1, hi + 1, size=int(rng.integers(0, 250)))
        bins, offsets, n = best_fit_decreasing(lengths, capacity)
        assert (bins.tolist(), offsets.tolist(), n) == _reference_best_fit_decreasing(lengths.tolist(), capacity)


def test_packing_algo_cache_key_and_bad_algo(store, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "prepare.json").write_text("{}")
    data = DataDir(tmp_path / "data")
    concat = data.packed_path("train", 48)
    assert concat.name == "train-" + hashlib.sha256(b"train:48:flat").hexdigest()[:12]  # the key before algos
    assert data.packed_path("train", 48, algo="concat") == concat
    assert data.packed_path("train", 48, algo="best_fit") != concat
    with pytest.raises(ValueError, match="algo must be one of concat, best_fit, got 'nope'"):
        pack_sequences(store, np.arange(4), 4, EOS, tmp_path / "o", algo="nope")


@pytest.mark.parametrize("algo", ["concat", "best_fit"])
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path, monkeypatch, algo):
    """tracemalloc (Python objects and numpy buffers; memory-mapped files are not allocations) over packing
    2,000 and 8,000 documents into 4 groups, the selection and groups given as memory-mapped arrays. The
    chunk and window are shrunk below the corpus, so anything held per document or per row would show.
    Measured: +4 kB at most now; the packer this replaced grew by 340 kB (concat) and 1.6 MB (best_fit)
    here, its sort keys, lengths and per-piece arrays held for every document."""
    import hiermem.data.packing as packing

    monkeypatch.setattr(packing, "PACK_CHUNK", 256)
    monkeypatch.setattr(packing, "BEST_FIT_WINDOW", 256)

    def peak(n, trace=True):
        rng = np.random.default_rng(n)
        folder = tmp_path / str(n)
        write_doc_tokens(folder / "docs", (rng.integers(2, 500, size=rng.integers(0, 30)) for _ in range(n)),
                         np.uint16)
        np.save(folder / "index.npy", rng.permutation(n))
        np.save(folder / "groups.npy", rng.integers(0, 4, size=n))
        store = DocTokens(folder / "docs")
        index, groups = (np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("index", "groups"))
        args = (store, index, 15, EOS, folder / "p")
        kwargs = dict(group_of_doc=groups, path_of_group=np.arange(8).reshape(4, 2), depth=2, algo=algo)
        return traced_peak(pack_sequences, *args, **kwargs) if trace else pack_sequences(*args, **kwargs)

    peak(300, trace=False)  # warm up (lazy imports, caches)
    small, large = peak(2000), peak(8000)
    assert large - small < 60_000, (small, large)
