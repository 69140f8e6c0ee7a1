"""Suite `serve`: `hiermem serve` under load, on loopback, with the bank on disk behind a block cache.

The server is the real command (`python -m hiermem.cli serve RUN memory.mmap=true memory.cache_bytes=...`) in
a child process on a free loopback port; the clients are threads of this process speaking HTTP/1.1 with
keep-alive, streaming (server-sent events). Prompts are the heads of the run's training documents, routed
first (POST /v1/route) so that they can be grouped by subtree (tree level 1). Two phases, both bounded:

* cold vs warm: one client, subtree after subtree, a few consecutive prompts of each. The first prompt of a
  subtree finds its blocks on disk (cold); the next ones share the subtree's blocks, found in the cache
  (warm). Reported per phase: the block-cache hit rate (from /metrics) and the fetch time (the server's own
  timing of each request).
* load: `clients` concurrent clients for `seconds`, each sending greedy streamed completions of
  `max_tokens` tokens over random prompts until the time is up. Reported: requests/s, latency p50/p99,
  time to first token p50/p99 at the client and its split as the server measured it (queue, embed, route,
  fetch, prefill), decode tokens/s, the hit rate, the server's peak RSS (VmHWM) and the errors (must be 0).

Without `run_dir`, a small memory run is trained here first (a synthetic corpus of 16 topics; prepare, cluster
with wordllama, 40 steps): its bank is several times larger than the cache, so blocks are evicted and
reread. The child is stopped at the end (and on any error).
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_write_json

STAGES = ("queue", "embed", "route", "fetch", "prefill")
TOPICS = 16


def synthetic_corpus(path: Path, n_docs: int, seed: int = 0) -> None:
    """Documents about one of TOPICS topics each, every topic with its own made-up vocabulary."""
    rng = random.Random(seed)
    syllables = "ka lo mi ta re su vo ne pa di go ru fe zi ba".split()
    vocab = [[rng.choice(syllables) + rng.choice(syllables) + rng.choice(syllables) for _ in range(40)]
             for _ in range(TOPICS)]
    common = "the of and in is a to with near from".split()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            words = [rng.choice(vocab[i % TOPICS] if rng.random() < 0.7 else common)
                     for _ in range(rng.randint(10, 30))]
            f.write(json.dumps({"id": f"d{i}", "text": " ".join(words).capitalize() + "."}) + "\n")


def build_run(root: Path, quick: bool) -> Path:
    """A small memory run (scratch mode) on a synthetic corpus; reused if root already holds one."""
    from hiermem.config import load_config
    from hiermem.data.prepare import prepare
    from hiermem.routing.clustering import ensure_clustered
    from hiermem.train.loop import train

    run_dir = root / "run"
    if (run_dir / "anchor.safetensors").is_file():
        return run_dir
    root.mkdir(parents=True, exist_ok=True)
    synthetic_corpus(root / "corpus.jsonl", 800 if quick else 3000)
    overrides = [f"data.corpus={root / 'corpus.jsonl'}", f"data.dir={root / 'data'}", f"train.run_dir={run_dir}",
                 "model.n_layers=4", "model.d_model=128", "model.n_heads=4", "model.head_dim=32", "model.d_ff=512",
                 "model.max_seq_len=128", "data.seq_len=128", "data.vocab_size=1024", "routing.encoder=wordllama",
                 "routing.depth=2", "routing.branching=8", "memory.ranks=[32,32]", "train.mode=scratch",
                 f"train.max_steps={10 if quick else 40}", "train.batch_size=8", "train.device=cpu",
                 "train.lr=3e-3", "memory.lr=3e-2", "train.warmup_steps=2"]
    cfg = load_config("tiny", overrides)
    ensure_clustered(cfg, prepare(cfg), progress=False)
    train(cfg, progress=False)
    return run_dir


class Server:
    """`hiermem serve` in a child process on a free loopback port."""

    def __init__(self, run_dir: Path, cache_bytes: int, max_batch: int, log: Path):
        cmd = [sys.executable, "-m", "hiermem.cli", "serve", str(run_dir), "memory.mmap=true",
               f"memory.cache_bytes={cache_bytes}", "--host", "127.0.0.1", "--port", "0",
               "--max-batch", str(max_batch), "--max-waiting", "1024", "--served-model-name", "bench"]
        self.command = " ".join(cmd[2:])
        self._log = open(log, "w", encoding="utf-8")  # stdout too: uvicorn's access log goes there
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while True:
            started = [line for line in log.read_text(encoding="utf-8").splitlines() if line.startswith("serving ")]
            if started:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise HiermemError(f"bench serve: the server did not start (see {log})")
            time.sleep(0.1)
        self.port = int(started[0].split("http://", 1)[1].split()[0].rsplit(":", 1)[1])

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict | str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, None if body is None else json.dumps(body),
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            raw = r.read().decode()
            return r.status, (json.loads(raw) if r.getheader("content-type", "").startswith("application/json")
                              else raw)
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        """The /metrics samples without labels, plus the sums of labelled ones by name."""
        _, text = self.request("GET", "/metrics")
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name.split("{")[0]] = out.get(name.split("{")[0], 0.0) + float(value)
        return out

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def stream_completion(conn: http.client.HTTPConnection, prompt: str, max_tokens: int, eos_id: int) -> dict:
    """One streamed greedy completion of exactly max_tokens tokens (eos is ruled out with logit_bias): latency,
    client-side TTFT, the server's timing, tokens; raises on any error."""
    body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "logit_bias": {str(eos_id): -100}, "stream": True, "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
    ttft = timing = tokens = None
    while True:
        line = r.readline()
        if not line:
            raise RuntimeError("the stream ended without [DONE]")
        if not line.startswith(b"data: "):
            continue
        if line.strip() == b"data: [DONE]":
            break
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        if "timing" in chunk:
            timing = chunk["timing"]
        if ttft is None and chunk["choices"] and (chunk["choices"][0]["text"] or chunk["choices"][0]["finish_reason"]):
            ttft = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    r.read()
    return {"latency": time.perf_counter() - start, "ttft": ttft, "timing": timing, "tokens": tokens}


