import json
import random

import numpy as np
import pytest
from traced import traced_peak

import hiermem.data.prepare as prepare_mod
from hiermem.config import load_config
from hiermem.data.prepare import DataDir, prepare, split_mask
from hiermem.data.tokenizer import Tokenizer
from hiermem.errors import HiermemError

WORDS = ("river stone market harbour castle village winter summer bridge tower garden north south east west "
         "old new small large quiet busy green grey golden silver ancient modern").split()


def write_corpus(path, n=300, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."
        rows.append({"id": f"d{i}", "text": text})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def cfg_for(tmp_path, corpus, *extra):
    return load_config("tiny", [f"data.corpus={corpus}", f"data.dir={tmp_path / 'data'}", "data.vocab_size=320",
                                "data.val_fraction=0.1", *extra])


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    return path, write_corpus(path)


def test_prepare_writes_a_complete_data_dir(tmp_path, corpus):
    path, rows = corpus
    cfg = cfg_for(tmp_path, path)
    data = prepare(cfg)
    assert data.path == tmp_path / "data"
    assert sorted(p.name for p in data.path.iterdir() if not p.name.startswith(".")) == [
        "doc_tokens", "index", "prepare.json", "split.npy", "tokenizer.json"]
    assert not (data.path / ".prepare").exists()  # the resume state is gone once the folder is complete

    # documents, in order, with their ids (read from the corpus through the index)
    docs = data.documents()
    assert [(d.id, d.text) for d in docs] == [(r["id"], r["text"]) for r in rows]
    assert data.n_docs == len(rows) == data.meta["n_docs"]
    assert data.ids() == [r["id"] for r in rows]
    assert [len(b) for b in data.iter_texts(128)] == [128, 128, 44]
    assert [t for b in data.iter_texts(128) for t in b] == data.texts() == [r["text"] for r in rows]
    assert data.texts_at([299, 0, 7, 7]) == [rows[i]["text"] for i in (299, 0, 7, 7)]
    assert [len(b) for b in data.iter_texts(128, start=250)] == [50]
    assert next(data.iter_texts(2, start=298)) == [rows[298]["text"], rows[299]["text"]]
    assert data.ids_at([5]) == ["d5"]

    # the split: seeded, the asked fraction, recorded in the meta
    is_val = data.is_val()
    assert is_val.dtype == bool and is_val.shape == (len(rows),)
    assert int(is_val.sum()) == data.meta["n_val"] == round(0.1 * len(rows))
    np.testing.assert_array_equal(is_val, split_mask(len(rows), 0.1, cfg.data.seed))

    # tokenizer: the asked size at most, round trip, and the token store holds exactly its encodings
    tok = data.tokenizer()
    assert 257 < tok.vocab_size <= 320 and data.meta["vocab_size"] == tok.vocab_size
    assert data.meta["tokenizer_fingerprint"] == tok.fingerprint()
    store = data.doc_tokens()
    assert len(store) == len(rows)
    expected = [tok.encode(r["text"]) for r in rows]
    for i, ids in enumerate(expected):
        assert store[i].tolist() == ids
        assert tok.decode(store[i]) == rows[i]["text"]
    assert data.meta["n_tokens"] == sum(len(e) for e in expected) == int(store.lengths.sum())
    assert tok.eos_id not in np.concatenate([store[i] for i in range(len(store))])


def test_rerun_with_the_same_config_reuses_the_folder(tmp_path, corpus, monkeypatch):
    path, _ = corpus
    first = prepare(cfg_for(tmp_path, path))
    stamp = {p.name: p.stat().st_mtime_ns for p in first.path.rglob("*")}

    def no_retrain(*a, **k):
        raise AssertionError("the tokenizer was retrained on a reuse")

    monkeypatch.setattr(prepare_mod, "train_tokenizer", no_retrain)
    monkeypatch.setattr(prepare_mod, "index_shard", no_retrain)
    monkeypatch.setattr(prepare_mod, "tokenize_shard", no_retrain)
    again = prepare(cfg_for(tmp_path, path))
    assert again.meta == first.meta
    assert {p.name: p.stat().st_mtime_ns for p in again.path.rglob("*")} == stamp


@pytest.mark.parametrize("override,field", [
    ("data.vocab_size=400", "data.vocab_size"),
    ("data.val_fraction=0.2", "data.val_fraction"),
    ("data.seed=3", "data.seed"),
])
def test_another_data_config_is_refused_naming_the_field(tmp_path, corpus, override, field):
    path, _ = corpus
    data = prepare(cfg_for(tmp_path, path))
    before = (data.path / "prepare.json").read_text()
    other = cfg_for(tmp_path, path, override)
    with pytest.raises(HiermemError, match=rf"{data.path}: prepared with another data config: {field} \("):
        prepare(other)
    with pytest.raises(HiermemError, match=field):
        DataDir(data.path).check(other)
    assert (data.path / "prepare.json").read_text() == before  # nothing overwritten


def test_another_corpus_is_refused_and_force_rebuilds(tmp_path, corpus):
    path, _ = corpus
    prepare(cfg_for(tmp_path, path))
    other_path = tmp_path / "other.jsonl"
    other_rows = write_corpus(other_path, n=50, seed=1)
    with pytest.raises(HiermemError, match=r"data\.corpus"):
        prepare(cfg_for(tmp_path, other_path))
    rebuilt = prepare(cfg_for(tmp_path, other_path), force=True)
    assert rebuilt.n_docs == 50 and rebuilt.texts() == [r["text"] for r in other_rows]
    rebuilt.check(cfg_for(tmp_path, other_path))


def test_user_tokenizer_is_used_as_is(tmp_path, corpus):
    path, _ = corpus
    first = prepare(cfg_for(tmp_path, path))
    cfg = load_config("tiny", [f"data.corpus={path}", f"data.dir={tmp_path / 'data2'}",
                               f"data.tokenizer={first.path / 'tokenizer.json'}"])
    second = prepare(cfg)
    assert second.meta["tokenizer_fingerprint"] == first.meta["tokenizer_fingerprint"]
    assert second.meta["n_tokens"] == first.meta["n_tokens"]


def test_malformed_corpus_names_file_and_line_and_writes_nothing(tmp_path, corpus):
    path, _ = corpus
    lines = path.read_text().splitlines()
    lines[6] = '{"id": "broken", "text": "no closing brace"'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(HiermemError, match=rf"^{path}:7: malformed JSON"):
        prepare(cfg_for(tmp_path, path))
    assert not (tmp_path / "data" / "prepare.json").exists()


def test_missing_corpus_and_empty_corpus_setting(tmp_path):
    with pytest.raises(HiermemError, match=r"missing\.jsonl: no such file"):
        prepare(cfg_for(tmp_path, tmp_path / "missing.jsonl"))
    with pytest.raises(HiermemError, match=r"data\.corpus is empty"):
        prepare(load_config("tiny", [f"data.dir={tmp_path / 'd'}"]))
    assert not (tmp_path / "data" / "prepare.json").exists()


def test_failed_rebuild_does_not_leave_a_stale_prepare_json(tmp_path, corpus, monkeypatch):
    """A forced rebuild that dies while it rewrites the token store must not leave the old prepare.json
    claiming the folder is complete (it would describe other tokens)."""
    path, _ = corpus
    prepare(cfg_for(tmp_path, path))
    other_path = tmp_path / "other.jsonl"
    write_corpus(other_path, n=40, seed=2)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(prepare_mod, "tokenize_shard", crash)
    with pytest.raises(OSError):
        prepare(cfg_for(tmp_path, other_path), force=True)
    assert not (tmp_path / "data" / "prepare.json").exists()
    with pytest.raises(HiermemError, match="not a prepared data directory"):
        DataDir(tmp_path / "data")


def test_tokenizer_round_trip_on_unseen_text(tmp_path, corpus):
    path, _ = corpus
    tok = Tokenizer.load(prepare(cfg_for(tmp_path, path)).path / "tokenizer.json")
    for text in ("Ünïcode and never seen words: 東京 🎉", "  spaces\tand\nnewlines  "):
        assert tok.decode(tok.encode(text)) == text



def _pack(overrides, leaf):
    from hiermem.routing.clustering import load_clustering

    cfg = load_config("tiny", overrides)
    data = DataDir(cfg.data_dir)
    if leaf:
        c = load_clustering(data, cfg, required=True)
        return len(data.packed("train", cfg.data.seq_len, c.doc_paths, c.tree.fingerprint()))
    return len(data.packed("train", cfg.data.seq_len))


def test_concurrent_packing_waits_for_the_writer(longtail_data):
    """Two trainings starting together on one data dir (the demo's parallel jobs) must not both pack: the
    second waits on the lock, then reuses the first one's output."""
    import fcntl
    import multiprocessing as mp

    overrides = [*longtail_data, "data.seq_len=48"]  # a key no other test has packed yet
    cfg = load_config("tiny", overrides)
    out = DataDir(cfg.data_dir).packed_path("train", 48)
    out.parent.mkdir(parents=True, exist_ok=True)
    child = mp.get_context("spawn").Process(target=_pack, args=(overrides, False))
    with open(out.parent / f".{out.name}.lock", "w") as lock:  # we are "the other writer"
        fcntl.flock(lock, fcntl.LOCK_EX)
        child.start()
        child.join(timeout=8)
        assert child.is_alive() and not out.exists()  # blocked on our lock, wrote nothing
    child.join(timeout=60)
    assert child.exitcode == 0 and (out / "meta.json").is_file()
    assert _pack(overrides, False) > 0  # cached now


def test_leaf_packing_keeps_one_path_per_sequence(longtail_data):
    from hiermem.routing.clustering import load_clustering

    cfg = load_config("tiny", longtail_data)
    data = DataDir(cfg.data_dir)
    clustering = load_clustering(data, cfg, required=True)
    ds = data.packed("train", cfg.data.seq_len, clustering.doc_paths, clustering.tree.fingerprint())
    batch = ds.batch(np.arange(len(ds)))
    assert isinstance(clustering.doc_paths, np.memmap)  # not read into RAM (a billion documents: 32 GB)
    train_paths = np.asarray(clustering.doc_paths)[~data.is_val()]
    by_leaf = {int(p[-1]): tuple(p) for p in train_paths.tolist()}  # every row: its leaf's documents' path
    assert {int(p[-1]): tuple(p) for p in batch["paths"].tolist()} == by_leaf
    assert batch["paths"].shape[1] == clustering.tree.depth


def test_a_relative_tokenizer_path_names_the_same_data_as_its_absolute_form(tmp_path, monkeypatch):
    """prepare with data.tokenizer=tok.json (relative), then train with the same arguments: the trainer
    resolves paths before it checks the data directory, so both must describe the same data."""
    from hiermem.config import resolve_paths

    corpus = tmp_path / "docs.jsonl"
    write_corpus(corpus, n=60)
    tok_dir = tmp_path / "first"
    prepare(load_config("tiny", [f"data.corpus={corpus}", f"data.dir={tok_dir}", "data.vocab_size=300"]))
    monkeypatch.chdir(tmp_path)
    args = [f"data.corpus={corpus}", "data.dir=d", "data.tokenizer=first/tokenizer.json"]
    data = prepare(load_config("tiny", args))
    data.check(resolve_paths(load_config("tiny", args)))  # no "prepared with another data config"


# --- streaming prepare: shards, workers, resume, bounded memory ----------------------------------------


def _text(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."


def write_mixed_corpus(root, n=40, seed=0):
    """A folder with a shard of every format; returns the texts in corpus order."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    shards = [[_text(rng) for _ in range(n)] for _ in range(5)]
    lines = [("".join(json.dumps({"text": t}) + "\n" for t in s)).encode() for s in shards[:3]]
    (root / "a.jsonl").write_bytes(lines[0])
    (root / "b.jsonl.gz").write_bytes(gzip.compress(lines[1]))
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines[2]))
    pq.write_table(pa.table({"text": shards[3]}), root / "d.parquet", row_group_size=16)
    (root / "e.txt").write_text("\n\n".join(shards[4]) + "\n", encoding="utf-8")
    return [t for s in shards for t in s]


def folder_bytes(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != ".prepare.lock"}


def test_mixed_shards_and_workers_2_give_the_same_data_dir_bit_for_bit(tmp_path):
    root = tmp_path / "corpus"
    texts = write_mixed_corpus(root)
    one = prepare(cfg_for(tmp_path / "one", root))
    assert one.texts() == texts and one.meta["n_shards"] == 5
    store, tok = one.doc_tokens(), one.tokenizer()
    assert [store[i].tolist() for i in range(len(store))] == tok.encode_batch(texts)
    two = prepare(cfg_for(tmp_path / "two", root, "data.workers=2"))
    assert folder_bytes(two.path) == folder_bytes(one.path)  # index, tokens, split, tokenizer, prepare.json


def test_an_interrupted_prepare_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Crashes in the middle of a shard (its first documents already appended, past the progress record), in the
    index stage and then in the tokenising stage: each rerun redoes only unfinished shards, and the result is
    bit-identical to an uninterrupted prepare."""
    root = tmp_path / "corpus"
    write_mixed_corpus(root)
    reference = folder_bytes(prepare(cfg_for(tmp_path / "ref", root)).path)
    cfg = cfg_for(tmp_path / "run", root)
    real_index, real_tokenize = prepare_mod.index_shard, prepare_mod.tokenize_shard
    calls = {"index": [], "tokenize": []}

    def index_shard(writer, s, shard, crash_at=None):
        calls["index"].append(s)
        real_index(writer, s, shard)
        if s == crash_at:
            raise KeyboardInterrupt  # e.g. Ctrl-C: no exception handler of ours may count the shard as done

    def tokenize_shard(enc, index, s, tokens, offsets, total, crash_at=None):
        calls["tokenize"].append(s)
        total = real_tokenize(enc, index, s, tokens, offsets, total)
        if s == crash_at:
            tokens.flush()  # this shard's tokens are on disk, its progress record is not
            raise OSError("killed")
        return total

    monkeypatch.setattr(prepare_mod, "index_shard", lambda *a: index_shard(*a, crash_at=2))
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg)
    assert calls["index"] == [0, 1, 2] and not calls["tokenize"]
    assert not (cfg.data_dir / "prepare.json").exists()

    calls["index"].clear()
    monkeypatch.setattr(prepare_mod, "index_shard", index_shard)
    monkeypatch.setattr(prepare_mod, "tokenize_shard", lambda *a: tokenize_shard(*a, crash_at=1))
    with pytest.raises(OSError, match="killed"):
        prepare(cfg)
    assert calls["index"] == [2, 3, 4] and calls["tokenize"] == [0, 1]
    with pytest.raises(HiermemError, match="not a prepared data directory"):
        DataDir(cfg.data_dir)

    calls["index"].clear(), calls["tokenize"].clear()
    monkeypatch.setattr(prepare_mod, "tokenize_shard", tokenize_shard)
    monkeypatch.setattr(prepare_mod, "train_tokenizer", lambda *a, **k: pytest.fail("tokenizer retrained"))
    data = prepare(cfg)
    assert calls["index"] == [] and calls["tokenize"] == [1, 2, 3, 4]  # shard 0 was not tokenised again
    assert folder_bytes(data.path) == reference


def test_a_rerun_keeps_the_index_of_unchanged_shards_only(tmp_path, monkeypatch):
    def write_shard(path, n, seed):  # default ids: the shard's name and line
        rng = random.Random(seed)
        texts = [_text(rng) for _ in range(n)]
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        return texts

    root = tmp_path / "corpus"
    root.mkdir()
    for k in range(3):
        write_shard(root / f"s{k}.jsonl", 30, k)
    cfg = cfg_for(tmp_path / "run", root)
    real = prepare_mod.index_shard
    calls = []

    def index_shard(writer, s, shard):
        calls.append(s)
        if s == 2 and len(calls) == 3:
            raise OSError("killed")
        real(writer, s, shard)

    monkeypatch.setattr(prepare_mod, "index_shard", index_shard)
    with pytest.raises(OSError):
        prepare(cfg)
    texts = write_shard(root / "s1.jsonl", 20, 9)  # an indexed shard changes before the rerun
    calls.clear()
    data = prepare(cfg)
    assert calls == [1, 2]
    assert data.texts()[30:50] == texts
    assert folder_bytes(data.path) == folder_bytes(prepare(cfg_for(tmp_path / "ref", root)).path)


def test_a_changed_corpus_file_is_refused_when_texts_are_read(tmp_path, corpus):
    import os

    path, rows = corpus
    data = prepare(cfg_for(tmp_path, path))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, touched: cannot be trusted
    with pytest.raises(HiermemError, match=rf"^{path.resolve()}: changed since {data.path} was prepared from it "):
        data.texts_at([0])
    with pytest.raises(HiermemError, match="changed since"):
        next(data.iter_texts())
    assert len(data.doc_tokens()) == len(rows)  # the token store does not depend on the corpus files


def test_the_tokenizer_trains_on_a_prefix_of_the_training_split(tmp_path, corpus):
    from hiermem.data.tokenizer import train_tokenizer

    path, rows = corpus
    cfg = cfg_for(tmp_path, path, "data.tokenizer_sample_bytes=2000")
    data = prepare(cfg)
    train = [r["text"] for r, v in zip(rows, data.is_val()) if not v]
    sizes = np.cumsum([len(t.encode()) for t in train])
    k = int(np.searchsorted(sizes, 2000)) + 1  # the shortest prefix holding 2000 bytes
    assert data.tokenizer().fingerprint() == train_tokenizer(train[:k], 320).fingerprint()
    sample = data.meta["tokenizer_sample"]
    assert (sample["docs"], sample["bytes"], sample["whole_split"]) == (k, int(sizes[k - 1]), False)
    lo, hi = sample["same_for"]
    assert (lo, hi) == (int(sizes[k - 2]) + 1, int(sizes[k - 1]))
    for budget in (lo, hi):  # budgets that select the same documents name the same data
        data.check(cfg_for(tmp_path, path, f"data.tokenizer_sample_bytes={budget}"))
    for budget in (lo - 1, hi + 1):
        with pytest.raises(HiermemError, match=r"data.tokenizer_sample_bytes \(2000 vs \d+: another tokenizer sample"):
            prepare(cfg_for(tmp_path, path, f"data.tokenizer_sample_bytes={budget}"))
    # a corpus under the budget (the default 1 GB): the tokenizer of the whole training split, as before
    whole = prepare(cfg_for(tmp_path / "whole", path))
    assert whole.tokenizer().fingerprint() == train_tokenizer(train, 320).fingerprint()
    assert whole.meta["tokenizer_sample"]["whole_split"]


def test_duplicate_ids_across_shards_are_refused_as_read_documents_refuses_them(tmp_path):
    import gzip

    from hiermem.data.readers import read_documents

    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.jsonl").write_text('{"id": "x", "text": "a"}\n{"id": "y", "text": "b"}\n')
    (root / "b.jsonl.gz").write_bytes(gzip.compress(b'{"id": "z", "text": "c"}\n\n{"id": "y", "text": "d"}\n'))
    with pytest.raises(HiermemError) as expected:
        read_documents(root)
    with pytest.raises(HiermemError) as got:
        prepare(cfg_for(tmp_path, root))
    assert str(got.value) == str(expected.value)
    assert str(got.value).endswith('b.jsonl.gz:3: duplicate id "y" (first seen at ' + str(root / "a.jsonl") + ":2)")
    assert not (tmp_path / "data" / "prepare.json").exists()


def test_write_split_is_split_mask(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_mod, "SPLIT_CHUNK", 7)
    for n in (1, 2, 10, 1001):
        for fraction in (0.0, 0.1, 0.5):
            path = tmp_path / "split.npy"
            n_val = prepare_mod.write_split(path, n, fraction, 3, tmp_path)
            np.testing.assert_array_equal(np.load(path), split_mask(n, fraction, 3))
            assert n_val == int(split_mask(n, fraction, 3).sum())
    assert not (tmp_path / "perm.npy").exists()


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path, monkeypatch):
    """tracemalloc (Python objects and numpy buffers) over a prepare of 1000 and of 4000 documents. Every
    buffer is a constant; they are shrunk below the test corpus, so anything kept per document would show:
    the in-RAM prepare this replaced grew by about 850 kB here."""
    import hiermem.data.npyfile as npyfile
    import hiermem.data.shards as shards

    for mod, name, value in [(shards, "DUP_CHUNK", 256), (shards, "READ_CHUNK", 128), (shards, "FLUSH_DOCS", 128),
                             (npyfile, "BUFFER_ITEMS", 512), (prepare_mod, "SPLIT_CHUNK", 256),
                             (prepare_mod, "BATCH_DOCS", 64)]:
        monkeypatch.setattr(mod, name, value)

    def peak(n, trace=True):
        path = tmp_path / f"c{n}.jsonl"
        write_corpus(path, n=n)
        cfg = cfg_for(tmp_path / f"d{n}", path, "data.tokenizer_sample_bytes=20000")
        return traced_peak(prepare, cfg) if trace else prepare(cfg)

    peak(100, trace=False)  # warm up (lazy imports, caches)
    small, large = peak(1000), peak(4000)
    assert large - small < 100_000, (small, large)


