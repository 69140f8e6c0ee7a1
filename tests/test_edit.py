"""Editing knowledge by block: `hiermem bank reset/show` (memory/edit.py) and adding documents to a trained bank
(routing.tree_from + train.init_from=<memory run>).

Every comparison reads the run back from disk and is bit-exact: the reset block against a freshly created
bank's, everything else against the run before the edit (or the source run)."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_OVERRIDES, write_topic_corpus
from hiermem.cli import main
from hiermem.config import load_config, read_config
from hiermem.data.prepare import DataDir, prepare
from hiermem.errors import HiermemError
from hiermem.memory.bank import MemoryBank
from hiermem.memory.edit import path_nodes, reset_blocks
from hiermem.memory.optim import LazyAdamW
from hiermem.memory.spec import BankSpec
from hiermem.routing.clustering import cluster, load_clustering
from hiermem.routing.tree import Tree
from hiermem.train.checkpoint import load_state
from hiermem.train.loop import Trainer, train

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "run_v1"

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(run: Path) -> dict:
    """What a run holds on disk: the published bank's weights and moments, the checkpoint's step counts, the
    anchor's and the tree's bytes."""
    bank = MemoryBank.load(run / "bank", mmap=False, writable=True)
    state = load_state(run / "checkpoint")
    with np.load(run / "checkpoint" / state["files"]["bank_optimizer"]) as z:
        steps = {k.removeprefix("steps."): z[k] for k in z.files if k.startswith("steps.")}
    return {"generation": bank.store.generation, "state_generation": state["generation"], "steps": steps,
            **{f: {k: bank.read_part(k, f) for k in bank.parts()} for f in "wmv"},
            "anchor": (run / "anchor.safetensors").read_bytes(), "tree": (run / "tree.npz").read_bytes()}


def fresh_blocks(run: Path) -> dict:
    """Every part as MemoryBank.create makes it for the run (its spec, seed and dtype)."""
    cfg = read_config(run / "config.yaml")
    bank = MemoryBank.load(run / "bank", mmap=True, writable=False)
    new = MemoryBank.create(bank.spec, seed=cfg.train.seed, dtype=bank.dtype)
    return {k: new.read_part(k) for k in new.parts()}


def trained_leaf(snap: dict) -> int:
    """A leaf whose own block was updated in training (so that resetting it changes something)."""
    return int(np.flatnonzero(snap["steps"]["level1"])[0])


def assert_only_reset(before: dict, after: dict, init: dict, reset: set[tuple[str, int]]) -> None:
    for key in before["w"]:
        for i in range(len(before["w"][key])):
            if (key, i) in reset:
                assert torch.equal(after["w"][key][i], init[key][i]), (key, i)
                assert not after["m"][key][i].any() and not after["v"][key][i].any(), (key, i)
                assert after["steps"][key][i] == 0
            else:
                for f in "wmv":
                    assert torch.equal(after[f][key][i], before[f][key][i]), (f, key, i)
                assert after["steps"][key][i] == before["steps"][key][i]
    assert after["anchor"] == before["anchor"] and after["tree"] == before["tree"]
    assert after["generation"] == after["state_generation"] == before["generation"] + 1


@pytest.mark.parametrize("mmap", [False, True])
def test_reset_a_leaf_restores_its_initial_block_and_leaves_everything_else(memory_run, tmp_path, capsys, mmap):
    run = tmp_path / "run"
    shutil.copytree(memory_run, run)
    if mmap:  # the same store, opened as a bank on disk behind the block cache
        text = (run / "config.yaml").read_text()
        assert text.count("mmap: false") == 1
        (run / "config.yaml").write_text(text.replace("mmap: false", "mmap: true"))
    before = snapshot(run)
    leaf = trained_leaf(before)
    code, out, err = run_cli(capsys, "bank", "reset", run, "--leaf", leaf)
    assert code == 0, err
    assert f"reset level1 node {leaf} of {run}" in out
    after, init = snapshot(run), fresh_blocks(run)
    assert not torch.equal(before["w"]["level1"][leaf], init["level1"][leaf])  # it was trained
    assert_only_reset(before, after, init, {("level1", leaf)})
    log = [json.loads(line) for line in (run / "edits.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["action"] == "reset" and log[0]["leaf"] == leaf
    assert [(b["part"], b["node"]) for b in log[0]["blocks"]] == [("level1", leaf)]
    assert log[0]["generation"] == after["generation"]

    code, out, err = run_cli(capsys, "bank", "show", run, "--leaf", leaf)
    assert code == 0, err
    row = next(line.split() for line in out.splitlines() if line.startswith("level1"))
    assert row[:2] == ["level1", str(leaf)] and float(row[3]) == 0.0  # no distance from its initial values
    docs = np.asarray(load_clustering(DataDir(read_config(run / "config.yaml").data_dir),
                                      read_config(run / "config.yaml"), True).doc_paths)
    is_val = DataDir(read_config(run / "config.yaml").data_dir).is_val()
    assert int(row[4]) == int((docs[~is_val, 1] == leaf).sum())


def test_reset_by_prompt_resets_the_routed_path(memory_run, tmp_path, capsys):
    from hiermem.eval.evaluate import open_run
    from hiermem.eval.inference import MemoryContext

    run = tmp_path / "run"
    shutil.copytree(memory_run, run)
    prompt = "Velmora has a population of about"
    path = MemoryContext(open_run(str(run), router="centroid", device="cpu"), "fetched").route([prompt])[0]
    before = snapshot(run)
    code, out, err = run_cli(capsys, "bank", "reset", run, "--prompt", prompt, "--path", "--router", "centroid")
    assert code == 0, err
    after = snapshot(run)
    reset = {("level0", int(path[0])), ("level1", int(path[1]))}
    assert_only_reset(before, after, fresh_blocks(run), reset)
    entry = json.loads((run / "edits.jsonl").read_text())
    assert entry["prompt"] == prompt and entry["router"] == "centroid" and entry["leaf"] == int(path[1])


def test_bank_reset_refusals_are_one_line_and_change_nothing(memory_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(memory_run, run)
    before = snapshot(run)
    for argv, message in [
        (["--leaf", 16], "error: leaf 16: not a leaf of this bank (its tree has leaves 0..15)"),
        (["--leaf", -1], "error: leaf -1: not a leaf of this bank (its tree has leaves 0..15)"),
        (["--leaf", 3, "--level", 2], "error: level 2: outside the tree's levels 0..1"),
        (["--leaf", 3, "--level", 0, "--path"], "error: give a level or the whole path, not both"),
    ]:
        code, out, err = run_cli(capsys, "bank", "reset", run, *argv)
        assert code == 2 and err.strip() == message, err
    for target, message in [(tmp_path / "nope", f"error: {tmp_path / 'nope'}: no such run directory"),
                            (FIXTURE_V1, f"error: {FIXTURE_V1}: a run of format 1; editing its bank needs format 3")]:
        code, out, err = run_cli(capsys, "bank", "reset", target, "--leaf", 0)
        assert code == 2 and err.strip() == message, err
    after = snapshot(run)
    assert not (run / "edits.jsonl").exists() and after["generation"] == before["generation"]
    for f in "wmv":
        assert all(torch.equal(after[f][k], before[f][k]) for k in before[f])


def test_reset_in_a_bf16_bank_stores_the_bytes_of_creation():
    spec = BankSpec(d=16, n_layers=2, ranks=(4, 4), branching=3)
    fresh = MemoryBank.create(spec, seed=7, dtype="bf16")
    bank = MemoryBank.create(spec, seed=7, dtype="bf16")
    opt = LazyAdamW(bank, lr=1e-2)
    ids = torch.tensor([2, 5])
    w = torch.randn(2, *spec.part_shape("level1")[1:])
    bank.write_state("level1", ids, w, w.abs(), w.abs())
    opt.steps["level1"][[2, 5]] = 4
    reset_blocks(bank, path_nodes(spec, 5), seed=7, optimizer=opt)  # the leaf's block only
    assert torch.equal(bank.part("level1")[5].view(torch.int16), fresh.part("level1")[5].view(torch.int16))
    assert not torch.equal(bank.part("level1")[2], fresh.part("level1")[2])  # another block: untouched
    assert opt.steps["level1"].tolist() == [0, 0, 4, 0, 0, 0, 0, 0, 0]
    _, m, v = bank.read_state("level1", torch.tensor([2, 5]))
    assert not m[1].any() and not v[1].any() and m[0].any()
    with pytest.raises(HiermemError, match=r"^level 0: holds no memory \(memory.ranks\[0\] = 0\)$"):
        path_nodes(BankSpec(d=16, n_layers=2, ranks=(0, 4), branching=3), 5, level=0)
    assert path_nodes(BankSpec(d=16, n_layers=2, ranks=(0, 4), branching=3), 5, whole_path=True) == [("level1", 5)]


# -- adding: new documents routed into a trained run's tree, trained into its bank -------------------------------
@pytest.fixture(scope="module")
def new_data(memory_run, tmp_path_factory):
    """Overrides for a data directory of new documents (other topics), tokenised with the memory run's tokenizer."""
    root = tmp_path_factory.mktemp("added")
    write_topic_corpus(root / "new.jsonl", n=200)
    overrides = [*TINY_OVERRIDES, f"data.corpus={root / 'new.jsonl'}", f"data.dir={root / 'data'}",
                 f"data.tokenizer={memory_run / 'tokenizer.json'}"]
    prepare(load_config("tiny", overrides))
    return overrides


