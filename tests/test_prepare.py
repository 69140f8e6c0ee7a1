import json
import random

import numpy as np
import pytest

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
    assert sorted(p.name for p in data.path.iterdir()) == [
        "doc_tokens", "documents.jsonl", "prepare.json", "split.npy", "tokenizer.json"]

    # documents, in order, with their ids
    docs = data.documents()
    assert [(d.id, d.text) for d in docs] == [(r["id"], r["text"]) for r in rows]
    assert data.n_docs == len(rows) == data.meta["n_docs"]

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
    monkeypatch.setattr(prepare_mod, "read_documents", no_retrain)
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
    """A forced rebuild that dies after rewriting the token store must not leave the old prepare.json
    claiming the folder is complete (it would describe other tokens)."""
    path, _ = corpus
    prepare(cfg_for(tmp_path, path))
    other_path = tmp_path / "other.jsonl"
    write_corpus(other_path, n=40, seed=2)

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(prepare_mod, "atomic_save_npy", crash)
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
    leaves = clustering.doc_paths[:, -1]
    assert set(batch["paths"][:, -1].tolist()) <= set(leaves.tolist())
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
