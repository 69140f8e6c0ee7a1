"""`hiermem demo --quick` end to end (about two minutes): the report's shape, caching, and the core claim."""

import json

import pytest

from hiermem.cli import main

pytestmark = pytest.mark.slow  # `make test` runs these too; `-m "not slow"` leaves them out

REQUIRED_ROWS = {"anchor", "generic", "fetched_centroid", "fetched_knn", "fetched_oracle",
                 "memory_off", "dense2x"}


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    return out


def test_report_has_every_row_and_bucket(quick_demo):
    report = json.loads((quick_demo / "report.json").read_text())
    assert report["buckets"] == ["unseen", "2", "3-4", "5-9", "10-24", "25+"]
    assert report["quick"] is True and report["spec"]["corpus"]["n_entities"] == 300
    assert REQUIRED_ROWS <= set(report["models"]) and "anchor_staged" not in report["models"]  # opt-in control
    assert {"rag", "rag+fetched_knn"} <= set(report["models"])
    # every job ran (none cached) and its CPU seconds were counted from the child's own rusage
    assert set(report["job_cpu_s"]) == set(report["job_wall_s"]) and all(v > 0 for v in report["job_cpu_s"].values())
    for name, m in report["models"].items():
        assert len(m["accuracy"]) == len(report["buckets"]), name
        assert all(0.0 <= a <= 100.0 for a in m["accuracy"]), name
        if name not in ("rag", "rag+fetched_knn"):  # probes only: perplexity is never retrieval-augmented
            assert m["perplexity_real_text"] > 1 and m["perplexity_facts"] > 1
    p = report["parameters"]
    assert p["fetched"] < p["anchor"] < p["dense2x"] and p["bank"] > p["fetched"]
    assert set(report["routing_agreement"]) == {"centroid", "knn"}
    assert (quick_demo / "accuracy_by_bucket.png").stat().st_size > 10_000
    text = (quick_demo / "report.txt").read_text()
    assert "fetched_knn" in text and "unseen       2     3-4     5-9   10-24     25+" in text


def test_fetched_memory_recalls_frequent_facts_the_anchor_misses(quick_demo):
    """The method's claim at toy scale: on the two most frequent buckets the fetched memory is far ahead."""
    m = json.loads((quick_demo / "report.json").read_text())["models"]
    top = lambda name: sum(m[name]["accuracy"][-2:]) / 2  # noqa: E731
    assert top("fetched_knn") >= top("anchor") + 20
    assert top("fetched_knn") >= top("generic") + 20
    # the generic block and memory-off are the same trained model without retrieval: no help from routing
    assert top("generic") < top("fetched_oracle")


def test_rerun_reuses_every_cached_stage(quick_demo, capsys):
    """Nothing is retrained or re-evaluated, and the report of the run that did the work stands (its timings)."""
    stamps = {p: p.stat().st_mtime_ns for p in [*quick_demo.glob("runs/*/train_summary.json"),
                                                  *quick_demo.glob("eval/*.json"), quick_demo / "report.json"]}
    before = (quick_demo / "report.json").read_bytes()
    capsys.readouterr()
    assert main(["demo", "--preset", "demo-quick", "--quiet", "--out", str(quick_demo)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (quick_demo / "report.json").read_bytes() == before
    assert capsys.readouterr().out.strip() == (quick_demo / "report.txt").read_text().strip()


TINY_DEMO = """preset: tiny
overrides: [model.n_layers=2, model.d_model=32, model.n_heads=2, model.head_dim=16, model.d_ff=64,
            model.max_seq_len=64, data.seq_len=64, data.vocab_size=512, routing.encoder=wordllama,
            routing.branching=4, "memory.ranks=[8,8]", train.batch_size=8, train.device=cpu]
epochs: 2
phase1_epochs: 1
dense: [model.d_model=48, model.n_heads=3, model.d_ff=96]
corpus: {n_entities: 40, n_unseen: 5, head_mentions: 10, n_background: 30, n_heldout_background: 5,
         n_heldout_facts: 10}
"""


def test_stages_split_the_demo_between_the_encoders_machine_and_a_gpu_machine(tmp_path, capsys):
    """--stage data clusters; --stage train then runs the trainings alone, in an interpreter without the encoders,
    faiss or the corpus packages (as on a bare GPU machine); the whole demo afterwards only evaluates. ~1 min."""
    import subprocess
    import sys

    from device_env import without_absent_packages

    preset, out = tmp_path / "tiny.yaml", tmp_path / "out"
    preset.write_text(TINY_DEMO)
    args = ["demo", "--preset", str(preset), "--out", str(out), "--quiet"]
    assert main([*args, "--stage", "train"]) == 2
    assert f"demo: {out}: not clustered yet (cluster): run `hiermem demo --stage data`" in capsys.readouterr().err
    assert main([*args, "--stage", "data"]) == 0
    assert (out / "data" / "cluster" / "cluster.json").is_file() and not (out / "runs").exists()
    proc = subprocess.run([sys.executable, "-m", "hiermem", *args, "--stage", "train"], capture_output=True,
                          text=True, env=without_absent_packages(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "train_report.json").read_text())
    assert set(report["runs"]) == {"anchor", "phase1", "memory", "dense2x"} and report["device"] == "CPU"
    for name, r in report["runs"].items():
        summary = json.loads((out / "runs" / name / "train_summary.json").read_text())
        assert (r["steps"], r["tokens_seen"]) == (summary["steps"], summary["tokens_seen"]) and r["job_wall_s"] > 0
    assert not (out / "eval").exists() and not (out / "report.json").exists()
    assert main(args) == 0  # the whole demo: data and trainings are reused, the evaluations run
    full = json.loads((out / "report.json").read_text())
    assert all(full["job_wall_s"][n] == 0 for n in report["runs"]) and full["job_wall_s"]["eval_memory"] > 0
    assert main([*args, "--stage", "data", "--ablation", "kind"]) == 2
    assert "--stage data runs no ablation" in capsys.readouterr().err
