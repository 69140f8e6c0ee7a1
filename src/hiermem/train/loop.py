"""`hiermem train`: the training loop for the anchor alone or the anchor with hierarchical memories.

Modes (train.mode): anchor (no memory), frozen (anchor fixed, memories learn), cotrain (a trained anchor from
train.init_from and the memories both learn — the paper's best), scratch (both from random init).
Every sequence fetches the blocks on its root-to-leaf path (or, with probability memory.generic_prob, the
generic block); only fetched blocks get gradients and only they are updated (lazy AdamW).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hiermem.config import Config, diff_fields, read_config, save_config, to_dict
from hiermem.data.packing import BatchSampler, PackedDataset, doc_attention_mask
from hiermem.data.prepare import DataDir
from hiermem.data.tokenizer import Tokenizer
from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_dir, atomic_write_json, atomic_write_text
from hiermem.memory.bank import MemoryBank
from hiermem.memory.dispatch import select_rows
from hiermem.memory.optim import LazyAdamW
from hiermem.model.transformer import Transformer, count_parameters
from hiermem.runs import (bank_spec, ensure_packed, load_clustering, parameter_report, resolve_device,
                          resolve_vocab)
from hiermem.train.checkpoint import load_state, load_weights, save_torch, save_weights
from hiermem.train.schedule import warmup_cosine


def anchor_optimizer(model: Transformer, cfg: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains are not decayed), as in nanoGPT."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    t = cfg.train
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=False, foreach=False)


def generic_draw(cfg: Config, step: int, batch: int) -> torch.Tensor:
    """Which sequences use the generic block this step. Seeded by (seed, step): resume-exact, no RNG state."""
    p = cfg.memory.generic_prob
    if p is None:
        p = 1.0 / (cfg.routing.branching + 1)
    if not cfg.memory.generic or p <= 0:
        return torch.zeros(batch, dtype=torch.bool)
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)
    if cfg.memory.generic_sampling == "batch":
        return torch.rand(1, generator=g).expand(batch) < p
    return torch.rand(batch, generator=g) < p


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
        diffs = diff_fields(to_dict(read_config(saved)), to_dict(cfg))
        if diffs:
            raise HiermemError(f"{saved}: this run was made by another config: {'; '.join(diffs)}")
    elif (run_dir / "checkpoint").exists() or (run_dir / "anchor.safetensors").exists():
        raise HiermemError(f"{run_dir}: run directory already holds a run (use --resume, or another train.run_dir)")


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
        self.cfg, self.progress = cfg, progress
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.data = DataDir(cfg.data_dir)
        self.data.check(cfg)
        tok = self.data.tokenizer()
        resolve_vocab(cfg, tok)  # before comparing with a saved config, which holds the resolved size
        if t.mode == "cotrain" and not t.init_from:
            raise HiermemError("config: train.mode=cotrain needs train.init_from (a trained anchor run directory); "
                               "train.mode=scratch trains anchor and memory from random initialisation")
        _check_run_dir(cfg, resume)
        self.device = resolve_device(t.device)
        self.autocast = t.dtype == "bf16" or (t.dtype == "auto" and self.device.type == "cuda")
        torch.manual_seed(t.seed)

        self.clustering = load_clustering(self.data, cfg, required=True) if cfg.pack_by_leaf else None
        self.dataset: PackedDataset = ensure_packed(self.data, cfg, self.clustering, split="train")
        self.model = Transformer(cfg.model).to(self.device)
        init_src = _init_from(cfg, self.model, tok)
        if t.mode == "frozen":
            self.model.requires_grad_(False)
        self.opt = None if t.mode == "frozen" else anchor_optimizer(self.model, cfg)

        self.bank = self.bank_opt = None
        d = cfg.memory.dispatch  # grouped by node reads and updates each shared block once (memory/dispatch.py)
        self.grouped = d == "grouped" or (d == "auto" and self.device.type == "cuda")
        if cfg.uses_memory and not resume:  # on resume, _load_checkpoint opens the checkpoint's bank
            spec = bank_spec(cfg)
            src_bank = init_src / "bank" if init_src is not None else None
            if src_bank is not None and (src_bank / "manifest.json").is_file():
                self.bank = MemoryBank.load(src_bank, mmap=False)
                self.bank.check_compatible(spec)
            else:
                bank_dir = cfg.run_dir / "bank" if cfg.memory.mmap else None
                self.bank = MemoryBank.create(spec, seed=t.seed, dir=bank_dir)
            self.bank_opt = self._bank_optimizer()

        self.steps = total_steps(cfg, len(self.dataset))
        self.sampler = BatchSampler(len(self.dataset), t.batch_size * t.grad_accum, seed=t.seed)
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        if resume:
            self._load_checkpoint()
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")
        shutil.copyfile(self.data.path / "tokenizer.json", cfg.run_dir / "tokenizer.json")
        if cfg.uses_memory:
            self.clustering.tree.save(cfg.run_dir / "tree.npz")

    def _bank_optimizer(self) -> LazyAdamW:
        m, t = self.cfg.memory, self.cfg.train
        return LazyAdamW(self.bank, lr=m.lr, betas=(t.beta1, t.beta2), weight_decay=m.weight_decay)

    # -- one optimisation step -------------------------------------------------------------------------
    def train_step(self, indices: np.ndarray) -> dict:
        cfg, t = self.cfg, self.cfg.train
        batch = self.dataset.batch(indices)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        B = batch["input_ids"].shape[0]
        fetch = None
        if self.bank is not None:
            use_generic = generic_draw(cfg, self.step, B)
            fetch_fn = self.bank.fetch_grouped if self.grouped else self.bank.fetch
            fetch = fetch_fn(batch["paths"].cpu(), use_generic, device=self.device, requires_grad=True)
            self.bank.record(fetch)
        n_valid = (batch["targets"] != -100).sum().clamp(min=1)
        micro = math.ceil(B / t.grad_accum)
        loss_sum = 0.0
        for lo in range(0, B, micro):
            sl = slice(lo, lo + micro)
            mask = doc_attention_mask(batch["segment_ids"][sl])
            memory = None
            if fetch is not None:  # rows sl of the fetched leaves: gradients accumulate into them
                memory = select_rows(fetch.memory, sl)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                _, loss = self.model(batch["input_ids"][sl], batch["targets"][sl], batch["positions"][sl],
                                     mask, memory)
            # weight each micro-batch by its share of valid targets: equals one big batch's mean loss
            share = (batch["targets"][sl] != -100).sum() / n_valid
            (loss * share).backward()
            loss_sum += float(loss.detach()) * float(share)

        lr = warmup_cosine(self.step, self.steps, t.lr, t.lr_min, t.warmup_steps)
        m = cfg.memory
        lr_mem = warmup_cosine(self.step, self.steps, m.lr, m.lr_min, m.warmup_steps)
        params = [p for p in self.model.parameters() if p.grad is not None]
        sq = sum(float(p.grad.float().pow(2).sum()) for p in params)
        block_grads = self.bank.block_grads(fetch) if fetch is not None else None
        if block_grads is not None:
            sq += float(block_grads.norm_sq())
        grad_norm = math.sqrt(sq)
        if t.grad_clip > 0 and grad_norm > t.grad_clip:  # one global norm over anchor and fetched memory
            scale = t.grad_clip / (grad_norm + 1e-6)
            for p in params:
                p.grad.mul_(scale)
            if block_grads is not None:
                block_grads.scale_(scale)
        updated = None
        if self.opt is not None:
            for group in self.opt.param_groups:
                group["lr"] = lr
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if block_grads is not None:
            updated = self.bank_opt.step(block_grads, lr_mem)
        self.step += 1
        tokens = int(n_valid)
        self.tokens_seen += tokens
        out = {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}
        if updated is not None:
            out["lr_memory"] = lr_mem
            out["blocks_updated"] = [int(x) for x in updated]
            out["generic_frac"] = float(use_generic.float().mean())
        return out

    # -- checkpoints ---------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        run = self.cfg.run_dir
        with atomic_dir(run / "checkpoint") as tmp:
            save_weights(self.model, tmp / "model.safetensors")
            if self.opt is not None:
                save_torch(self.opt.state_dict(), tmp / "optimizer.pt")
            if self.bank is not None:
                self.bank.save(tmp / "bank")
                self.bank_opt.save(tmp / "bank")
            atomic_write_json(tmp / "state.json", {
                "step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                "total_steps": self.steps, "sampler": self.sampler.state_dict()})

    def _load_checkpoint(self) -> None:
        ckpt = self.cfg.run_dir / "checkpoint"
        state = load_state(ckpt)
        load_weights(self.model, ckpt / "model.safetensors")
        if self.opt is not None:
            self.opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        if self.cfg.uses_memory:
            m = self.cfg.memory
            if m.mmap:  # the working bank lives in <run>/bank: reset it to the checkpoint's, chunk by chunk
                work = self.cfg.run_dir / "bank"
                MemoryBank.load(ckpt / "bank", mmap=True, cache_levels=0, writable=False).save(work)
                self.bank = MemoryBank.load(work, mmap=True, cache_levels=m.cache_levels)
            else:
                self.bank = MemoryBank.load(ckpt / "bank", mmap=False)
            self.bank.check_compatible(bank_spec(self.cfg))
            self.bank_opt = self._bank_optimizer()
            self.bank_opt.load(ckpt / "bank")
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
        run = self.cfg.run_dir
        save_weights(self.model, run / "anchor.safetensors", metadata={"step": str(self.step)})
        if self.bank is not None:
            self.bank.save(run / "bank")

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
        fetched_before = [c.copy() for c in self.bank.fetch_counts] if self.bank is not None else None
        with open(metrics_path, "a", encoding="utf-8") as metrics:
            while self.step < end:
                t0 = time.perf_counter()
                last = self.train_step(next(batches))
                self.elapsed += time.perf_counter() - t0
                window_tokens += last["tokens"]
                rate = window_tokens / max(1e-9, time.perf_counter() - window_start)
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{rate:,.0f}")
                if self.step % t.log_every == 0 or self.step == end:
                    rec = {"step": self.step, "total_steps": self.steps, **{k: v for k, v in last.items() if k != "tokens"},
                           "tokens_seen": self.tokens_seen, "tok_per_s": rate, "elapsed": self.elapsed}
                    if fetched_before is not None:  # evidence that the memory is used
                        now = self.bank.fetch_counts
                        rec["distinct_fetched"] = [int(((n - b) > 0).sum()) for n, b in zip(now, fetched_before)]
                        fetched_before = [c.copy() for c in now]
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


def train(cfg: Config, resume: bool = False, progress: bool = True) -> dict:
    return Trainer(cfg, resume=resume, progress=progress).run()


__all__ = ["Trainer", "train", "count_parameters"]