def test_training_on_new_documents_updates_only_the_blocks_they_reach(memory_run, new_data, tmp_path):
    cfg = load_config("tiny", [*new_data, f"routing.tree_from={memory_run}", "train.mode=cotrain",
                               f"train.init_from={memory_run}", "train.epochs=1", "memory.generic_prob=0",
                               f"train.run_dir={tmp_path / 'added'}"])
    data = DataDir(cfg.data_dir)
    report = cluster(cfg, data, progress=False)
    assert report["tree_from"] == str(memory_run)
    clustering = load_clustering(data, cfg, required=True)
    tree = Tree.load(memory_run / "tree.npz")
    assert clustering.tree.fingerprint() == tree.fingerprint()  # the run's tree, no new k-means
    assert np.array_equal(clustering.doc_paths, tree.route(np.asarray(clustering.doc_emb())))
    train(cfg, progress=False)

    source = MemoryBank.load(memory_run / "bank", mmap=False, writable=False)
    added = MemoryBank.load(cfg.run_dir / "bank", mmap=False, writable=False)
    reached = np.asarray(clustering.doc_paths)[~data.is_val()]
    n_unreached = 0
    for level in range(tree.depth):
        key = f"level{level}"
        hit = set(reached[:, level].tolist())
        for i in range(source.n_blocks(key)):
            same = torch.equal(source.read_part(key)[i], added.read_part(key)[i])
            assert same == (i not in hit), (key, i)
            n_unreached += i not in hit
    assert n_unreached > 0  # the new documents leave some of the tree alone
    assert torch.equal(source.read_part("generic"), added.read_part("generic"))  # generic_prob=0: never fetched


