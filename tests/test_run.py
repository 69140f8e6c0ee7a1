"""eval/run.py: loading a run directory — from any working directory, copied, in the previous format."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from hiermem.config import load_config, read_config
from hiermem.errors import HiermemError
from hiermem.eval.evaluate import evaluate_run, generate_text
from hiermem.eval.run import RUN_FORMAT_VERSION, Run

FIXTURE = Path(__file__).parent / "fixtures" / "run_v1"


@pytest.mark.parametrize("memory", ["fetched", "none"])
def test_a_run_saved_by_the_previous_format_loads_and_generates_the_same(memory, tmp_path):
    """The fixture was written by hiermem 0.1.0 (no format_version, FFN weights named w1/w2/w3, a config
    with the since-removed memory.dispatch key); its greedy completions must not change."""
    run_dir = tmp_path / "old"
    shutil.copytree(FIXTURE, run_dir)
    expected = json.loads((run_dir / f"expected_{memory}.json").read_text())
    run = Run(run_dir, device="cpu")
    assert run.format_version == 1 and run.bank is not None
    got = generate_text(str(run_dir), expected["prompts"], memory=memory, router="centroid",
                        max_new_tokens=expected["max_new_tokens"], device="cpu")
    assert got == expected["completions"]


def test_a_newer_run_format_is_refused(tmp_path):
    run_dir = tmp_path / "new"
    shutil.copytree(FIXTURE, run_dir)
    (run_dir / "run.json").write_text(json.dumps({"format": "hiermem-run", "format_version": RUN_FORMAT_VERSION + 1}))
    with pytest.raises(HiermemError, match=rf"run.json: run format version {RUN_FORMAT_VERSION + 1} is newer"):
        Run(run_dir, device="cpu")


def test_a_newer_bank_format_is_refused(tmp_path):
    run_dir = tmp_path / "new"
    shutil.copytree(FIXTURE, run_dir)
    manifest = run_dir / "bank" / "manifest.json"
    man = json.loads(manifest.read_text())
    man.update(format="hiermem-bank", format_version=99)
    manifest.write_text(json.dumps(man))
    with pytest.raises(HiermemError, match="manifest.json: bank format version 99 is newer"):
        Run(run_dir, device="cpu")


def test_a_run_records_its_format_and_absolute_data_paths(memory_run):
    meta = json.loads((memory_run / "run.json").read_text())
    assert meta == {"format": "hiermem-run", "format_version": RUN_FORMAT_VERSION}
    cfg = read_config(memory_run / "config.yaml")
    assert Path(cfg.data.dir).is_absolute() and Path(cfg.train.run_dir).is_absolute()


def test_eval_works_from_another_directory_and_on_a_copied_run(memory_run, tmp_path, monkeypatch):
    here = evaluate_run(str(memory_run), router="knn", device="cpu", progress=False)
    copy = tmp_path / "copied" / "mem"
    shutil.copytree(memory_run, copy)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    there = evaluate_run(str(copy), router="knn", device="cpu", progress=False)
    assert there["perplexity"] == here["perplexity"]
    assert os.getcwd() == str(elsewhere)


def test_a_run_opens_its_bank_read_only(tmp_path):
    run_dir = tmp_path / "old"
    shutil.copytree(FIXTURE, run_dir)
    for mmap in (False, True):
        run = Run(run_dir, device="cpu", overrides=[f"memory.mmap={str(mmap).lower()}"])
        assert not run.bank.writable
        with pytest.raises(HiermemError, match="opened read-only"):
            first = torch.zeros(1, dtype=torch.long)
            run.bank.write_blocks("level0", first, run.bank.read_blocks("level0", first))


def test_run_refuses_data_from_another_tokenizer(memory_run, tmp_path):
    from hiermem.data.prepare import prepare

    corpus = tmp_path / "other.jsonl"
    corpus.write_text("".join(f'{{"text": "other words number {i} here"}}\n' for i in range(50)))
    other = tmp_path / "d"
    prepare(load_config("tiny", [f"data.corpus={corpus}", f"data.dir={other}", "data.vocab_size=300"]))
    run = Run(memory_run, device="cpu", overrides=[f"data.dir={other}"])
    with pytest.raises(HiermemError, match="tokenised with another tokenizer"):
        run.data()


@pytest.mark.parametrize("mmap", [False, True])
def test_an_unfinished_run_loads_the_anchor_and_bank_of_its_last_checkpoint(longtail_data, tmp_path, mmap):
    """The bank's manifest.json may lag behind the checkpoint (a crash between the two commits): a run that has
    not finished loads the bank generation its checkpoint names, at the checkpoint's step."""
    from hiermem.train.loop import Trainer

    cfg = load_config("tiny", [*longtail_data, "train.mode=scratch", "train.max_steps=6", "train.ckpt_every=2",
                               f"memory.mmap={str(mmap).lower()}", f"train.run_dir={tmp_path / 'r'}"])
    trainer = Trainer(cfg, progress=False)
    trainer.run(stop_at=2)
    at_two = {k: trainer.bank.read_part(k) for k in trainer.bank.parts()}
    trainer.bank.publish = lambda: None  # the next checkpoint's bank is committed, never published
    trainer.run(stop_at=4)
    assert json.loads((tmp_path / "r" / "bank" / "manifest.json").read_text())["generation"] == 1
    run = Run(tmp_path / "r", device="cpu")
    assert json.loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())["generation"] == 2
    for k in run.bank.parts():
        assert torch.equal(run.bank.read_part(k), trainer.bank.read_part(k))
    assert any(not torch.equal(at_two[k], trainer.bank.read_part(k)) for k in at_two)
    assert torch.equal(run.model.tok_emb.weight, trainer.model.tok_emb.weight)
