import json

import numpy as np
import pytest
import torch

from hiermem.config import load_config
from hiermem.data.prepare import DataDir
from hiermem.errors import HiermemError
from hiermem.eval.evaluate import heldout_perplexity
from hiermem.eval.generation import generate_ids
from hiermem.eval.inference import MemoryContext
from hiermem.eval.perplexity import perplexity
from hiermem.model.transformer import Transformer
from hiermem.routing.embedders import WordLlamaEmbedder
from hiermem.routing.routers import make_router
from hiermem.eval.run import Run
from hiermem.memory.fetch import fetch
from hiermem.train.checkpoint import load_weights
from hiermem.train.loop import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.torch_threads


@pytest.fixture(scope="module")
def run(memory_run):
    return Run(memory_run, device="cpu")


@pytest.fixture(scope="module")
def data(run):
    return DataDir(run.cfg.data_dir)


@pytest.fixture(scope="module")
def anchor_alone(run):
    """The run's anchor weights in a plain Transformer: no bank, no routing."""
    model = Transformer(run.cfg.model).eval()
    load_weights(model, run.path / "anchor.safetensors")
    return model


@pytest.fixture(scope="module")
def texts(data, longtail_dir):
    probes = [json.loads(line)["prompt"] for line in (longtail_dir / "probes.jsonl").read_text().splitlines()]
    all_texts = data.texts()
    val = np.flatnonzero(data.is_val())
    return [all_texts[i] for i in val[:6]] + probes[:6] + ["An unrelated sentence about the weather."]


def independent_router(data, name, tree):
    """Router built from the data directory's files directly (not through Run/MemoryContext)."""
    meta = json.loads((data.path / "cluster" / "cluster.json").read_text())
    train = ~np.load(data.path / "split.npy")
    emb = np.load(data.path / meta["embeddings"])[train]
    paths = np.load(data.path / "cluster" / "doc_paths.npy")[train]
    return make_router(name, tree, doc_emb=emb, doc_paths=paths, k=10)


def test_memory_none_is_the_anchor_alone(run, data, anchor_alone, texts):
    ctx = MemoryContext(run, "none")
    assert ctx.memory_for_texts(texts) is None and ctx.memory_for_paths(np.zeros((2, 2), np.int64)) is None
    got = heldout_perplexity(run, ctx, data)
    idx = np.flatnonzero(data.is_val())
    docs = [np.asarray(data.doc_tokens()[i]) for i in idx]
    assert got == perplexity(anchor_alone, docs, run.tokenizer.eos_id, run.cfg.data.seq_len)
    # the trained memory does change the model (so the equality above is not vacuous)
    fetched = heldout_perplexity(run, MemoryContext(run, "fetched", "centroid"), data)
    assert fetched["loss"] != pytest.approx(got["loss"], rel=1e-4)
    prompts = [run.tokenizer.encode(t) for t in texts[6:9]]
    assert generate_ids(run.model, prompts, memory=ctx.memory_for_texts(texts[6:9]), max_new_tokens=6) == \
        generate_ids(anchor_alone, prompts, max_new_tokens=6)


def test_generic_uses_the_generic_block_for_every_sequence(run, texts):
    ctx = MemoryContext(run, "generic")
    w = ctx.memory_for_texts(texts).neurons()
    generic = run.bank.part("generic")[0]
    assert w.shape[0] == len(texts)
    for b in range(len(texts)):
        assert torch.equal(w[b], generic)
    # whatever paths are asked for
    paths = np.array([[1, 5], [3, 13]])
    w = ctx.memory_for_paths(paths).neurons()
    assert torch.equal(w[0], generic) and torch.equal(w[1], generic)
    assert not torch.equal(generic, fetch(run.bank, paths[:1]).memory.neurons()[0])


