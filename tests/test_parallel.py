"""Training on two processes (gloo, CPU) against one process on the same global batches.

The reference trains on one process with train.data_shards=2: the union of the two ranks' batches of every
step. Losses agree within 1e-5 per step (fp32; only the order of sums differs), weights within 1e-5."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hiermem.config import load_config
from hiermem.memory.bank import MemoryBank
from hiermem.memory.spec import spec_from_config
from hiermem.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
STEPS = ["train.mode=scratch", "train.max_steps=6", "train.ckpt_every=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), e.get("PYTHONPATH", "")])
    return e


def two_ranks(*args, timeout=120):
    """Start tests/dist_worker.py as ranks 0 and 1 of a job (torchrun's variables set by hand, so that each
    rank's own exit is seen); returns both CompletedProcess-like (returncode, stderr)."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], stderr=subprocess.PIPE, text=True,
                              env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=port)) for r in (0, 1)]
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_close_runs(a, b, atol=2e-4):
    """Weights of two runs agree to atol (the losses, compared separately, to 1e-5): the gradients are summed in
    another order across ranks, and Adam's m/sqrt(v) scales that rounding up to a fraction of the learning rate
    on coordinates whose gradient is near zero (seen on this machine after 6 steps: anchor 1.0e-5 at LR 2e-3,
    generic block 8.8e-5 at memory LR 1e-2)."""
    wa, wb = load_file(str(Path(a) / "anchor.safetensors")), load_file(str(Path(b) / "anchor.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)
    ba, bb = MemoryBank.load(Path(a) / "bank", mmap=False), MemoryBank.load(Path(b) / "bank", mmap=False)
    for k in ba.parts():
        torch.testing.assert_close(ba.read_part(k), bb.read_part(k), atol=atol, rtol=0, msg=k)


@pytest.fixture(scope="module")
def reference(longtail_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("par") / "ref"
    Trainer(load_config("tiny", [*longtail_data, *STEPS, "train.data_shards=2", f"train.run_dir={run}"]),
            progress=False).run()
    return run


def test_torchrun_two_processes_equal_one_on_the_union(longtail_data, reference, tmp_path):
    run = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    res = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "hiermem", "train",
                          "--quiet", *longtail_data, *STEPS, f"train.run_dir={run}"],
                         capture_output=True, text=True, env=env(), timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    np.testing.assert_allclose(losses(run), losses(reference), atol=1e-5, rtol=0)
    assert_close_runs(run, reference)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sharding"]["units"] == 4
    assert summary["tokens_seen"] == json.loads((reference / "train_summary.json").read_text())["tokens_seen"]
    assert {json.loads(line)["world_size"] for line in (run / "metrics.jsonl").read_text().splitlines()} == {2}


def test_owned_blocks_and_resume_across_world_sizes(longtail_data, reference, tmp_path):
    """2 processes to step 2, then 1 process to step 4, then 2 processes (FSDP2 this time) to the end: the
    same run as the reference. After the first leg each rank's bank is its shard only (the blocks it fetches,
    as the shard plan says, in its resident bytes), it started from the 1-process values, and only shared
    blocks (here the generic one) moved on both ranks, identically."""
    run, dump = tmp_path / "chain", tmp_path / "dump"
    dump.mkdir()
    ov = [*longtail_data, *STEPS, f"train.run_dir={run}"]
    for code, err in two_ranks("--stop-at", 2, "--dump", dump, *ov):
        assert code == 0, err[-3000:]
    fresh = MemoryBank.create(spec_from_config(load_config("tiny", ov)), seed=0)
    ranks = [np.load(dump / f"rank{r}.npz") for r in (0, 1)]
    full_bytes = 3 * sum(fresh.part(k).nbytes for k in fresh.parts())  # weights, m and v (float32)
    for r, z in enumerate(ranks):
        held_bytes = 3 * sum(len(z[f"held.{k}"]) * fresh.part(k)[0].nbytes for k in fresh.parts())
        assert int(z["resident_bytes"]) == held_bytes < full_bytes, r
        for key, level, _, _ in fresh.spec.level_parts():
            assert len(z[f"held.{key}"]) == int(z[f"planned.{key}"]) < fresh.n_blocks(key), (r, key)
    for key in fresh.parts():
        init = fresh.read_part(key).numpy()
        held = [z[f"held.{key}"] for z in ranks]
        assert [h.tolist() for h in held] == [np.flatnonzero(z[f"mine.{key}"]).tolist() for z in ranks]
        changed = []
        for z, h in zip(ranks, held):
            moved = ~np.all(z[f"w.{key}"] == init[h], axis=tuple(range(1, init.ndim)))
            changed.append(np.zeros(len(init), bool))
            changed[-1][h[moved]] = True
        both = changed[0] & changed[1]  # only shared blocks move on both ranks, and identically
        assert not (both & ~ranks[0][f"shared.{key}"]).any()
        rows = [np.searchsorted(h, np.flatnonzero(both)) for h in held]
        assert np.array_equal(ranks[0][f"w.{key}"][rows[0]], ranks[1][f"w.{key}"][rows[1]])
        assert (changed[0] & ~both).any() and (changed[1] & ~both).any() or key == "generic"
    Trainer(load_config("tiny", [*ov, "train.data_shards=2"]), resume=True, progress=False).run(stop_at=4)
    for code, err in two_ranks("--resume", *ov, "train.parallel=fsdp"):
        assert code == 0, err[-3000:]
    np.testing.assert_allclose(losses(run), losses(reference), atol=1e-5, rtol=0)
    assert_close_runs(run, reference)


def test_a_dead_rank_stops_the_job(longtail_data, tmp_path):
    ov = [*longtail_data, *STEPS, f"train.run_dir={tmp_path / 'dies'}", "train.dist_timeout_s=30"]
    (code0, err0), (code1, _) = two_ranks("--die-at", 1, *ov, timeout=90)
    assert code1 == 3  # the worker's own hard exit
    assert code0 == 2 and "error: rank 0: the job stopped: another process failed or did not answer within " \
                          "train.dist_timeout_s=30 s" in err0


def test_a_signal_to_one_rank_stops_the_whole_job_at_one_step_and_it_resumes(longtail_data, reference, tmp_path):
    """SIGTERM to rank 1 only: the ranks agree at the next logging step, both checkpoint and exit 143 with the same
    step, and the resumed job ends where the uninterrupted one does."""
    ov = [*longtail_data, *STEPS, f"train.run_dir={tmp_path / 'stop'}", "train.log_every=2"]
    (code0, err0), (code1, err1) = two_ranks("--signal-at", 1, *ov, timeout=120)
    assert (code0, code1) == (143, 143), (err0[-2000:], err1[-2000:])
    assert err0.strip().splitlines()[-1] == err1.strip().splitlines()[-1] == \
        "stopped at step 2 by SIGTERM; resume with --resume"
    assert json.loads((tmp_path / "stop" / "checkpoint" / "state.json").read_text())["step"] == 2
    (code0, err0), (code1, err1) = two_ranks("--resume", *ov, timeout=120)
    assert (code0, code1) == (0, 0), (err0[-2000:], err1[-2000:])
    logged = {json.loads(line)["step"]: json.loads(line)["loss"]
              for line in (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()}
    assert sorted(logged) == [2, 4, 6]  # each logging step once, across the stop
    np.testing.assert_allclose([logged[s] for s in (2, 4, 6)], losses(reference)[1::2], atol=1e-5, rtol=0)
    assert_close_runs(tmp_path / "stop", reference)