def test_a_data_dir_from_before_the_index_still_reads(tmp_path, corpus):
    """Folders prepared by 0.1.0 hold documents.jsonl instead of index/: they still read (and are reused)."""
    import shutil

    path, rows = corpus
    cfg = cfg_for(tmp_path, path)
    new = prepare(cfg)
    old = tmp_path / "old"
    shutil.copytree(new.path, old)
    shutil.rmtree(old / "index")
    with open(old / "documents.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"id": r["id"], "text": r["text"]}, ensure_ascii=False) + "\n")
    meta = json.loads((old / "prepare.json").read_text())
    for k in ("format", "n_shards", "tokenizer_sample"):
        del meta[k]
    (old / "prepare.json").write_text(json.dumps(meta))
    legacy = DataDir(old)
    legacy.check(cfg)
    assert legacy.documents() == new.documents()
    assert [len(b) for b in legacy.iter_texts(128)] == [128, 128, 44]
    assert next(legacy.iter_texts(2, start=298)) == [rows[298]["text"], rows[299]["text"]]
    assert legacy.texts_at([3, 1, 3]) == new.texts_at([3, 1, 3]) and legacy.ids_at([9]) == ["d9"]


def test_a_resume_whose_files_are_gone_starts_over(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    root.mkdir()
    write_corpus(root / "a.jsonl", n=40, seed=1)
    (root / "b.jsonl").write_text("".join(json.dumps({"text": f"text {i}"}) + "\n" for i in range(30)))
    cfg = cfg_for(tmp_path / "run", root)
    real = prepare_mod.tokenize_shard

    def crash_at_1(enc, index, s, *rest):
        if s == 1:
            raise OSError("killed")
        return real(enc, index, s, *rest)

    monkeypatch.setattr(prepare_mod, "tokenize_shard", crash_at_1)
    with pytest.raises(OSError):
        prepare(cfg)
    (cfg.data_dir / "doc_tokens" / "offsets.npy").unlink()  # progress says shard 0 is in there
    monkeypatch.setattr(prepare_mod, "tokenize_shard", real)
    data = prepare(cfg)
    assert folder_bytes(data.path) == folder_bytes(prepare(cfg_for(tmp_path / "ref", root)).path)
