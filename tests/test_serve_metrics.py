"""serve/metrics.py: Prometheus text format — counters by label, cumulative histogram buckets, scrape-time sources."""

from hiermem.serve.metrics import LATENCY_BUCKETS, Metrics


def samples(text):
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if not line.startswith("#")}


def test_counters_histograms_and_sources_render_in_prometheus_text_format():
    m = Metrics()
    m.inc("hiermem_requests_total", endpoint="/v1/completions", status="200")
    m.inc("hiermem_requests_total", 2, endpoint="/v1/completions", status="200")
    m.inc("hiermem_requests_total", endpoint="/v1/completions", status="400")
    for v in (0.003, 0.01, 0.2, 100.0):
        m.observe("hiermem_request_duration_seconds", v, endpoint="/x")
    m.source("hiermem_sequences_running", lambda: 3)
    m.source("hiermem_block_cache_hits_total", lambda: None)  # no bank on disk: not exported
    text = m.render()
    s = samples(text)
    assert s['hiermem_requests_total{endpoint="/v1/completions",status="200"}'] == 3
    assert s['hiermem_requests_total{endpoint="/v1/completions",status="400"}'] == 1
    bucket = lambda le: s[f'hiermem_request_duration_seconds_bucket{{endpoint="/x",le="{le}"}}']  # noqa: E731
    assert bucket("0.005") == 1 and bucket("0.01") == 2 and bucket("0.25") == 3 and bucket("60") == 3
    assert bucket("+Inf") == 4 and s['hiermem_request_duration_seconds_count{endpoint="/x"}'] == 4
    assert s['hiermem_request_duration_seconds_sum{endpoint="/x"}'] == 100.213
    assert s["hiermem_sequences_running"] == 3 and "hiermem_block_cache_hits_total" not in text
    assert "# TYPE hiermem_request_duration_seconds histogram" in text
    assert "# TYPE hiermem_requests_total counter" in text and "# TYPE hiermem_sequences_running gauge" in text
    assert len([k for k in s if k.startswith("hiermem_request_duration_seconds_bucket")]) == len(LATENCY_BUCKETS) + 1
    assert m.value("hiermem_requests_total", endpoint="/v1/completions", status="200") == 3
