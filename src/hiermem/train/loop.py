"""`hiermem train`: the training loop for the anchor alone or the anchor with hierarchical memories.

Modes (train.mode): anchor (no memory), frozen (anchor fixed, memories learn), cotrain (a trained anchor from
train.init_from and the memories both learn — the paper's best), scratch (both from random init).
Every sequence fetches the blocks on its root-to-leaf path (or, with probability memory.generic_prob, the
generic block); only fetched blocks get gradients and only they are updated (lazy AdamW).

The bank lives in RAM (default) or, with memory.mmap=true, on disk in <run>/bank behind a block cache of
memory.cache_bytes, with the blocks of the next memory.prefetch batches read in the background. Either way
<run>/bank is a format-3 store (memory/store.py) and each checkpoint adds a generation to it holding only the
blocks written since the previous checkpoint (train/checkpoint.py says what a crash can lose: nothing but the
steps since the last complete checkpoint). metrics.jsonl reports the bytes fetched per step and, for a bank on
disk, the bytes read from and written to disk and the cache's hit rate over each logging window.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import deque
from pathlib import Path

import torch
from tqdm import tqdm

from hiermem.config import Config, check_training, diff_fields, read_config, resolve_paths, save_config, to_dict
from hiermem.data.packing import BatchSampler
from hiermem.data.prepare import DataDir
from hiermem.data.tokenizer import Tokenizer, resolve_vocab
from hiermem.device import resolve_device
from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_write_json, atomic_write_text
from hiermem.memory.bank import MemoryBank
from hiermem.memory.files import crash_point
from hiermem.memory.spec import parameter_report, spec_from_config
from hiermem.model.transformer import Transformer
from hiermem.routing.clustering import load_clustering
from hiermem.train.checkpoint import (RUN_FORMAT_VERSION, load_state, load_weights, read_run_format, save_weights,
                                      write_checkpoint, write_run_format)
from hiermem.train.step import TrainStep, anchor_optimizer, bank_optimizer


def total_steps(cfg: Config, n_sequences: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    return max(1, math.ceil(cfg.train.epochs * n_sequences / per_step))


def _check_run_dir(cfg: Config, resume: bool) -> None:
    run_dir = cfg.run_dir
    saved = run_dir / "config.yaml"
    if resume:
        if not (run_dir / "checkpoint" / "state.json").is_file():
            raise HiermemError(f"{run_dir}: nothing to resume (no checkpoint/state.json)")
        version = read_run_format(run_dir)  # a run written by a newer hiermem is refused, not rewritten
        if version < RUN_FORMAT_VERSION:
            raise HiermemError(f"{run_dir}: a run of format {version} cannot be resumed by this hiermem (its "
                               f"checkpoint layout is format {RUN_FORMAT_VERSION}); it still evaluates")
        if (run_dir / "train_summary.json").is_file():
            raise HiermemError(f"{run_dir}: this run is finished (train_summary.json); nothing to resume")
        # format 1 saved relative paths: compare both sides resolved
        diffs = diff_fields(to_dict(resolve_paths(read_config(saved))), to_dict(cfg))
        if diffs:
            raise HiermemError(f"{saved}: this run was made by another config: {'; '.join(diffs)}")
    elif (run_dir / "checkpoint").exists() or (run_dir / "anchor.safetensors").exists():
        raise HiermemError(f"{run_dir}: run directory already holds a run (use --resume, or another train.run_dir)")
    elif (run_dir / "bank").exists():
        raise HiermemError(f"{run_dir / 'bank'}: a bank without a checkpoint (a run stopped before its first "
                           "checkpoint?); remove it or use another train.run_dir")


def _init_from(cfg: Config, model: Transformer, tok: Tokenizer) -> Path | None:
    if not cfg.train.init_from:
        return None
    src = Path(cfg.train.init_from)
    other = read_config(src / "config.yaml")
    diffs = diff_fields(to_dict(other.model), to_dict(cfg.model), "model.")
    if diffs:
        raise HiermemError(f"{src}: anchor made by another model config: {'; '.join(diffs)}")
    if Tokenizer.load(src / "tokenizer.json").fingerprint() != tok.fingerprint():  # same vocab size, other ids
        raise HiermemError(f"{src}: anchor trained with another tokenizer than {cfg.data_dir}/tokenizer.json "
                           "(data.tokenizer / data.vocab_size / data.corpus differ?)")
    load_weights(model, src / "anchor.safetensors")
    return src


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, progress: bool = True):
        check_training(cfg)  # the train.mode / train.init_from rules
        cfg = resolve_paths(cfg)  # the saved config names absolute paths: the run loads from anywhere
        self.cfg, self.progress = cfg, progress
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.data = DataDir(cfg.data_dir)
        self.data.check(cfg)
        tok = self.data.tokenizer()
        resolve_vocab(cfg, tok)  # before comparing with a saved config, which holds the resolved size
        _check_run_dir(cfg, resume)
        self.device = resolve_device(t.device)
        torch.manual_seed(t.seed)

        self.clustering = load_clustering(self.data, cfg, required=True) if cfg.pack_by_leaf else None
        if self.clustering is not None:
            self.dataset = self.data.packed("train", cfg.data.seq_len, self.clustering.doc_paths,
                                            self.clustering.tree.fingerprint())
        else:
            self.dataset = self.data.packed("train", cfg.data.seq_len)
        self.model = Transformer(cfg.model).to(self.device)
        init_src = _init_from(cfg, self.model, tok)
        if t.mode == "frozen":
            self.model.requires_grad_(False)
        self.opt = None if t.mode == "frozen" else anchor_optimizer(self.model, cfg, self.device)

        self.bank = self.bank_opt = None
        self.generation = 0  # of the last checkpoint (and of the bank's store in <run>/bank)
        if cfg.uses_memory and not resume:  # on resume, _load_checkpoint opens the checkpoint's bank
            m = cfg.memory
            src_bank = init_src / "bank" if init_src is not None else None
            source = (MemoryBank.load(src_bank, mmap=True, writable=False, cache_bytes=m.cache_bytes)
                      if src_bank is not None and (src_bank / "manifest.json").is_file() else None)
            self.bank = MemoryBank.create(spec_from_config(cfg), seed=t.seed, weights_from=source,
                                          dir=cfg.run_dir / "bank" if m.mmap else None, dtype=m.dtype,
                                          cache_bytes=m.cache_bytes, prefetch=m.prefetch > 0)
            self._place_bank()
            self.bank_opt = bank_optimizer(self.bank, cfg)

        self.steps = total_steps(cfg, len(self.dataset))
        self.sampler = BatchSampler(len(self.dataset), t.batch_size * t.grad_accum, seed=t.seed)
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        if resume:
            self._load_checkpoint()
        self.train_step = TrainStep(cfg, self.model, self.device, self.steps, self.opt, self.bank, self.bank_opt)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        write_run_format(cfg.run_dir)
        save_config(cfg, cfg.run_dir / "config.yaml")
        shutil.copyfile(self.data.path / "tokenizer.json", cfg.run_dir / "tokenizer.json")
        if cfg.uses_memory:
            self.clustering.tree.save(cfg.run_dir / "tree.npz")

    def _place_bank(self) -> None:
        """On CUDA an in-RAM bank (and so its optimizer state) moves to the GPU: fetch is then a device gather
        and the lazy AdamW runs there. A bank on disk stays in host memory, its blocks copied per step."""
        if self.device.type == "cuda" and not self.bank.on_disk:
            self.bank.to(self.device)

    def advance(self, indices) -> dict:
        """One step on the sequences `indices` of the training set; returns TrainStep's tensors plus the
        number of target tokens (counted on the host copy of the batch: no device sync)."""
        batch = self.dataset.batch(indices)
        tokens = int((batch["targets"] != -100).sum())
        out = self.train_step(batch, self.step)
        self.step += 1
        self.tokens_seen += tokens
        return {**out, "tokens": tokens}

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Checkpoint generation g: the bank's generation g (its blocks written since g-1) in <run>/bank, then the
        checkpoint's files and its state.json (the commit point), then the bank's manifest.json."""
        crash_point("checkpoint")
        g = self.generation + 1
        if self.bank is not None:
            self.bank.commit(self.cfg.run_dir / "bank", generation=g)
        write_checkpoint(self.cfg.run_dir / "checkpoint", g, self.model, self.opt, self.bank_opt, {
            "step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
            "total_steps": self.steps, "sampler": self.sampler.state_dict()})
        self.generation = g
        if self.bank is not None:
            crash_point("publish")
            self.bank.publish()

    def _load_checkpoint(self) -> None:
        ckpt = self.cfg.run_dir / "checkpoint"
        state = load_state(ckpt)
        load_weights(self.model, ckpt / state["files"]["model"])
        if self.opt is not None:
            self.opt.load_state_dict(torch.load(ckpt / state["files"]["optimizer"], weights_only=True))
        self.generation = state["generation"]
        if self.cfg.uses_memory:
            m = self.cfg.memory
            self.bank = MemoryBank.load(self.cfg.run_dir / "bank", mmap=m.mmap, generation=self.generation,
                                        cache_bytes=m.cache_bytes, prefetch=m.prefetch > 0)
            self.bank.check_compatible(spec_from_config(self.cfg))
            self.bank.publish()  # a crash may have come between the checkpoint's commit and this
            self._place_bank()
            self.bank_opt = bank_optimizer(self.bank, self.cfg)
            self.bank_opt.load(ckpt / state["files"]["bank_optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.tokens_seen, self.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop metrics logged after the checkpoint (a crashed run's last steps are redone, not duplicated)."""
        path = self.cfg.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                if json.loads(line)["step"] <= self.step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):  # a line torn by the crash
                continue
        atomic_write_text(path, "".join(keep))

    def save_final(self) -> None:
        """The anchor; the bank is <run>/bank as the last checkpoint published it."""
        save_weights(self.model, self.cfg.run_dir / "anchor.safetensors", metadata={"step": str(self.step)})

    def _prefetcher(self):
        """A function to call before each step: it asks the bank for the blocks of the batch memory.prefetch
        steps ahead (a second sampler, in step with the first, knows it; the first one is not moved)."""
        ahead = self.cfg.memory.prefetch if self.bank is not None and self.bank.on_disk else 0
        if not ahead:
            return lambda: None
        sampler = BatchSampler(self.sampler.n, self.sampler.batch_size, seed=self.sampler.seed)
        sampler.load_state_dict(self.sampler.state_dict())
        upcoming, queued = iter(sampler), deque()

        def prefetch() -> None:
            while len(queued) <= ahead:  # the current step's batch and the next `ahead` ones
                step = self.step + len(queued)
                paths = torch.from_numpy(self.dataset.paths[next(upcoming)].astype("int64"))
                self.train_step.prefetch(paths, step)
                queued.append(step)
            queued.popleft()

        return prefetch

    # -- the loop --------------------------------------------------------------------------------------
    def run(self, stop_at: int | None = None) -> dict:
        """Train to the end (or to step `stop_at`, for tests of --resume); returns a summary."""
        cfg, t = self.cfg, self.cfg.train
        end = self.steps if stop_at is None else min(stop_at, self.steps)
        metrics_path = cfg.run_dir / "metrics.jsonl"
        batches = iter(self.sampler)
        bar = tqdm(total=self.steps, initial=self.step, desc=f"train {cfg.name}", unit="step", mininterval=1.0,
                   disable=not self.progress, dynamic_ncols=True)
        window_tokens, window_start, last = 0, time.perf_counter(), {}
        counts = self.train_step.counts
        fetched_before = counts.snapshot() if counts is not None else None
        io_before = self.bank.io_stats() if self.bank is not None else {}
        prefetch = self._prefetcher()
        with open(metrics_path, "a", encoding="utf-8") as metrics:
            while self.step < end:
                t0 = time.perf_counter()
                prefetch()
                out = self.advance(next(batches))
                self.elapsed += time.perf_counter() - t0
                window_tokens += out["tokens"]
                bar.update(1)
                if self.step % t.log_every == 0 or self.step == end:  # the only host syncs of the loop
                    rate = window_tokens / max(1e-9, time.perf_counter() - window_start)
                    last = as_numbers(out)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{rate:,.0f}")
                    rec = {"step": self.step, "total_steps": self.steps,
                           **{k: v for k, v in last.items() if k != "tokens"},
                           "tokens_seen": self.tokens_seen, "tok_per_s": rate, "elapsed": self.elapsed}
                    if fetched_before is not None:  # evidence that the memory is used
                        now = counts.snapshot()
                        rec["distinct_fetched"] = [int(((n - b) > 0).sum()) for n, b in zip(now, fetched_before)]
                        fetched_before = now
                    if io_before:  # a bank on disk: its traffic over the window
                        io = self.bank.io_stats()
                        rec.update(io_window(io_before, io))
                        io_before = io
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    window_tokens, window_start = 0, time.perf_counter()
                if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < end:
                    self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        if self.step >= self.steps:
            self.save_final()
        summary = {"steps": self.step, "total_steps": self.steps, "tokens_seen": self.tokens_seen,
                   "elapsed_s": round(self.elapsed, 2), "final_loss": last.get("loss"),
                   "parameters": parameter_report(cfg)}
        if self.step >= self.steps:
            atomic_write_json(cfg.run_dir / "train_summary.json", summary)
        return summary


def io_window(before: dict, now: dict) -> dict:
    """A bank on disk's traffic between two io_stats() snapshots, as metrics."""
    hits, misses = now["hits"] - before["hits"], now["misses"] - before["misses"]
    return {"disk_read_bytes": now["read_bytes"] - before["read_bytes"],
            "disk_write_bytes": now["written_bytes"] - before["written_bytes"],
            "cache_hit_rate": hits / max(1, hits + misses), "cache_resident_bytes": now["resident_bytes"]}


def as_numbers(out: dict) -> dict:
    """A step's tensors as Python numbers, for the log (this is where the host waits for the device)."""
    res = {}
    for k, v in out.items():
        if isinstance(v, torch.Tensor):
            v = float(v)
        elif isinstance(v, list):
            v = [int(x) for x in v]
        res[k] = v
    return res


def train(cfg: Config, resume: bool = False, progress: bool = True) -> dict:
    return Trainer(cfg, resume=resume, progress=progress).run()


__all__ = ["Trainer", "as_numbers", "train"]
