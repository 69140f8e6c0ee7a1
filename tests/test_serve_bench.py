"""The decode and serve benchmark suites (bench/decode.py, bench/serve_load.py), end to end on tiny shapes and
for a second or two (speed is reported, never tested)."""

import json

import pytest

from hiermem.bench import SUITES, run_suite

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.torch_threads


def test_decode_suite_times_cache_and_memory_variants(tmp_path):
    res = run_suite("decode", out=str(tmp_path), shape="tiny", batch=3, max_new=4, rounds=1)
    saved = json.loads((tmp_path / "decode.json").read_text())
    assert saved == json.loads(json.dumps(res)) and (tmp_path / "decode.png").stat().st_size > 0
    v = saved["variants"]
    assert set(v) == {"cache", "cache, no memory", "no cache", "no cache, no memory"}
    assert all(r["tok_per_s"] > 0 for r in v.values()) and v["no cache"]["speedup_vs_no_cache"] == 1.0
    assert v["cache"]["kv_cache"] and v["cache"]["memory"] and not v["no cache, no memory"]["memory"]
    assert {"decode", "serve"} <= set(SUITES)


def test_serve_suite_loads_a_real_server_with_the_bank_on_disk(tmp_path, memory_run):
    res = run_suite("serve", out=str(tmp_path), quick=True, run_dir=str(memory_run), clients=2, seconds=1.5,
                    prompts=24)
    saved = json.loads((tmp_path / "serve.json").read_text())
    assert saved == json.loads(json.dumps(res))
    load = saved["load"]
    assert load["errors"] == 0 and load["requests"] > 0 and load["requests_per_s"] > 0
    assert set(load["ttft_split_ms_mean"]) == {"queue", "embed", "route", "fetch", "prefill"}
    assert load["latency"]["p99_ms"] >= load["latency"]["p50_ms"] > 0
    assert 0 <= load["hit_rate"] <= 1 and saved["server_rss_mb"]["peak"] > 0
    assert saved["cold_warm"]["cold"]["requests"] > 0 and saved["cold_warm"]["warm"]["requests"] > 0
    assert "memory.mmap=true" in saved["server_command"] and 0 < saved["cache_peak_mb"] <= saved["cache_mb"]
    assert "Shutting down" in (tmp_path / "serve_server.log").read_text()  # the child was stopped