def _percentiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean())} if len(a) else {}


def route_prompts(server: Server, texts: list[str]) -> dict[int, list[str]]:
    """Prompts grouped by their subtree (the level-1 node of their route)."""
    groups: dict[int, list[str]] = {}
    for t in texts:
        status, r = server.request("POST", "/v1/route", {"prompt": t, "documents": 0})
        if status != 200:
            raise HiermemError(f"bench serve: /v1/route answered {status}: {r}")
        groups.setdefault(r["path"][0], []).append(t)
    return groups


def cold_warm(server: Server, groups: dict[int, list[str]], per_subtree: int, subtrees: int, eos_id: int) -> dict:
    phases = {"cold": {"fetch": [], "hits": 0, "misses": 0}, "warm": {"fetch": [], "hits": 0, "misses": 0}}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        chosen = [g for g in sorted(groups.values(), key=len, reverse=True)[:subtrees]]
        for prompts in chosen:
            for i, prompt in enumerate(prompts[:per_subtree]):
                before = server.metrics()
                r = stream_completion(conn, prompt, 2, eos_id)
                after = server.metrics()
                p = phases["cold" if i == 0 else "warm"]
                p["fetch"].append(r["timing"]["fetch_s"])
                for k in ("hits", "misses"):
                    p[k] += after.get(f"hiermem_block_cache_{k}_total", 0) - before.get(f"hiermem_block_cache_{k}_total", 0)
    finally:
        conn.close()
    out = {}
    for name, p in phases.items():
        reads = p["hits"] + p["misses"]
        out[name] = {"requests": len(p["fetch"]), "hit_rate": p["hits"] / reads if reads else None,
                     "fetch_ms_mean": 1000 * float(np.mean(p["fetch"])) if p["fetch"] else None,
                     "block_reads": int(reads)}
    return out


