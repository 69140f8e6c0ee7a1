"""The benchmark runs end to end on a tiny shape and writes its table's numbers (no timing assertions)."""

import json

from hiermem.bench import SHAPES, flops_per_token, run_bench
from hiermem.memory.bank import BankSpec


def test_bench_writes_json_and_plot(tmp_path):
    res = run_bench(out=tmp_path, device="cpu", shape="tiny", steps=1, warmup=0, compile=False, rounds=1)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert set(saved["variants"]) == {"anchor", "memory-gather", "memory-grouped"}
    for r in saved["variants"].values():
        assert r["tok_per_s"] > 0 and r["ratio_vs_anchor"] > 0
    assert 0 < saved["flop_bound_ratio"] < 1
    assert saved["parity"]["block_grad_max_rel_diff"] < 1e-5
    assert res["bank"]["branching"] == SHAPES["tiny"].branching


def test_flop_model_matches_the_paper_160m_shape():
    cfg = SHAPES["gpu"].model
    spec = BankSpec(d=512, n_layers=35, ranks=(256, 64, 16), branching=16)
    f = flops_per_token(cfg, 2048, spec)
    assert f["memory"] == 6 * 18_063_360  # 6 x the fetched (256, 64, 16, 0) memory of METHOD.md
    assert 0.9 < f["flop_bound_ratio"] < 0.92