@pytest.mark.parametrize("router", ["centroid", "knn"])
def test_fetched_uses_the_routed_paths(run, data, texts, router):
    ctx = MemoryContext(run, "fetched", router)
    expected = independent_router(data, router, run.tree).route(WordLlamaEmbedder().encode(texts))
    paths = ctx.route(texts)
    np.testing.assert_array_equal(paths, expected)
    w = ctx.memory_for_texts(texts).neurons()
    assert torch.equal(w, fetch(run.bank, expected).memory.neurons())
    # rows differ where the paths differ: each text gets its own blocks
    other = np.flatnonzero(expected[:, -1] != expected[0, -1])
    assert len(other)  # the texts do not all share one leaf
    assert not torch.equal(w[other[0]], w[0])


@pytest.mark.parametrize("router", ["centroid", "knn"])
def test_a_training_document_routes_to_its_own_path(run, data, router):
    ctx = MemoryContext(run, "fetched", router)
    train_idx = np.flatnonzero(~data.is_val())[:20]
    all_texts = data.texts()
    doc_paths = np.load(data.path / "cluster" / "doc_paths.npy")
    np.testing.assert_array_equal(ctx.route([all_texts[i] for i in train_idx]), doc_paths[train_idx])


@pytest.mark.parametrize("router", ["centroid", "knn"])
@pytest.mark.parametrize("level", [0, 1])
def test_block_level_never_returns_the_blocked_node(run, texts, router, level):
    free = MemoryContext(run, "fetched", router).route(texts)
    ctx = MemoryContext(run, "fetched", router, block_level=level)
    blocked = ctx.route(texts)
    assert (blocked[:, level] != free[:, level]).all()
    assert (blocked[:, 0] == blocked[:, 1] // run.tree.branching).all()  # still root-to-leaf paths
    if router == "centroid" and level == 1:
        np.testing.assert_array_equal(blocked[:, 0], free[:, 0])  # only the blocked level moves
    assert torch.equal(ctx.memory_for_texts(texts).neurons(), fetch(run.bank, blocked).memory.neurons())


def test_an_unfinished_run_is_read_from_its_checkpoint(longtail_data, tmp_path, texts):
    cfg = load_config("tiny", [*longtail_data, "train.mode=scratch", "train.max_steps=6",
                               f"train.run_dir={tmp_path / 'r'}"])
    trainer = Trainer(cfg, progress=False)
    trainer.run(stop_at=3)
    assert not (cfg.run_dir / "anchor.safetensors").exists()
    run = Run(cfg.run_dir, device="cpu")
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(run.model.state_dict()[k], v), k
    for k in trainer.bank.parts():  # the bank of the same step as the anchor
        assert torch.equal(run.bank.part(k), trainer.bank.part(k)), k
    ctx = MemoryContext(run, "fetched", "centroid")
    assert torch.equal(ctx.memory_for_texts(texts).neurons(), fetch(trainer.bank, ctx.route(texts)).memory.neurons())


def test_invalid_settings_are_refused(run, longtail_data, tmp_path):
    with pytest.raises(HiermemError, match="--memory 'bogus' is not one of fetched, generic, none"):
        MemoryContext(run, "bogus")
    for level in (-1, 2):
        with pytest.raises(HiermemError, match=rf"--block-level {level} is outside the tree's levels 0\.\.1"):
            MemoryContext(run, "fetched", block_level=level)
    with pytest.raises(HiermemError, match="--router"):
        MemoryContext(run, "fetched", router="nearest").route(["x"])

    anchor_dir = tmp_path / "anchor"
    train(load_config("tiny", [*longtail_data, "train.max_steps=1", f"train.run_dir={anchor_dir}"]), progress=False)
    anchor = Run(anchor_dir, device="cpu")
    assert anchor.bank is None and anchor.tree is None
    for mode in ("fetched", "generic"):
        with pytest.raises(HiermemError, match=f"--memory {mode} needs a run trained with memory"):
            MemoryContext(anchor, mode)
    assert MemoryContext(anchor, "none").memory_for_texts(["x"]) is None