def load(server: Server, prompts: list[str], clients: int, seconds: float, max_tokens: int, eos_id: int,
         seed: int = 0) -> dict:
    results, errors, lock = [], [], threading.Lock()
    before = server.metrics()
    deadline = time.perf_counter() + seconds

    def client(i: int) -> None:
        rng = random.Random(seed + i)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        try:
            while time.perf_counter() < deadline:
                try:
                    r = stream_completion(conn, rng.choice(prompts), max_tokens, eos_id)
                except Exception as e:  # noqa: BLE001 - counted and reported: the suite requires none
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
                    continue
                with lock:
                    results.append(r)
        finally:
            conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = server.metrics()
    hits = after.get("hiermem_block_cache_hits_total", 0) - before.get("hiermem_block_cache_hits_total", 0)
    misses = after.get("hiermem_block_cache_misses_total", 0) - before.get("hiermem_block_cache_misses_total", 0)
    tokens = sum(r["tokens"] or 0 for r in results)
    return {"clients": clients, "seconds": seconds, "wall_s": wall, "requests": len(results), "errors": len(errors),
            "error_examples": errors[:3], "requests_per_s": len(results) / wall, "decode_tok_per_s": tokens / wall,
            "latency": _percentiles([r["latency"] for r in results]),
            "ttft": _percentiles([r["ttft"] for r in results if r["ttft"] is not None]),
            "ttft_split_ms_mean": {s: 1000 * float(np.mean([r["timing"][f"{s}_s"] for r in results]))
                                   for s in STAGES} if results else {},
            "hit_rate": hits / (hits + misses) if hits + misses else None,
            "mean_batch": ((after.get("hiermem_batch_sequences_sum", 0) - before.get("hiermem_batch_sequences_sum", 0)) /
                           max(1, after.get("hiermem_batch_sequences_count", 0) - before.get("hiermem_batch_sequences_count", 0))),
            "bank_read_mb": (after.get("hiermem_bank_read_bytes_total", 0) - before.get("hiermem_bank_read_bytes_total", 0)) / 2**20}


