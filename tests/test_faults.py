"""Faults during training: SIGTERM/SIGINT, a NaN, a full disk, a run killed before its first checkpoint."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hiermem.config import load_config
from hiermem.errors import HiermemError
from hiermem.train import step as step_module
from hiermem.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.torch_threads


@pytest.fixture
def args(longtail_data, tmp_path):
    """args(name, *overrides) -> the override list of a run in tmp_path/name on the shared long-tail data."""
    return lambda name, *more: [*longtail_data, f"train.run_dir={tmp_path / name}", *more]


def trained(overrides, resume=False):
    trainer = Trainer(load_config("tiny", overrides), resume=resume, progress=False)
    trainer.run()
    return trainer


def assert_same_run(a: Trainer, b: Trainer):
    """Bitwise: the anchor, its AdamW state, and every bank block's weights, moments and step count."""
    for (k, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), k
    if a.opt is not None:
        sa, sb = a.opt.state_dict()["state"], b.opt.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for k in sa[i]:
                assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    if a.bank is not None:
        for key in a.bank.parts():
            for field in "wmv":
                assert torch.equal(a.bank.read_part(key, field), b.bank.read_part(key, field)), (key, field)
            assert (a.bank_opt.steps[key] == b.bank_opt.steps[key]).all(), key


