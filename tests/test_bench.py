"""hiermem bench --suite train: it times the trainer's own step, end to end on a tiny shape (no timing
assertions: speed is reported, never tested)."""

import json

import torch

from hiermem.bench import SUITES, run_suite
from hiermem.bench.train_throughput import build_step, shape_config, synthetic_batch
from hiermem.train.step import TrainStep


def test_train_suite_writes_json_and_plot(tmp_path):
    res = run_suite("train", out=str(tmp_path), device="cpu", shape="tiny", steps=1, warmup=0, compile=False,
                    rounds=2)
    saved = json.loads((tmp_path / "train.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert (tmp_path / "train.png").stat().st_size > 0
    assert set(saved["variants"]) == {"anchor", "memory"}
    assert saved["variants"]["anchor"]["mode"] == "anchor" and saved["variants"]["memory"]["mode"] == "scratch"
    for r in saved["variants"].values():
        assert r["tok_per_s"] > 0 and r["ratio_vs_anchor"] > 0
    assert saved["variants"]["anchor"]["ratio_vs_anchor"] == 1.0
    for label, figures in saved["rounds_tok_per_s"].items():  # every round's own figure; the table keeps the best
        assert len(figures) == 2 and max(figures) == round(saved["variants"][label]["tok_per_s"], 1)
    assert 0 < saved["flop_bound_ratio"] < 1
    assert res["bank"]["branching"] == 4 and res["bank"]["ranks"] == [8, 4, 2]
    assert "train" in SUITES


def test_the_benchmark_runs_the_trainers_step_and_updates_the_bank():
    cfg = shape_config("tiny", "scratch", "cpu")
    step = build_step(cfg, torch.device("cpu"))
    assert type(step) is TrainStep and step.bank is not None
    before = {k: step.bank.part(k).clone() for k in step.bank.parts()}
    batch = synthetic_batch(cfg, 0, doc_len=0)
    out = step(batch, 0)
    touched = [k for k in before if not torch.equal(before[k], step.bank.part(k))]
    assert touched and torch.isfinite(out["loss"])
    # the blocks updated at the deepest level are exactly the distinct leaves of the rows not drawn generic
    from hiermem.train.step import generic_draw

    path_rows = ~generic_draw(cfg, 0, len(batch["paths"]))
    assert out["blocks_updated"][2] == len(set(batch["paths"][path_rows, 2].tolist())) > 0


def test_synthetic_batches_have_consistent_paths_and_packed_documents():
    cfg = shape_config("tiny", "scratch", "cpu")
    b = synthetic_batch(cfg, 3, doc_len=5)
    k = cfg.routing.branching
    assert torch.equal(b["paths"][:, 0], b["paths"][:, 2] // k**2) and torch.equal(b["paths"][:, 1], b["paths"][:, 2] // k)
    assert b["segment_ids"][0].tolist()[:11] == [0] * 5 + [1] * 5 + [2]
    assert b["positions"][0].tolist()[:11] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0]




def test_data_suite_quick_runs_both_stages_at_three_doubling_sizes(tmp_path, capsys):
    """hiermem bench --suite data --quick: a generated corpus at 1x, 2x, 4x, each stage in its own process."""
    from hiermem.bench.data_scale import size_folder

    res = run_suite("data", out=str(tmp_path), quick=True)
    saved = json.loads((tmp_path / "data.json").read_text())
    assert saved == json.loads(json.dumps(res)) and (tmp_path / "data.png").stat().st_size > 0
    assert list(saved["sizes"]) == ["1x", "2x", "4x"] and "data" in SUITES
    one, two, four = (saved["sizes"][k] for k in ("1x", "2x", "4x"))
    corpus = tmp_path / "data_scale" / "corpus"
    assert size_folder(corpus, 1).parent == size_folder(corpus, 2)  # 2x holds 1x and as much again
    assert one["docs"] < two["docs"] < four["docs"]
    for n, row in ((2, two), (4, four)):  # the corpus doubles: 2x and 4x hold 2 and 4 units of text
        assert abs(row["text_mb"] / one["text_mb"] - n) < 0.1 and row["tokens"] > one["tokens"]
    for row in (one, two, four):
        for stage in ("prepare", "cluster"):
            r = row[stage]
            assert r["seconds"] > 0 and r["samples"] >= 1 and r["peak_rss_anon_mb"] > 10
    assert {".jsonl", ".parquet", ".txt"} <= set(saved["formats"])
    assert {p.name.split(".", 1)[1] for p in size_folder(corpus, 1).iterdir()} >= {"jsonl", "parquet", "txt"}
    q = saved["ratios"]["prepare"]
    assert q["peak_4x_over_1x"] == four["prepare"]["peak_rss_anon_mb"] / one["prepare"]["peak_rss_anon_mb"]
    table = capsys.readouterr().out
    assert all(f"\n{k} " in table for k in ("1x", "2x", "4x")) and "peak 4x/1x" in table


def test_scale_suite_trains_with_a_bank_on_disk_and_reports_memory_and_the_ratio(tmp_path):
    res = run_suite("scale", out=str(tmp_path), quick=True, steps=2, warmup=1)
    saved = json.loads((tmp_path / "scale.json").read_text())
    assert saved == json.loads(json.dumps(res)) and {"scale", "fetch"} <= set(SUITES)
    disk, ram = saved["disk"], saved["ram"]
    assert disk["bytes_on_disk"] >= 0.02e9 and disk["allocated_bytes"] >= disk["bytes_on_disk"]  # data, no holes
    assert disk["branching"] > ram["branching"] and disk["bank_params"] > ram["bank_params"]
    assert 0 < disk["peak_rss_anon_gb"] and disk["cache_peak_bytes"] <= 0.004e9 and disk["disk_read_bytes_per_step"] > 0
    assert saved["ratio"] == disk["tok_per_s"] / ram["tok_per_s"] > 0
    assert not (tmp_path / "scale-bank").exists()  # the store is removed


def test_fetch_suite_times_cold_warm_and_raw_reads_of_one_path(tmp_path):
    res = run_suite("fetch", out=str(tmp_path), quick=True, trials=2)
    saved = json.loads((tmp_path / "fetch.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert set(saved["seconds"]) == {"raw", "cold", "cold_unverified", "warm"}
    assert len(saved["all_seconds"]["cold"]) == 2 and len(saved["all_seconds"]["warm"]) == 3  # the subtree's others
    s = saved["seconds"]
    assert saved["cold_vs_raw"] == s["raw"] / s["cold"] and saved["warm_speedup"] == s["cold"] / s["warm"]
    assert saved["bytes_per_path"] == 2 * 3 * (8 + 4 + 2) * 32 * 4  # layers x 3 x (r1 + r2 + r3) x d, float32
    assert not (tmp_path / "fetch-bank").exists()


def test_knn_suite_measures_the_probing_index_against_the_exact_one(tmp_path):
    """--suite knn, quick (4,000 Wikipedia sentences, WordLlama, 16 leaves): the exact scan and probing every leaf
    agree with the in-RAM index; fewer leaves read fewer documents, each count the probed leaves' sizes."""
    res = run_suite("knn", out=str(tmp_path), quick=True)
    assert json.loads((tmp_path / "knn.json").read_text()) == json.loads(json.dumps(res))
    assert res["documents"] + res["queries"] == 4000 and res["leaves"] == 16 and not (tmp_path / "knn-emb.npy").exists()
    assert (tmp_path / "knn.png").stat().st_size > 0
    p = res["probes"]
    assert set(p) == {"0", "1", "2", "4", "8", "16"}
    for exact in ("0", "16"):
        assert p[exact]["recall_at_10"] == p[exact]["same_leaf"] == p[exact]["same_level0"] == 1.0
        assert p[exact]["docs_read_per_query"] == res["documents"]
    reads = [p[k]["docs_read_per_query"] for k in ("1", "2", "4", "8")]
    assert reads == sorted(reads) and reads[-1] < res["documents"] and 0 < p["1"]["recall_at_10"] < 1


def test_distributed_suite_reduces_only_shared_blocks_and_each_rank_holds_its_shard(tmp_path):
    """--suite distributed, quick (tiny shape, 1 and 2 processes): with bank sharding a step all-reduces for
    memory only the shared blocks (here the generic block and its fetch count), never an owned subtree's
    gradient, and each rank holds in memory only its shard of the bank (the generic block on both)."""
    import numpy as np

    from hiermem.memory.spec import GENERIC, spec_from_config

    run_suite("distributed", out=str(tmp_path), quick=True)
    saved = json.loads((tmp_path / "distributed.json").read_text())
    one, two = saved["cpu"]["1"], saved["cpu"]["2"]
    spec = spec_from_config(shape_config("tiny", "scratch", "cpu"))
    generic = int(np.prod(spec.part_shape(GENERIC)[1:]))
    assert two["sharding"]["shared_units"] == 0 and two["world_size"] == 2
    assert one["allreduce_bytes_per_step"]["memory"] == 0
    assert two["allreduce_bytes_per_step"]["memory"] == (generic + 1) * 4  # float32 gradient + its count
    assert two["allreduce_bytes_per_step"]["memory"] < two["replicated_bank_memory_bytes_per_step"]
    full = one["full_bank_bytes"]
    assert one["bank_resident_bytes_per_rank"] == [full] == [two["full_bank_bytes"]]
    assert max(two["bank_resident_bytes_per_rank"]) < full
    assert sum(two["bank_resident_bytes_per_rank"]) == full + 3 * generic * 4  # weights, m, v: float32
