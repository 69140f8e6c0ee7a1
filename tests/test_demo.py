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