def _cluster_copy(new_data, tmp_path, *overrides):
    """The new documents clustered afresh (their own k-means tree) in a copy of their data directory."""
    src = Path(next(o for o in new_data if o.startswith("data.dir=")).split("=", 1)[1])
    shutil.copytree(src, tmp_path / "data", ignore=shutil.ignore_patterns("cluster"))
    cfg = load_config("tiny", [*new_data, f"data.dir={tmp_path / 'data'}", *overrides])
    cluster(cfg, DataDir(cfg.data_dir), progress=False)
    return cfg


def test_adding_to_a_bank_needs_its_own_tree(memory_run, new_data, tmp_path):
    refused = load_config("tiny", [*new_data, f"routing.tree_from={memory_run}", "routing.branching=2"])
    with pytest.raises(HiermemError, match=rf"^{re.escape(str(memory_run / 'tree.npz'))}: a tree of branching 4, "
                                           r"the config has routing.branching=2$"):
        cluster(refused, DataDir(refused.data_dir), progress=False)  # refused before it touches the folder
    cfg = _cluster_copy(new_data, tmp_path / "same_shape")
    init = [f"train.init_from={memory_run}", "train.mode=cotrain", f"train.run_dir={tmp_path / 'r1'}"]
    mine, theirs = re.escape(str(cfg.data_dir / "cluster" / "tree.npz")), re.escape(str(memory_run / "tree.npz"))
    with pytest.raises(HiermemError, match=rf"^{mine}: another tree than {theirs} \(cluster the new data with "
                                           rf"routing.tree_from={re.escape(str(memory_run))}\)$"):
        Trainer(load_config("tiny", [*new_data, f"data.dir={cfg.data_dir}", *init]), progress=False)
    cfg = _cluster_copy(new_data, tmp_path / "other_shape", "routing.branching=2")
    mine = re.escape(str(cfg.data_dir / "cluster" / "tree.npz"))
    with pytest.raises(HiermemError, match=rf"^{mine}: a tree of depth 2, branching 2; the bank of "
                                           rf"train.init_from {re.escape(str(memory_run))} has depth 2, branching 4$"):
        Trainer(load_config("tiny", [*new_data, f"data.dir={cfg.data_dir}", "routing.branching=2", *init]),
                progress=False)
