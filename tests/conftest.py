"""Shared fixtures: small corpora and a tiny trained memory run, built once per test session."""

import contextlib
import json
import random

import pytest
import torch

TOPICS = {
    "sea": "ship harbour sail wave anchor captain tide coast fishing boat island port".split(),
    "mountain": "peak snow glacier climb ridge summit valley rock alpine trail cliff pass".split(),
    "city": "street tram market square tower bridge cafe office crowd museum station avenue".split(),
    "farm": "wheat barn cattle harvest tractor field orchard sheep plough meadow hay farmer".split(),
}

# A configuration small enough to train a few steps in about a second on one CPU core.
TINY_OVERRIDES = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.head_dim=16", "model.d_ff=128",
    "model.max_seq_len=64", "data.seq_len=64", "data.vocab_size=512", "routing.encoder=wordllama",
    "memory.ranks=[8,8]", "train.batch_size=8", "train.warmup_steps=2", "train.log_every=1",
    "train.device=cpu",
]


@contextlib.contextmanager
def torch_threads(n):
    """Run torch on n threads, then restore. On a shared 2-core machine, torch's default 2 threads spin against
    other processes: the training and evaluation tests run about 3x faster on one thread under load."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def one_thread():
    with torch_threads(1):
        yield


def write_topic_corpus(path, n=320, seed=0):
    """Short documents drawn from four disjoint vocabularies (so clustering has structure to find)."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    rows = []
    for i in range(n):
        words = TOPICS[names[i % len(names)]]
        text = " ".join(rng.choice(words) for _ in range(rng.randint(6, 16))).capitalize() + "."
        rows.append({"id": f"t{i}", "text": text})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


@pytest.fixture(scope="session")
def longtail_dir(tmp_path_factory):
    """A small long-tail corpus folder (corpus.jsonl, probes*.jsonl, entities.json)."""
    from hiermem_experiments.longtail.corpus import LongTailConfig, build_corpus, write_corpus

    out = tmp_path_factory.mktemp("longtail")
    write_corpus(build_corpus(LongTailConfig(n_entities=30, n_unseen=6, n_background=40)), out)
    return out


@pytest.fixture(scope="session")
def longtail_data(longtail_dir, tmp_path_factory):
    """Prepared and clustered (wordllama) data dir; returns the overrides that point at it."""
    from hiermem.config import load_config
    from hiermem.data.prepare import prepare
    from hiermem.routing.clustering import ensure_clustered

    data_dir = tmp_path_factory.mktemp("data") / "longtail"
    overrides = [f"data.corpus={longtail_dir / 'corpus.jsonl'}", f"data.dir={data_dir}", *TINY_OVERRIDES]
    cfg = load_config("tiny", overrides)
    with torch_threads(1):
        ensure_clustered(cfg, prepare(cfg), progress=False)
    return overrides


@pytest.fixture(scope="session")
def memory_run(longtail_data, tmp_path_factory):
    """A finished scratch-mode memory run (anchor + bank) on the long-tail data."""
    from hiermem.config import load_config
    from hiermem.train.loop import train

    run_dir = tmp_path_factory.mktemp("runs") / "mem"
    cfg = load_config("tiny", [*longtail_data, "train.mode=scratch", "train.max_steps=15", "train.lr=3e-3",
                               "memory.lr=3e-2", f"train.run_dir={run_dir}"])
    with torch_threads(1):
        train(cfg, progress=False)
    return run_dir