def run(out: str = "runs/bench", quick: bool = False, run_dir: str | None = None, clients: int | None = None,
        seconds: float | None = None, max_tokens: int | None = None, cache_bytes: int | None = None,
        max_batch: int = 16, prompts: int | None = None) -> dict:
    """Measure, print a table, write serve.json and serve.png into out; returns the results."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    clients, seconds = clients or (2 if quick else 8), seconds or (3.0 if quick else 30.0)
    max_tokens = max_tokens or (8 if quick else 16)
    from hiermem.config import read_config
    from hiermem.data.prepare import DataDir
    from hiermem.data.tokenizer import Tokenizer
    from hiermem.memory.spec import bank_param_counts, spec_from_config

    run_dir = Path(run_dir) if run_dir else build_run(out_dir / "serve_run", quick)
    cfg = read_config(run_dir / "config.yaml")
    bank_bytes = bank_param_counts(spec_from_config(cfg))["bank"] * (2 if cfg.memory.dtype == "bf16" else 4)
    cache_bytes = cache_bytes or max(1 << 20, bank_bytes // 4)
    eos_id = Tokenizer.load(run_dir / "tokenizer.json").eos_id
    data = DataDir(cfg.data_dir)
    heads = [" ".join(t.split()[:8]) for batch in data.iter_texts() for t in batch][: prompts or (48 if quick else 400)]
    server = Server(run_dir, cache_bytes, max_batch, out_dir / "serve_server.log")
    try:
        rss_start = server.peak_rss_mb()
        groups = route_prompts(server, heads)
        phases = cold_warm(server, groups, per_subtree=3 if quick else 6, subtrees=2 if quick else 4, eos_id=eos_id)
        res_load = load(server, heads, clients, seconds, max_tokens, eos_id)
        peak, cache_peak = server.peak_rss_mb(), server.metrics().get("hiermem_block_cache_peak_bytes", 0)
    finally:
        server.stop()
    res = {"suite": "serve", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                         "python": platform.python_version()},
           "server_command": server.command, "run": str(run_dir), "bank_mb": bank_bytes / 2**20,
           "cache_mb": cache_bytes / 2**20, "max_batch": max_batch, "max_tokens": max_tokens,
           "prompts": len(heads), "subtrees": len(groups), "cold_warm": phases, "load": res_load,
           "server_rss_mb": {"after_start": rss_start, "peak": peak}, "cache_peak_mb": cache_peak / 2**20}
    atomic_write_json(out_dir / "serve.json", res)
    print_table(res)
    plot(res, out_dir / "serve.png")
    if res_load["errors"]:
        raise HiermemError(f"bench serve: {res_load['errors']} of {res_load['requests'] + res_load['errors']} "
                           f"requests failed, e.g. {res_load['error_examples'][0]}")
    return res


def print_table(res: dict) -> None:
    ld, cw = res["load"], res["cold_warm"]
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print(f"\nhiermem bench --suite serve: bank {res['bank_mb']:.1f} MB (weights) on disk, block cache "
          f"{res['cache_mb']:.1f} MB, {res['machine']['cpus']} CPUs")
    for name in ("cold", "warm"):
        p = cw[name]
        print(f"  {name:<5} {p['requests']:>3} requests  hit rate {pct(p['hit_rate']):>6}  fetch "
              f"{p['fetch_ms_mean'] or 0:.2f} ms")
    print(f"  load: {ld['clients']} clients x {ld['seconds']:.0f} s: {ld['requests']} requests "
          f"({ld['requests_per_s']:.1f}/s), {ld['errors']} errors, {ld['decode_tok_per_s']:.0f} tok/s, mean batch "
          f"{ld['mean_batch']:.1f}")
    if ld["requests"]:
        print(f"  latency p50 {ld['latency']['p50_ms']:.0f} ms, p99 {ld['latency']['p99_ms']:.0f} ms; TTFT p50 "
              f"{ld['ttft']['p50_ms']:.0f} ms, p99 {ld['ttft']['p99_ms']:.0f} ms = "
              + " + ".join(f"{s} {v:.1f}" for s, v in ld["ttft_split_ms_mean"].items()) + " ms (server, mean)")
    print(f"  hit rate {pct(ld['hit_rate'])}, {ld['bank_read_mb']:.1f} MB read from the bank; block cache peak "
          f"{res['cache_peak_mb']:.1f} MB; server peak RSS {res['server_rss_mb']['peak']:.0f} MB "
          f"({res['server_rss_mb']['after_start']:.0f} MB after start)")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = res["load"]["ttft_split_ms_mean"]
    if not split:
        return
    fig, ax = plt.subplots(figsize=(7, 2.6))
    left = 0.0
    for (stage, ms), color in zip(split.items(), ("#bbbbbb", "#7aa6e0", "#3a7bd0", "#e0a33a", "#5a5a5a")):
        ax.barh([0], [ms], left=left, color=color, label=f"{stage} {ms:.1f} ms")
        left += ms
    ax.set_yticks([])
    ax.set_xlabel("time to first token, server side (mean ms)")
    ld = res["load"]
    ax.set_title(f"{ld['clients']} clients: {ld['requests_per_s']:.1f} req/s, p50 {ld['latency']['p50_ms']:.0f} ms, "
                 f"p99 {ld['latency']['p99_ms']:.0f} ms, hit rate {100 * (ld['hit_rate'] or 0):.0f}%", fontsize=9)
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["build_run", "run", "synthetic_corpus"]
