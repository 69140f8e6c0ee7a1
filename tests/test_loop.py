import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hiermem.config import load_config, read_config
from hiermem.data.prepare import prepare
from hiermem.data.tokenizer import Tokenizer
from hiermem.errors import HiermemError
from hiermem.memory.bank import MemoryBank
from hiermem.memory.spec import spec_from_config
from hiermem.memory.store import BlockStore
from hiermem.train.flops import flops_per_token
from hiermem.train.loop import Trainer, as_numbers, total_steps, train
from hiermem.train.step import generic_draw

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.torch_threads


@pytest.fixture
def make(longtail_data, tmp_path):
    """make(name, *overrides) -> a Config for a run in tmp_path/name on the shared long-tail data."""

    def _make(name, *overrides):
        return load_config("tiny", [*longtail_data, f"train.run_dir={tmp_path / name}", *overrides])

    return _make


@pytest.fixture(scope="module")
def anchor_run(longtail_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("loop") / "anchor"
    train(load_config("tiny", [*longtail_data, "train.max_steps=6", f"train.run_dir={run_dir}"]), progress=False)
    return run_dir


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bank_arrays(bank, field="w"):
    """Every part of a bank (RAM or disk) as float32: its weights, or a moment ("m", "v")."""
    return {k: bank.read_part(k, field) for k in bank.parts()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- (1) resume is exact ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [
    ["train.mode=anchor"],
    ["train.mode=scratch"],
    ["train.mode=scratch", "memory.mmap=true", "memory.cache_bytes=400000"],  # evicts, writes back
    ["train.mode=scratch", "memory.dtype=bf16"],
])
def test_resume_is_exact(make, mode):
    steps = ["train.max_steps=8", "train.ckpt_every=3"]
    whole = Trainer(make("whole", *mode, *steps), progress=False)
    s_whole = whole.run()
    assert s_whole["steps"] == 8

    first = Trainer(make("split", *mode, *steps), progress=False)
    s_half = first.run(stop_at=4)
    assert s_half["steps"] == 4 and not (first.cfg.run_dir / "anchor.safetensors").exists()
    assert json.loads((first.cfg.run_dir / "checkpoint" / "state.json").read_text())["step"] == 4
    # a fresh process: a new config object from the same command line, resumed from the checkpoint
    second = Trainer(make("split", *mode, *steps), resume=True, progress=False)
    assert second.step == 4
    s_rest = second.run()
    assert s_rest["steps"] == 8 and s_rest["tokens_seen"] == s_whole["tokens_seen"]

    assert s_rest["final_loss"] == pytest.approx(s_whole["final_loss"], abs=1e-6)
    assert losses(second.cfg.run_dir) == pytest.approx(losses(whole.cfg.run_dir), abs=1e-6)  # step by step
    assert_same(weights(second.model), weights(whole.model))
    # and the published files agree as well
    assert_same(load_file(str(second.cfg.run_dir / "anchor.safetensors")),
                load_file(str(whole.cfg.run_dir / "anchor.safetensors")))
    if whole.bank is not None:
        assert_same(bank_arrays(second.bank), bank_arrays(whole.bank))
        for name in ("m", "v"):
            assert_same(bank_arrays(second.bank, name), bank_arrays(whole.bank, name))
        for k in whole.bank_opt.steps:
            np.testing.assert_array_equal(second.bank_opt.steps[k], whole.bank_opt.steps[k])
        saved_a = MemoryBank.load(whole.cfg.run_dir / "bank", mmap=False)
        saved_b = MemoryBank.load(second.cfg.run_dir / "bank", mmap=False)
        assert_same(bank_arrays(saved_a), bank_arrays(saved_b))
        assert_same(bank_arrays(saved_a), bank_arrays(whole.bank))


def test_resume_from_a_periodic_checkpoint_after_a_crash(make):
    """Steps after the last periodic checkpoint are lost in a crash: they are redone exactly, and logged once."""
    common = ["train.mode=scratch", "train.max_steps=8", "train.ckpt_every=3"]
    whole = Trainer(make("whole", *common), progress=False)
    whole.run()

    crashed = Trainer(make("crash", *common), progress=False)
    periodic_only = crashed.save_checkpoint
    crashed.save_checkpoint = lambda: periodic_only() if crashed.step % 3 == 0 else None  # no save at the stop
    crashed.run(stop_at=5)
    metrics = crashed.cfg.run_dir / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 6, "loss": 1.0')  # and a line torn by the crash
    resumed = Trainer(make("crash", *common), resume=True, progress=False)
    assert resumed.step == 3
    resumed.run()
    assert_same(weights(resumed.model), weights(whole.model))
    assert_same(bank_arrays(resumed.bank), bank_arrays(whole.bank))
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert [r["loss"] for r in recs] == pytest.approx(losses(whole.cfg.run_dir), abs=1e-6)


def test_a_bank_on_disk_trains_like_the_bank_in_ram_with_or_without_prefetch(make):
    """memory.mmap=true with a cache far smaller than the bank (evictions and write-backs every step): the same
    losses, anchor, bank and moments as in RAM, with the prefetcher on or off; the cache stays in its budget."""
    common = ["train.mode=scratch", "train.max_steps=6", "train.ckpt_every=4"]
    runs = {}
    for name, extra in (("ram", []), ("disk", ["memory.prefetch=2"]), ("disk0", ["memory.prefetch=0"])):
        disk = ["memory.mmap=true", "memory.cache_bytes=400000"] if name != "ram" else []
        runs[name] = Trainer(make(name, *common, *disk, *extra), progress=False)
        runs[name].run()
    ram = runs.pop("ram")
    for name, t in runs.items():
        assert t.bank.on_disk and (t.bank.prefetcher is not None) == (name == "disk")
        assert losses(t.cfg.run_dir) == losses(ram.cfg.run_dir)
        assert_same(weights(t.model), weights(ram.model))
        for field in "wmv":
            assert_same(bank_arrays(t.bank, field), bank_arrays(ram.bank, field))
        io = t.bank.io_stats()
        assert io["evictions"] > 0 and io["peak_bytes"] <= 400000
        recs = [json.loads(line) for line in (t.cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert sum(r["disk_read_bytes"] for r in recs) > 0 and all(0 <= r["cache_hit_rate"] <= 1 for r in recs)
        assert all(r["cache_resident_bytes"] <= 400000 for r in recs)
    saved = MemoryBank.load(runs["disk"].cfg.run_dir / "bank", mmap=False)  # what was published, in RAM
    assert_same(bank_arrays(saved), bank_arrays(ram.bank))


@pytest.mark.parametrize("mmap", [False, True])
def test_a_checkpoint_writes_only_the_blocks_updated_since_the_last(make, monkeypatch, mmap):
    written = []
    write = BlockStore.write
    monkeypatch.setattr(BlockStore, "write",
                        lambda self, key, i, r: written.append((key, i)) or write(self, key, i, r))
    trainer = Trainer(make("inc", "train.mode=scratch", "train.max_steps=6", "train.ckpt_every=3",
                           f"memory.mmap={str(mmap).lower()}"), progress=False)
    counts, per_checkpoint = trainer.train_step.counts, []
    before = [counts.snapshot(), counts.generic]
    save = trainer.save_checkpoint

    def checkpoint():
        written.clear()
        save()
        now = [counts.snapshot(), counts.generic]
        updated = {(f"level{lv}", int(i)) for lv, (n, b) in enumerate(zip(now[0], before[0]))
                   for i in np.flatnonzero(n - b)}
        updated |= {("generic", 0)} if now[1] > before[1] else set()
        per_checkpoint.append((sorted(written), sorted(updated)))
        before[:] = now

    trainer.save_checkpoint = checkpoint
    written.clear()  # (creating a bank on disk writes every block once)
    trainer.run()
    (first, first_updated), (second, second_updated) = per_checkpoint
    n_blocks = 4 + 16 + 1
    if mmap:  # the store was made with the bank: its first checkpoint, too, holds only what changed
        assert first == first_updated and len(first) < n_blocks
    else:  # a bank in RAM makes its store at the first checkpoint
        assert len(first) == n_blocks
    assert second == second_updated and 0 < len(second) < n_blocks


KILL_SCRIPT = """
import json, sys
from hiermem.config import load_config
from hiermem.train.loop import train
train(load_config("tiny", json.loads(sys.argv[1])), progress=False)
"""


@pytest.mark.parametrize("mmap, point", [(True, "2:block:3"), (False, "2:publish:1")])
def test_a_training_process_killed_inside_a_checkpoint_resumes_exactly(longtail_data, tmp_path, mmap, point):
    """A subprocess trains and SIGKILLs itself inside its second checkpoint (after 3 of the bank's blocks were
    written, or after the checkpoint's commit but before the bank's manifest). The checkpoint that was complete
    before survives, or the new one if it was complete; resuming from it gives exactly the uninterrupted run."""
    common = ["train.mode=scratch", "train.max_steps=7", "train.ckpt_every=2", f"memory.mmap={str(mmap).lower()}",
              "memory.cache_bytes=400000"]
    args = lambda name: [*longtail_data, f"train.run_dir={tmp_path / name}", *common]  # noqa: E731
    whole = Trainer(load_config("tiny", args("whole")), progress=False)
    whole.run()
    env = {**os.environ, "HIERMEM_TEST_CRASH": point, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(args("killed"))], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())
    assert state["step"] == (2 if point.endswith("block:3") else 4)  # at most the steps since it are lost
    resumed = Trainer(load_config("tiny", args("killed")), resume=True, progress=False)
    resumed.run()
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")
    assert_same(weights(resumed.model), weights(whole.model))
    for field in "wmv":
        assert_same(bank_arrays(resumed.bank, field), bank_arrays(whole.bank, field))
    assert_same(bank_arrays(MemoryBank.load(tmp_path / "killed" / "bank", mmap=False)), bank_arrays(whole.bank))


def test_finished_run_files(make):
    cfg = make("r", "train.mode=scratch", "train.max_steps=3")
    summary = train(cfg, progress=False)
    run = cfg.run_dir
    for name in ("config.yaml", "run.json", "tokenizer.json", "tree.npz", "anchor.safetensors", "bank",
                 "checkpoint", "metrics.jsonl", "train_summary.json"):
        assert (run / name).exists(), name
    assert json.loads((run / "train_summary.json").read_text()) == json.loads(json.dumps(summary))
    saved = read_config(run / "config.yaml")
    tokenizer_size = Tokenizer.load(run / "tokenizer.json").vocab_size
    assert cfg.model.vocab_size == 0  # the caller's config is not modified
    assert saved.model.vocab_size == -(-tokenizer_size // 64) * 64 > 0  # the resolved size is recorded
    assert summary["parameters"]["fetched"] == 3 * 64 * 2 * 16  # 3 parts x d x layers x (8 + 8)


def test_a_run_without_checkpoints_writes_only_its_metrics(make):
    """train.checkpoint=false (throughput runs at scale): the same losses, no checkpoint, no model files."""
    kept = make("kept", "train.mode=scratch", "train.max_steps=3", "train.log_every=1")
    bare = make("bare", "train.mode=scratch", "train.max_steps=3", "train.log_every=1", "train.checkpoint=false")
    assert train(bare, progress=False)["steps"] == 3
    train(kept, progress=False)
    assert losses(bare.run_dir) == losses(kept.run_dir)
    assert not any((bare.run_dir / n).exists() for n in ("checkpoint", "anchor.safetensors", "bank"))
    assert (bare.run_dir / "train_summary.json").is_file()
    with pytest.raises(HiermemError, match=r"^config: train\.ckpt_every=2 needs train\.checkpoint=true$"):
        make("x", "train.checkpoint=false", "train.ckpt_every=2")


def test_profile_steps_write_the_operator_table_and_change_nothing_trained(make):
    """train.profile_steps=[1, 3): torch.profiler over steps 2..3, the table in <run>/profile.txt; the losses are
    the unprofiled run's. A window past the run's end is closed at its last step."""
    plain = make("plain", "train.mode=scratch", "train.max_steps=4", "train.log_every=1", "train.checkpoint=false")
    profiled = make("prof", "train.mode=scratch", "train.max_steps=4", "train.log_every=1", "train.checkpoint=false",
                    "train.profile_steps=[1,3]")
    train(plain, progress=False)
    train(profiled, progress=False)
    assert losses(profiled.run_dir) == losses(plain.run_dir)
    table = (profiled.run_dir / "profile.txt").read_text()
    assert table.startswith("steps 2..3, sorted by self_cpu_time_total\n") and "aten::" in table
    late = make("late", "train.max_steps=2", "train.checkpoint=false", "train.profile_steps=[1,10]")
    train(late, progress=False)
    assert (late.run_dir / "profile.txt").read_text().startswith("steps 2..2,")
    with pytest.raises(HiermemError, match=r"^config: train\.profile_steps must be \[start, end\) with 0 <= start "
                                           r"< end \(got \[3, 3\]\)$"):
        make("x", "train.profile_steps=[3,3]")


# --- (2) frozen and (3) cotrain update exactly what they should -------------------------------------------


def test_frozen_keeps_the_anchor_and_trains_the_bank(make, anchor_run):
    cfg = make("frozen", "train.mode=frozen", f"train.init_from={anchor_run}", "train.max_steps=4")
    trainer = Trainer(cfg, progress=False)
    src = load_file(str(anchor_run / "anchor.safetensors"))
    fresh = MemoryBank.create(spec_from_config(cfg), seed=cfg.train.seed)
    trainer.run()
    out = load_file(str(cfg.run_dir / "anchor.safetensors"))
    assert_same(out, src)
    assert all(not p.requires_grad for p in trainer.model.parameters())
    assert not list((cfg.run_dir / "checkpoint").glob("optimizer*"))
    trained = MemoryBank.load(cfg.run_dir / "bank", mmap=False)
    changed = [k for k in trained.parts() if not torch.equal(trained.part(k), fresh.part(k))]
    assert "level0" in changed and "level1" in changed


def test_cotrain_step_updates_only_fetched_blocks(make, anchor_run):
    cfg = make("cotrain", "train.mode=cotrain", f"train.init_from={anchor_run}", "train.max_steps=4",
               "memory.generic_prob=0.5")
    trainer = Trainer(cfg, progress=False)
    src = load_file(str(anchor_run / "anchor.safetensors"))
    assert torch.equal(trainer.model.tok_emb.weight, src["tok_emb.weight"])  # init_from loaded the anchor

    idx = np.random.default_rng(0).choice(len(trainer.dataset), 12, replace=False)
    paths = np.asarray(trainer.dataset.paths[idx])
    assert len(np.unique(paths[:, 1])) > 2  # the batch spans several leaves
    use_generic = generic_draw(cfg, trainer.step, len(idx)).numpy()
    assert 0 < use_generic.sum() < len(idx)  # both kinds of rows in this step
    before, anchor_before = bank_arrays(trainer.bank), weights(trainer.model)

    out = as_numbers(trainer.advance(idx))

    after = bank_arrays(trainer.bank)
    for level in (0, 1):
        key = f"level{level}"
        diff = (after[key] != before[key]).flatten(1).any(1).numpy()
        expected = np.unique(paths[~use_generic, level])
        np.testing.assert_array_equal(np.flatnonzero(diff), expected)
        assert out["blocks_updated"][level] == len(expected)
    assert not torch.equal(after["generic"], before["generic"])
    assert out["generic_frac"] == pytest.approx(use_generic.mean())
    # the anchor learns too in cotrain mode
    anchor_after = weights(trainer.model)
    assert not torch.equal(anchor_after["blocks.0.ffn.gate_proj.weight"], anchor_before["blocks.0.ffn.gate_proj.weight"])


def test_no_generic_row_leaves_the_generic_block_alone(make, anchor_run):
    cfg = make("cotrain", "train.mode=cotrain", f"train.init_from={anchor_run}", "train.max_steps=4",
               "memory.generic_prob=0.0")
    trainer = Trainer(cfg, progress=False)
    before = bank_arrays(trainer.bank)
    trainer.advance(np.arange(0, len(trainer.dataset), 97)[:8])
    assert torch.equal(trainer.bank.part("generic"), before["generic"])


# --- (4) gradient accumulation ------------------------------------------------------------------------------


def test_grad_accumulation_equals_one_big_batch(make):
    """The sampler draws batch_size * grad_accum sequences per step: (16, 1) and (8, 2) see the same ones."""
    common = ["train.mode=scratch", "train.max_steps=3", "memory.generic_prob=0.3"]
    big = Trainer(make("big", *common, "train.batch_size=16", "train.grad_accum=1"), progress=False)
    acc = Trainer(make("acc", *common, "train.batch_size=8", "train.grad_accum=2"), progress=False)
    batches_big, batches_acc = iter(big.sampler), iter(acc.sampler)
    b1, b2 = next(batches_big), next(batches_acc)
    np.testing.assert_array_equal(b1, b2)
    assert len(b1) == 16
    anchor0, bank0 = weights(big.model), bank_arrays(big.bank)
    o1, o2 = as_numbers(big.advance(b1)), as_numbers(acc.advance(b2))
    assert o2["loss"] == pytest.approx(o1["loss"], rel=1e-6)
    assert o2["grad_norm"] == pytest.approx(o1["grad_norm"], rel=1e-5)
    assert o2["tokens"] == o1["tokens"] and o2["blocks_updated"] == o1["blocks_updated"]
    w1, w2 = weights(big.model), weights(acc.model)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0)
    assert not torch.equal(w1["tok_emb.weight"], anchor0["tok_emb.weight"])  # the step did move them
    moved = [k for k, v in bank_arrays(big.bank).items() if not torch.equal(v, bank0[k])]
    assert "level1" in moved
    for k, v in bank_arrays(big.bank).items():
        torch.testing.assert_close(acc.bank.part(k), v, atol=1e-5, rtol=0)
    # the next step starts from (numerically) the same weights: the same loss again
    b1, b2 = next(batches_big), next(batches_acc)
    np.testing.assert_array_equal(b1, b2)
    assert float(acc.advance(b2)["loss"]) == pytest.approx(float(big.advance(b1)["loss"]), rel=1e-5)


def test_total_steps_counts_accumulated_batches(make):
    cfg = make("x", "train.batch_size=8", "train.grad_accum=2", "train.epochs=1.5")
    assert total_steps(cfg, 100) == math.ceil(1.5 * 100 / 16)
    cfg = make("x", "train.max_steps=7")
    assert total_steps(cfg, 100) == 7


# --- (5) metrics ------------------------------------------------------------------------------------------


def test_metrics_report_memory_use_per_level(make):
    cfg = make("m", "train.mode=scratch", "train.max_steps=5")
    train(cfg, progress=False)
    recs = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    for r in recs:
        assert len(r["distinct_fetched"]) == len(r["blocks_updated"]) == 2
        assert 0 <= r["distinct_fetched"][0] <= 4 and 0 <= r["distinct_fetched"][1] <= 16
        # one step per log line: the nodes fetched are exactly the blocks updated
        assert r["distinct_fetched"] == r["blocks_updated"]
        assert r["distinct_fetched"][0] <= r["distinct_fetched"][1]  # a level-1 node is fetched via a leaf
        assert 0.0 <= r["generic_frac"] <= 1.0 and r["lr_memory"] > 0
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
        # model FLOP/s by train/flops.py's count (anchor + fetched neurons); no MFU without a known accelerator peak
        run_cfg = read_config(cfg.run_dir / "config.yaml")  # the vocabulary resolved from the tokenizer
        fl = flops_per_token(run_cfg.model, run_cfg.data.seq_len, spec_from_config(run_cfg))
        assert r["tflops"] == pytest.approx(r["tok_per_s"] * (fl["anchor"] + fl["memory"]) / 1e12) and "mfu" not in r
        block = 2 * 3 * 8 * 64 * 4  # bytes of a level block: n_mem_layers x (gate, up, down) x r x d, float32
        assert r["fetched_bytes"] == block * (sum(r["blocks_updated"]) + 2 * (r["generic_frac"] > 0))
        assert "disk_read_bytes" not in r  # a bank in RAM reads nothing from disk
    assert any(r["distinct_fetched"][1] > 1 for r in recs)
    assert [r["tokens_seen"] for r in recs] == sorted(r["tokens_seen"] for r in recs)

    # a longer logging window counts the distinct nodes over the whole window
    cfg = make("m2", "train.mode=scratch", "train.max_steps=4", "train.log_every=4")
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    (rec,) = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rec["distinct_fetched"] == [int((c > 0).sum()) for c in trainer.train_step.counts.per_level]


def test_anchor_metrics_have_no_memory_fields(make):
    cfg = make("a", "train.max_steps=2")
    train(cfg, progress=False)
    for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert "distinct_fetched" not in rec and "blocks_updated" not in rec


# --- (6) refusals -----------------------------------------------------------------------------------------


def test_refusals_name_the_problem(make, anchor_run):
    cfg = make("r", "train.max_steps=4")
    with pytest.raises(HiermemError, match="nothing to resume"):
        Trainer(cfg, resume=True, progress=False)
    Trainer(cfg, progress=False).run(stop_at=2)
    with pytest.raises(HiermemError, match="already holds a run"):
        Trainer(make("r", "train.max_steps=4"), progress=False)
    with pytest.raises(HiermemError, match=r"another config: train\.lr \(0\.002 vs 0\.001\)"):
        Trainer(make("r", "train.max_steps=4", "train.lr=1e-3"), resume=True, progress=False)
    with pytest.raises(HiermemError, match=r"another model config: model\.d_ff \(128 vs 96\)"):
        Trainer(make("i", "train.mode=cotrain", f"train.init_from={anchor_run}", "model.d_ff=96"), progress=False)
    with pytest.raises(HiermemError, match="config.yaml: missing"):
        Trainer(make("j", "train.mode=cotrain", f"train.init_from={cfg.run_dir / 'nope'}"), progress=False)
    with pytest.raises(HiermemError, match="train.mode=cotrain needs train.init_from"):
        Trainer(make("k", "train.mode=cotrain"), progress=False)
    # the refused attempts left the run resumable
    resumed = Trainer(make("r", "train.max_steps=4"), resume=True, progress=False)
    assert resumed.run()["steps"] == 4
    summary = (cfg.run_dir / "train_summary.json").read_text()
    with pytest.raises(HiermemError, match="this run is finished"):
        Trainer(make("r", "train.max_steps=4"), resume=True, progress=False)
    assert (cfg.run_dir / "train_summary.json").read_text() == summary  # left as it was
    (cfg.run_dir / "run.json").write_text('{"format": "hiermem-run", "format_version": 99}')
    (cfg.run_dir / "train_summary.json").unlink()
    with pytest.raises(HiermemError, match="run format version 99 is newer"):
        Trainer(make("r", "train.max_steps=4"), resume=True, progress=False)
    with pytest.raises(HiermemError, match="train.log_every must be positive"):
        make("z", "train.log_every=0")
    (cfg.run_dir.parent / "orphan" / "bank").mkdir(parents=True)  # a run killed before its first checkpoint
    with pytest.raises(HiermemError, match=r"orphan/bank: a bank without a checkpoint"):
        Trainer(make("orphan", "train.mode=scratch"), progress=False)


def test_init_from_an_anchor_with_another_tokenizer_is_refused(longtail_data, anchor_run, tmp_path):
    # vocab 500 rounds up to the same model.vocab_size (512) as the anchor's: only the tokenizer differs
    other = [*longtail_data, f"data.dir={tmp_path / 'data500'}", "data.vocab_size=500"]
    prepare(load_config("tiny", other))
    cfg = load_config("tiny", [*other, f"train.init_from={anchor_run}", f"train.run_dir={tmp_path / 'r'}"])
    with pytest.raises(HiermemError, match=r"anchor trained with another tokenizer"):
        Trainer(cfg, progress=False)
    from hiermem.data.prepare import DataDir
    from hiermem.data.tokenizer import resolve_vocab

    resolve_vocab(cfg, DataDir(cfg.data_dir).tokenizer())  # what the trainer resolved from the other tokenizer
    assert cfg.model.vocab_size == read_config(anchor_run / "config.yaml").model.vocab_size == 512


# --- (7) the generic draw ---------------------------------------------------------------------------------


def gcfg(*overrides):
    return load_config("tiny", ["routing.branching=4", *overrides])


def test_generic_draw_default_probability_per_sequence():
    cfg = gcfg()
    draws = torch.stack([generic_draw(cfg, step, 64) for step in range(300)])
    assert draws.dtype == torch.bool and draws.shape == (300, 64)
    assert draws.float().mean().item() == pytest.approx(1 / 5, abs=0.015)  # 1 / (branching + 1)
    mixed = [bool(d.any()) and not bool(d.all()) for d in draws]
    assert sum(mixed) > 250  # per sequence: a batch mixes generic and fetched rows
    assert torch.equal(generic_draw(cfg, 7, 64), draws[7])  # a pure function of (seed, step)
    assert not torch.equal(generic_draw(gcfg("train.seed=1"), 7, 64), draws[7])


def test_generic_draw_per_batch_and_explicit_probability():
    cfg = gcfg("memory.generic_sampling=batch", "memory.generic_prob=0.5")
    draws = torch.stack([generic_draw(cfg, step, 16) for step in range(400)])
    assert all(d.all() or not d.any() for d in draws)  # the whole batch at once
    assert draws[:, 0].float().mean().item() == pytest.approx(0.5, abs=0.08)
    cfg = gcfg("memory.generic_prob=0.05")
    assert torch.stack([generic_draw(cfg, s, 100) for s in range(100)]).float().mean().item() == pytest.approx(
        0.05, abs=0.01)


def test_generic_draw_off():
    for cfg in (gcfg("memory.generic=false"), gcfg("memory.generic_prob=0.0"),
                gcfg("memory.generic_prob=0.0", "memory.generic_sampling=batch")):
        assert not any(generic_draw(cfg, s, 32).any() for s in range(50))


def test_resume_accepts_a_config_saved_with_relative_paths(longtail_data, tmp_path, monkeypatch):
    """hiermem 0.1.0 saved config.yaml as given (relative paths); a resume compares both sides resolved.
    A run of an older format than today's is refused for resuming (its checkpoint layout differs)."""
    from hiermem.config import resolve_paths, save_config, to_dict
    from hiermem.train.checkpoint import write_run_format
    from hiermem.train.loop import _check_run_dir

    monkeypatch.chdir(tmp_path)
    args = [*longtail_data, "train.run_dir=rel", "train.max_steps=4"]
    relative = load_config("tiny", args)
    (tmp_path / "rel" / "checkpoint").mkdir(parents=True)
    (tmp_path / "rel" / "checkpoint" / "state.json").write_text("{}")
    save_config(relative, tmp_path / "rel" / "config.yaml")  # as the previous release wrote it
    with pytest.raises(HiermemError, match=r"rel: a run of format 1 cannot be resumed by this hiermem"):
        _check_run_dir(resolve_paths(relative), resume=True)
    write_run_format(tmp_path / "rel")
    assert to_dict(relative) != to_dict(resolve_paths(relative))
    _check_run_dir(resolve_paths(relative), resume=True)  # no "made by another config"
    with pytest.raises(HiermemError, match=r"another config: train\.max_steps \(4 vs 5\)"):
        _check_run_dir(resolve_paths(load_config("tiny", [*args, "train.max_steps=5"])), resume=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_run_keeps_an_in_ram_bank_on_the_gpu_and_saves_it(make):
    cfg = make("cuda", "train.mode=scratch", "train.max_steps=3", "train.device=cuda")
    trainer = Trainer(cfg, progress=False)
    assert trainer.bank.device.type == "cuda"
    assert trainer.bank.read_state("level1", torch.tensor([0]))[1].device.type == "cuda"  # the moments too
    trainer.run()
    saved = MemoryBank.load(cfg.run_dir / "bank", mmap=False)
    for k in saved.parts():
        assert torch.equal(saved.part(k), trainer.bank.part(k).cpu()), k


def test_init_optimizer_continues_the_source_runs_adam_moments(make, anchor_run):
    from hiermem.train.checkpoint import load_state

    state = load_state(anchor_run / "checkpoint")
    saved = torch.load(anchor_run / "checkpoint" / state["files"]["optimizer"], weights_only=True)
    cont = Trainer(make("cont", "train.mode=cotrain", f"train.init_from={anchor_run}", "train.init_optimizer=true",
                        "train.max_steps=2"), progress=False)
    got = cont.opt.state_dict()["state"]
    assert len(got) == len(saved["state"]) > 0
    for i, s in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got[i][key], s[key]), (i, key)
    fresh = Trainer(make("fresh", "train.mode=cotrain", f"train.init_from={anchor_run}", "train.max_steps=2"),
                    progress=False)
    assert fresh.opt.state_dict()["state"] == {}  # the default: Adam starts afresh

