"""Suite `loop` (bench/train_loop.py): `hiermem train` itself, anchor vs memory, read from its own metrics.jsonl.
The tiny shape (--quick) on the CPU: the data stage, then the train stage in an interpreter without the packages a
GPU machine lacks (the encoders, faiss, ...). About 40 s."""

import json
import shutil
import subprocess
import sys

import pytest

from device_env import without_absent_packages
from hiermem.bench.train_loop import hiermem, run, steady
from hiermem.errors import HiermemError
from hiermem.integrity import unseal


@pytest.fixture(scope="module")
def data_stage(tmp_path_factory):
    out = tmp_path_factory.mktemp("loop")
    res = run(out=str(out), quick=True, stage="data")
    return out, res


def test_the_data_is_whole_documents_of_one_row_each(data_stage):
    out, res = data_stage
    data = res["data"]
    assert data["words_per_doc"] == 32 and data["unk_fraction"] == 0.0
    packed = data["packed"]  # seq_len words + end of text = one row of seq_len + 1 tokens: no padding, no split
    assert packed["padding_fraction"] == 0.0 and packed.get("docs_split", 0) == 0
    assert packed["rows"] == data["documents"] and packed["tokens"] == data["documents"] * 33
    assert "variants" not in res
    again = run(out=str(out), quick=True, stage="data")  # a finished data folder is reused as it is
    assert again["data"] == data
    (out / "loop-data-tiny" / "data.json").unlink()  # a data stage stopped before its end is made again
    timings = ("prepare_s", "cluster_s", "data_s")
    remade = run(out=str(out), quick=True, stage="data")["data"]
    assert {k: v for k, v in remade.items() if k not in timings} == {k: v for k, v in data.items() if k not in timings}


def test_the_train_stage_needs_the_data_first(tmp_path):
    with pytest.raises(HiermemError, match=r"no data yet \(run --stage data first"):
        run(out=str(tmp_path), quick=True, stage="train")


def test_the_train_stage_runs_without_the_encoder_and_faiss_and_reports_the_trainers_own_log(data_stage):
    out, _ = data_stage
    for made in ("corpus", "tokenizer.json"):  # training reads the data dir alone: neither goes to a GPU machine
        path = out / "loop-data-tiny" / made
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    cmd = [sys.executable, "-m", "hiermem", "bench", "--suite", "loop", "--quick", "--stage", "train",
           "--steps", "12", "--out", str(out)]
    env = without_absent_packages(out)
    hidden = subprocess.run([sys.executable, "-c", "import faiss"], capture_output=True, text=True, env=env)
    assert hidden.returncode == 1 and "absent on the GPU machine" in hidden.stderr  # the environment works
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads((out / "loop.json").read_text())
    assert set(res["variants"]) == {"anchor", "memory"} and res["steps"] == 12
    for label, r in res["variants"].items():
        assert r["steps"] == 12 and r["packing"]["padding_fraction"] == 0.0
        metrics = out / "loop-runs-tiny" / label / "metrics.jsonl"
        records = [unseal(metrics, json.loads(line)) for line in metrics.read_text().splitlines()]
        assert [x["step"] for x in records] == [4, 8, 12]
        later = records[1:]  # the first window (warm-up) is left out: 2 windows of 4 steps x 4 rows x 32 tokens
        seconds = sum((b["tokens_seen"] - a["tokens_seen"]) / b["tok_per_s"] for a, b in zip(records, later))
        assert r["tok_per_s"] == pytest.approx(2 * 4 * 4 * 32 / seconds)
        assert r["windows"] == 2 and "mfu" not in r  # no known peak FLOP/s on a CPU
        assert not (out / "loop-runs-tiny" / label / "checkpoint").exists()  # train.checkpoint=false
    memory = res["variants"]["memory"]
    assert memory["ratio_vs_anchor"] == pytest.approx(memory["tok_per_s"] / res["variants"]["anchor"]["tok_per_s"])
    assert sum(memory["distinct_fetched"]) > 0 and "bank" in memory["parameters"]
    assert "memory/anchor" in proc.stdout


def test_steady_leaves_out_the_first_window_and_weights_by_time():
    recs = [{"step": 10, "tokens_seen": 100, "tok_per_s": 1.0, "loss": 3.0, "tflops": 1.0},
            {"step": 20, "tokens_seen": 200, "tok_per_s": 100.0, "loss": 2.0, "tflops": 2.0, "mfu": 0.2},
            {"step": 30, "tokens_seen": 300, "tok_per_s": 50.0, "loss": 1.0, "tflops": 1.0, "mfu": 0.1}]
    res = steady(recs)
    assert res["tok_per_s"] == pytest.approx(200 / 3.0)  # 100 tokens in 1 s, then 100 in 2 s
    assert res["mfu"] == pytest.approx((0.2 * 1 + 0.1 * 2) / 3) and res["steps_timed"] == 20
    assert res["first_window_s"] == pytest.approx(100.0) and res["loss"] == 1.0
    with pytest.raises(HiermemError, match="one window only"):
        steady(recs[:1])


def test_loop_options_belong_to_the_loop_suite(capsys):
    from hiermem.cli import main

    assert main(["bench", "--suite", "train", "--stage", "data"]) == 2
    assert "--stage and --steps are options of --suite loop" in capsys.readouterr().err


def test_a_failed_hiermem_command_is_one_line_quoting_its_log(tmp_path):
    log = tmp_path / "train.log"
    with pytest.raises(HiermemError) as err:
        hiermem(["train", "-c", "no-such-preset"], log)
    msg = str(err.value)
    assert msg.startswith(f"bench loop: `hiermem train` failed (log: {log}): error: ") and "no-such-preset" in msg
    assert "\n" not in msg
