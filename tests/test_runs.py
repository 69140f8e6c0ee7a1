"""runs.py: config resolution, parameter accounting, packed-data caching (also under concurrent writers)."""

import fcntl
import multiprocessing as mp

import numpy as np
import pytest

from hiermem.config import load_config
from hiermem.data.prepare import DataDir
from hiermem.errors import HiermemError
from hiermem.runs import Run, ensure_packed, load_clustering, packed_dir, parameter_report, resolve_vocab


class _Tok:
    vocab_size = 3000


def test_resolve_vocab_rounds_up_and_refuses_a_smaller_model():
    cfg = load_config("tiny")
    resolve_vocab(cfg, _Tok())
    assert cfg.model.vocab_size == 3008
    cfg.model.vocab_size = 2048
    with pytest.raises(HiermemError, match="model.vocab_size=2048 is smaller than the tokenizer's 3000"):
        resolve_vocab(cfg, _Tok())


def test_parameter_report_reproduces_the_paper_headline():
    cfg = load_config("paper-160m")
    report = parameter_report(cfg)
    assert report == {"anchor": 163_510_016, "fetched": 18_063_360, "bank": 4_624_220_160,
                      "generic": 18_063_360}
    assert "bank" not in parameter_report(load_config("paper-160m", ["train.mode=anchor"]))


def _pack(overrides, leaf):
    cfg = load_config("tiny", overrides)
    data = DataDir(cfg.data_dir)
    clustering = load_clustering(data, cfg, required=True) if leaf else None
    return len(ensure_packed(data, cfg, clustering, "train"))


def test_concurrent_packing_waits_for_the_writer(longtail_data):
    """Two trainings starting together on one data dir (the demo's parallel jobs) must not both pack: the
    second waits on the lock, then reuses the first one's output."""
    overrides = [*longtail_data, "data.seq_len=48"]  # a key no other test has packed yet
    cfg = load_config("tiny", overrides)
    out = packed_dir(DataDir(cfg.data_dir), cfg, None, "train")
    out.parent.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # we are "the other writer"
        child = ctx.Process(target=_pack, args=(overrides, False))
        child.start()
        child.join(timeout=8)
        assert child.is_alive() and not out.exists()  # blocked on our lock, wrote nothing
    child.join(timeout=60)
    assert child.exitcode == 0 and (out / "meta.json").is_file()
    assert _pack(overrides, False) > 0  # cached now


def test_leaf_packing_keeps_one_path_per_sequence(longtail_data):
    cfg = load_config("tiny", longtail_data)
    data = DataDir(cfg.data_dir)
    clustering = load_clustering(data, cfg, required=True)
    ds = ensure_packed(data, cfg, clustering, "train")
    batch = ds.batch(np.arange(len(ds)))
    leaves = clustering.doc_paths[:, -1]
    assert set(batch["paths"][:, -1].tolist()) <= set(leaves.tolist())
    assert batch["paths"].shape[1] == clustering.tree.depth


def test_run_refuses_data_from_another_tokenizer(memory_run, tmp_path):
    run = Run(memory_run, device="cpu")
    corpus = tmp_path / "other.jsonl"
    corpus.write_text("".join(f'{{"text": "other words number {i} here"}}\n' for i in range(50)))
    from hiermem.data.prepare import prepare

    other = prepare(load_config("tiny", [f"data.corpus={corpus}", f"data.dir={tmp_path / 'd'}",
                                         "data.vocab_size=300"]))
    with pytest.raises(HiermemError, match="tokenised with another tokenizer"):
        run.check_data(other)