def logged(run_dir, field="loss"):
    return [(r["step"], r[field]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


# --- signals ------------------------------------------------------------------------------------------------


def _wait_for_step(proc, metrics, step, timeout=120.0):
    start = time.monotonic()
    while time.monotonic() - start < timeout and proc.poll() is None:
        if metrics.is_file():
            lines = [ln for ln in metrics.read_text().splitlines() if ln.endswith("}")]
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach step {step} (rc {proc.poll()})")


def test_sigterm_then_sigint_stop_cleanly_and_resume_to_the_uninterrupted_run(args):
    """Each signal: a checkpoint at the next step boundary, the one-line message, 143 / 130; resuming twice gives
    the uninterrupted run's weights, bank and losses, bitwise."""
    common = ["train.mode=scratch", "train.max_steps=24", "train.threads=1"]
    whole = trained(args("whole", *common))
    cmd = [sys.executable, "-m", "hiermem", "train", "--quiet", *args("stopped", *common)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = whole.cfg.run_dir.parent / "stopped"
    stops = []
    for sig, code, after in ((signal.SIGTERM, 143, 2), (signal.SIGINT, 130, 3)):
        proc = subprocess.Popen(cmd + (["--resume"] if stops else []), env=env, stderr=subprocess.PIPE, text=True)
        _wait_for_step(proc, run_dir / "metrics.jsonl", (stops[-1] if stops else 0) + after)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err[-2000:]
        step = json.loads((run_dir / "checkpoint" / "state.json").read_text())["step"]
        assert err.strip().splitlines()[-1] == f"stopped at step {step} by {sig.name}; resume with --resume"
        assert step < 24
        stops.append(step)
    resumed = trained(args("stopped", *common), resume=True)
    assert logged(run_dir) == logged(whole.cfg.run_dir)
    assert_same_run(resumed, whole)


# --- numerical faults -----------------------------------------------------------------------------------------


def poison(trainer: Trainer, at_step: int):
    """The logits of 0-based step `at_step` become NaN (so do its loss and all its gradients), as a diverging
    step's would."""
    forward = trainer.model.forward

    def poisoned(*a, **kw):
        logits, loss = forward(*a, **kw)
        return logits * float("nan") if trainer.step == at_step else logits, loss

    trainer.model.forward = poisoned


def test_a_nan_stops_training_before_any_checkpoint_after_it(args):
    cfg = load_config("tiny", args("nan", "train.mode=scratch", "train.max_steps=8", "train.ckpt_every=2",
                                   "train.log_every=3"))
    trainer = Trainer(cfg, progress=False)
    poison(trainer, at_step=4)  # step 5; seen at the logging step 6, before the checkpoint of step 6
    with pytest.raises(HiermemError, match=r"^non-finite loss at step 5; the last good checkpoint is step 4$"):
        trainer.run()
    assert json.loads((cfg.run_dir / "checkpoint" / "state.json").read_text())["step"] == 4
    assert [s for s, _ in logged(cfg.run_dir)] == [3]  # the bad step's window is never logged


@pytest.mark.parametrize("mmap", [False, True])
def test_skip_masks_the_bad_step_exactly(args, monkeypatch, mmap):
    """train.nonfinite=skip: the run equals one where step 4 (0-based 3) did not happen, bitwise: the same data
    order, that step's batch consumed (its blocks fetched), but no update of the anchor (weights, moments, step
    counts: the fused AdamW's found_inf) nor of the bank (weights, moments, per-block step counts)."""
    common = ["train.mode=scratch", "train.max_steps=7", "train.ckpt_every=3", "train.nonfinite=skip",
              f"memory.mmap={str(mmap).lower()}"]
    update = step_module.TrainStep._update

    def no_update_at_3(self, out, grads, bg, norm, loss_sum, lr, step, *rest):
        if step != 3:
            return update(self, out, grads, bg, norm, loss_sum, lr, step, *rest)
        self.anchor_opt.zero_grad(set_to_none=True)
        return {**out, "loss": loss_sum, "grad_norm": norm}

    monkeypatch.setattr(step_module.TrainStep, "_update", no_update_at_3)
    reference = trained(args("reference", *common))
    monkeypatch.setattr(step_module.TrainStep, "_update", update)
    skipped = Trainer(load_config("tiny", args("skipped", *common)), progress=False)
    poison(skipped, at_step=3)
    skipped.run()
    assert_same_run(skipped, reference)
    assert [s for s, _ in logged(skipped.cfg.run_dir, "skipped_steps")] == list(range(1, 8))
    assert [n for _, n in logged(skipped.cfg.run_dir, "skipped_steps")] == [0, 0, 0, 1, 1, 1, 1]
    assert json.loads((skipped.cfg.run_dir / "checkpoint" / "state.json").read_text())["skipped_steps"] == 1


# --- a full disk ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where, err, file", [
    ("hiermem.memory.store.pwrite_all", errno.ENOSPC, r"bank/level\d\.\d\.bin"),  # the bank's write-back
    ("hiermem.train.checkpoint.save_file", errno.EACCES, r"checkpoint/model-000002\.safetensors"),
])
def test_a_failed_checkpoint_write_keeps_the_last_good_one(args, monkeypatch, where, err, file):
    common = ["train.mode=scratch", "memory.mmap=true", "train.max_steps=6", "train.ckpt_every=2"]
    whole = trained(args("whole", *common))
    broken = Trainer(load_config("tiny", args("full", *common)), progress=False)
    module, _, name = where.rpartition(".")
    real, calls = getattr(sys.modules[module], name), []

    def failing(*a, **kw):
        if broken.step == 4:  # the second checkpoint, on its second write
            calls.append(1)
            if len(calls) == 2 or "save_file" in where:
                raise OSError(err, os.strerror(err))
        return real(*a, **kw)

    monkeypatch.setattr(sys.modules[module], name, failing)
    with pytest.raises(HiermemError, match=rf"^checkpoint at step 4 failed: {os.strerror(err)} \(.*/full/{file}\); "
                                           r"the last good checkpoint is step 2$"):
        broken.run()
    monkeypatch.setattr(sys.modules[module], name, real)
    resumed = trained(args("full", *common), resume=True)
    assert logged(resumed.cfg.run_dir) == logged(whole.cfg.run_dir)
    assert_same_run(resumed, whole)


# --- killed before the first checkpoint -----------------------------------------------------------------------


def test_resume_before_the_first_checkpoint_starts_again(args):
    common = ["train.mode=scratch", "memory.mmap=true", "train.max_steps=4"]
    whole = trained(args("whole", *common))
    partial = Trainer(load_config("tiny", args("partial", *common)), progress=False)
    partial.save_checkpoint = lambda: None  # as if killed at step 3: config, metrics and bank, no checkpoint
    partial.run(stop_at=3)
    run_dir = partial.cfg.run_dir
    assert (run_dir / "bank").is_dir() and not (run_dir / "checkpoint").exists()
    with pytest.raises(HiermemError, match=r"config.yaml: this run was made by another config: train\.lr"):
        Trainer(load_config("tiny", args("partial", *common, "train.lr=1e-3")), resume=True, progress=False)
    with pytest.raises(HiermemError, match="already holds a run"):
        Trainer(load_config("tiny", args("partial", *common)), progress=False)
    resumed = trained(args("partial", *common), resume=True)
    assert logged(run_dir) == logged(whole.cfg.run_dir)  # the partial run's lines are gone, not duplicated
    assert_same_run(resumed, whole)
