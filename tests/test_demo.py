"""`hiermem demo --quick` end to end (about two minutes): the report's shape, caching, and the core claim."""

import json

import pytest

from hiermem.cli import main
from hiermem.demo import DEPENDS, ROWS, default_spec, job_configs, job_costs

REQUIRED_ROWS = {"anchor", "anchor_staged", "generic", "fetched_centroid", "fetched_knn", "fetched_oracle",
                 "memory_off", "dense2x"}


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    return out


def test_report_has_every_row_and_bucket(quick_demo):
    report = json.loads((quick_demo / "report.json").read_text())
    assert report["buckets"][0] == "unseen" and report["buckets"][-1] == "25+"
    assert REQUIRED_ROWS <= set(report["models"])
    for name, m in report["models"].items():
        assert len(m["accuracy"]) == len(report["buckets"]), name
        assert all(0.0 <= a <= 100.0 for a in m["accuracy"]), name
        assert m["perplexity_real_text"] > 1 and m["perplexity_facts"] > 1
    p = report["parameters"]
    assert p["fetched"] < p["anchor"] < p["dense2x"] and p["bank"] > p["fetched"]
    assert set(report["routing_agreement"]) == {"centroid", "knn"}
    assert (quick_demo / "accuracy_by_bucket.png").stat().st_size > 10_000
    assert "fetched_knn" in (quick_demo / "report.txt").read_text()


def test_fetched_memory_recalls_frequent_facts_the_anchor_misses(quick_demo):
    """The method's claim at toy scale: on the two most frequent buckets the fetched memory is far ahead."""
    m = json.loads((quick_demo / "report.json").read_text())["models"]
    top = lambda name: sum(m[name]["accuracy"][-2:]) / 2  # noqa: E731
    assert top("fetched_knn") >= top("anchor") + 20
    assert top("fetched_knn") >= top("generic") + 20
    # the generic block and memory-off are the same trained model without retrieval: no help from routing
    assert top("generic") < top("fetched_oracle")


def test_rerun_reuses_every_cached_stage(quick_demo, capsys):
    assert main(["demo", "--quick", "--quiet", "--out", str(quick_demo)]) == 0
    report = json.loads((quick_demo / "report.json").read_text())
    assert all(v == 0.0 for v in report["job_wall_s"].values()), report["job_wall_s"]


def test_job_graph_is_consistent(tmp_path):
    spec = default_spec(quick=True)
    configs = job_configs(spec, tmp_path)
    assert set(job_costs(spec)) == set(DEPENDS)
    assert {run for run, _, _ in ROWS.values()} <= set(configs)
    assert configs["memory"].train.init_from == str(configs["phase1"].run_dir)
    assert configs["anchor_staged"].train.init_from == str(configs["phase1"].run_dir)
    # every model sees the same number of epochs over the same corpus
    total = configs["anchor"].train.epochs
    assert configs["phase1"].train.epochs + configs["memory"].train.epochs == total
    assert configs["phase1"].train.epochs + configs["anchor_staged"].train.epochs == total
    assert configs["dense2x"].train.epochs == total
    assert configs["dense2x"].model.d_model > configs["anchor"].model.d_model


def test_demo_overrides_reach_every_run(tmp_path, capsys):
    """Dot-list overrides after `hiermem demo` are applied (and checked) for every run's config."""
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path), "train.lr=fast"]) == 2
    assert "train.lr" in capsys.readouterr().err
    spec = default_spec(quick=True)
    spec.user_overrides = ("memory.generic_prob=0.25", "train.lr=5e-4")
    configs = job_configs(spec, tmp_path)
    assert all(c.memory.generic_prob == 0.25 and c.train.lr == 5e-4 for c in configs.values())
