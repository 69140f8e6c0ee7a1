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

Faults. A process killed at any instant resumes with --resume to the same weights and losses (from its last
complete checkpoint; a run killed before its first starts again, its partial files cleared). SIGINT/SIGTERM
stop cleanly at the next step boundary after a checkpoint (train/stop.py). A NaN/Inf loss or gradient norm
stops the run before any checkpoint is written after it, or with train.nonfinite=skip masks that step's
update (train/step.py). A write that fails (a full disk) names the file and the checkpoint to resume from.

Under torchrun (train/parallel.py) every process runs this loop on its share of each global batch: the anchor
is wrapped in DDP or FSDP2; in memory runs each rank trains on the sequences of the subtrees it owns
(data/sharding.py) and updates only their blocks, the blocks several ranks share being reduced among them
(memory/shard.py); an in-RAM bank holds on each rank only the blocks it fetches, with their moments and step
counts. The global batch (train.batch_size x train.grad_accum sequences) does not depend on the
world size, so neither do the schedule nor a checkpoint: a run resumes at any world size. Rank 0 alone writes
the progress bar, metrics.jsonl and the run's files; the bank is written by every rank (memory/store.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hiermem.config import (Config, check_training, diff_fields, from_dict, read_config, resolve_paths, save_config,
                             to_dict)
from hiermem.data.packing import BatchSampler
from hiermem.data.prepare import DataDir
from hiermem.data.sharding import PathRuns, ShardedSampler, plan_shards, rank_pools
from hiermem.data.tokenizer import Tokenizer, resolve_vocab
from hiermem.device import resolve_device
from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_write_json, atomic_write_text
from hiermem.integrity import read_json, record, seal, unseal
from hiermem.locking import DirLock
from hiermem.memory.bank import MemoryBank
from hiermem.memory.files import crash_point
from hiermem.memory.shard import ShardReducer, held_blocks
from hiermem.memory.spec import GENERIC
from hiermem.memory.spec import parameter_report, spec_from_config
from hiermem.model.build import build_model
from hiermem.model.transformer import Transformer
from hiermem.routing.clustering import load_clustering
from hiermem.routing.tree import Tree
from hiermem.train.checkpoint import (RUN_FORMAT_VERSION, STATE_JSON, load_state, load_weights, read_run_format,
                                      save_weights, write_checkpoint, write_run_format)
from hiermem.train.parallel import (close_world, collective_errors, full_model_state, full_optimizer_state,
                                    init_world, is_sharded, load_optimizer_state, wrap_anchor)
from hiermem.train.flops import flops_per_token, peak_flops
from hiermem.train.profile import StepProfiler
from hiermem.train.step import TrainStep, anchor_optimizer, bank_optimizer
from hiermem.train.stop import StopSignals, Stopped, deadline, exit_code


def total_steps(cfg: Config, n_sequences: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    per_step = cfg.train.batch_size * cfg.train.grad_accum
    return max(1, math.ceil(cfg.train.epochs * n_sequences / per_step))


# train.* keys a resumed run may change: how the run is spread over processes, and how it reacts to a signal
RESUME_FREE = ("parallel", "dist_timeout_s", "data_shards", "stop_timeout_s", "profile_steps")
PARTIAL = ("bank", "checkpoint", "metrics.jsonl", "anchor.safetensors")  # what a run writes after its config


def training_rows(data: DataDir, cfg: Config):
    """(clustering or None, the packed training rows) of a run: per leaf when it packs by leaf, else in corpus
    order; packed on first use and cached in the data directory (so a machine may pack before another trains)."""
    clustering = load_clustering(data, cfg, required=True) if cfg.pack_by_leaf else None
    if clustering is None:
        return None, data.packed("train", cfg.data.seq_len, algo=cfg.data.packing_algo)
    return clustering, data.packed("train", cfg.data.seq_len, clustering.doc_paths, clustering.tree.fingerprint(),
                                   algo=cfg.data.packing_algo)


def _check_run_dir(cfg: Config, resume: bool) -> bool:
    """Refuse a run directory this run cannot use. Returns True when --resume finds a run killed before its
    first checkpoint (its config.yaml, no checkpoint/state.json): it then starts from the beginning, its partial
    files (PARTIAL) cleared by the caller."""
    run_dir = cfg.run_dir
    saved = run_dir / "config.yaml"
    if resume:
        started = (run_dir / "checkpoint" / "state.json").is_file()
        if not started and not saved.is_file():
            raise HiermemError(f"{run_dir}: nothing to resume (no checkpoint/state.json)")
        version = read_run_format(run_dir)  # a run written by a newer hiermem is refused, not rewritten
        if version < RUN_FORMAT_VERSION:
            raise HiermemError(f"{run_dir}: a run of format {version} cannot be resumed by this hiermem (its "
                               f"checkpoint layout is format {RUN_FORMAT_VERSION}); it still evaluates")
        if (run_dir / "train_summary.json").is_file():
            raise HiermemError(f"{run_dir}: this run is finished (train_summary.json); nothing to resume")
        # format 1 saved relative paths: compare both sides resolved; how the run is spread over processes
        # (RESUME_FREE) does not change what it computes, so a run resumes at another world size
        before = to_dict(resolve_paths(read_config(saved)))
        before["train"].update({k: getattr(cfg.train, k) for k in RESUME_FREE})
        diffs = diff_fields(before, to_dict(cfg))
        if diffs:
            raise HiermemError(f"{saved}: this run was made by another config: {'; '.join(diffs)}")
        return not started
    if (run_dir / "checkpoint").exists() or (run_dir / "anchor.safetensors").exists() \
            or (run_dir / "metrics.jsonl").exists():
        raise HiermemError(f"{run_dir}: run directory already holds a run (use --resume, or another train.run_dir)")
    if (run_dir / "bank").exists():
        raise HiermemError(f"{run_dir / 'bank'}: a bank without a checkpoint (a run stopped before its first "
                           "checkpoint?); use --resume, remove it or use another train.run_dir")
    return False


def _clear_partial(run_dir: Path) -> None:
    """A run killed before its first checkpoint starts again: what it wrote after its config goes."""
    for name in PARTIAL:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


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


def _check_init_tree(src: Path, bank: MemoryBank, tree: Tree, data_dir: Path) -> None:
    """A bank from train.init_from means something only over the tree it was trained on: the new data must be
    routed into that tree (`hiermem cluster` with routing.tree_from=src), so that training adds to the blocks
    the new documents reach and leaves the others as they were."""
    spec, mine = bank.spec, Path(data_dir) / "cluster" / "tree.npz"
    if (tree.depth, tree.branching) != (spec.depth, spec.branching):
        raise HiermemError(f"{mine}: a tree of depth {tree.depth}, branching {tree.branching}; the bank of "
                           f"train.init_from {src} has depth {spec.depth}, branching {spec.branching}")
    if not (src / "tree.npz").is_file():
        raise HiermemError(f"{src}: a memory run without tree.npz")
    if Tree.load(src / "tree.npz").fingerprint() != tree.fingerprint():
        raise HiermemError(f"{mine}: another tree than {src / 'tree.npz'} (cluster the new data with "
                           f"routing.tree_from={src})")


def _checkpoint_shape(cfg: Config) -> tuple[Config, list[str]]:
    """Post-hoc memories (model.hf): the model's shape is the checkpoint's; notes name the preset's keys it
    replaces."""
    if not cfg.model.hf:
        return cfg, []
    from hiermem.model.hf.causal_lm import checkpoint_shape

    model, notes = checkpoint_shape(cfg.model)
    return from_dict({**to_dict(cfg), "model": dataclasses.asdict(model)}), notes


def _check_hf_tokenizer(cfg: Config, tok: Tokenizer) -> None:
    """A post-hoc run's data must be tokenised with the checkpoint's own tokenizer (same ids)."""
    if not cfg.model.hf:
        return
    path = Path(cfg.model.hf) / "tokenizer.json"
    if not path.is_file():
        raise HiermemError(f"{cfg.model.hf}: no tokenizer.json (a post-hoc run packs with the checkpoint's tokenizer)")
    if Tokenizer.load(path).fingerprint() != tok.fingerprint():
        raise HiermemError(f"{cfg.data_dir}: tokenised with another tokenizer than {path} (prepare the data with "
                           f"data.tokenizer={path})")


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, progress: bool = True):
        check_training(cfg)  # the train.mode / train.init_from rules
        cfg = resolve_paths(cfg)  # the saved config names absolute paths: the run loads from anywhere
        cfg, notes = _checkpoint_shape(cfg)
        self.cfg = cfg
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        device = resolve_device(t.device)
        self.world = init_world(device, t.dist_timeout_s)
        self.device = self.world.device(device)
        self.progress = progress and self.world.is_main
        if self.world.is_main:
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
        # one training per run directory: rank 0 holds its lock (hiermem/locking.py) from setup to the end of run()
        self._lock = DirLock(cfg.run_dir, "train") if self.world.is_main else None
        with collective_errors(self.world, t.dist_timeout_s):
            try:
                if self._lock is not None:
                    self._lock.acquire()
                self._setup(resume)
            except BaseException:
                if self._lock is not None:
                    self._lock.release()
                raise

    def _setup(self, resume: bool) -> None:
        cfg, t, world = self.cfg, self.cfg.train, self.world
        self.data = DataDir(cfg.data_dir)
        self.data.check(cfg)
        tok = self.data.tokenizer()
        _check_hf_tokenizer(cfg, tok)
        resolve_vocab(cfg, tok)  # before comparing with a saved config, which holds the resolved size
        if _check_run_dir(cfg, resume):  # --resume of a run killed before its first checkpoint: start it again
            resume = False
            if world.is_main:
                _clear_partial(cfg.run_dir)
        world.barrier()  # every rank has checked the run directory before rank 0 writes into it
        if world.is_main and not resume:  # first: a run killed from here on is one --resume knows (its config)
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            write_run_format(cfg.run_dir)
            save_config(cfg, cfg.run_dir / "config.yaml")
            record(cfg.run_dir / "config.yaml")
        torch.manual_seed(t.seed)

        self.clustering, self.dataset = training_rows(self.data, cfg)
        self.model = build_model(cfg).to(self.device)
        init_src = _init_from(cfg, self.model, tok)
        if t.mode == "frozen":
            self.model.requires_grad_(False)
        state = load_state(cfg.run_dir / "checkpoint") if resume else None
        if state is not None:
            load_weights(self.model, cfg.run_dir / "checkpoint" / state["files"]["model"])
        self.module = wrap_anchor(self.model, world, t.parallel)  # after loading: FSDP2 shards in place
        self.opt = None if t.mode == "frozen" else anchor_optimizer(self.model, cfg)
        if t.init_optimizer and init_src is not None and self.opt is not None and state is None:
            self._continue_optimizer(init_src)

        self.bank = self.bank_opt = None
        self.generation = 0  # of the last checkpoint (and of the bank's store in <run>/bank)
        # on resume, _load_checkpoint opens the checkpoint's bank; a job's, once its shard plan is known
        if cfg.uses_memory and not resume and not world.distributed:
            self.bank = self._new_bank(init_src, dir=cfg.run_dir / "bank" if cfg.memory.mmap else None)
            self._place_bank()
            self.bank_opt = bank_optimizer(self.bank, cfg)

        self.steps = total_steps(cfg, len(self.dataset))
        per_step = t.batch_size * t.grad_accum
        self.sampler = BatchSampler(len(self.dataset), per_step, seed=t.seed, work_dir=cfg.run_dir)
        self.shards = self._shard_plan(per_step)
        self.sharers = self._sharers() if cfg.uses_memory and world.distributed else None
        if cfg.uses_memory and not resume and world.distributed:
            self._shared_bank(init_src)
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self.skipped_before = 0  # steps masked by train.nonfinite=skip before this process (from the checkpoint)
        self._unsynced_tokens = 0  # this rank's target tokens not yet added to tokens_seen (summed over ranks)
        if resume:
            self._load_checkpoint(state)
        self.reducer = None
        if self.bank is not None and world.distributed:
            comm = self.device if self.device.type == "cuda" else torch.device("cpu")
            self.reducer = ShardReducer(self.bank.spec, self.sharers, world.rank, world.size, comm,
                                        world.comm_bytes)
        self.train_step = TrainStep(cfg, self.model, self.device, self.steps, self.opt, self.bank, self.bank_opt,
                                    world=world, module=self.module, reducer=self.reducer)
        if world.is_main:
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            write_run_format(cfg.run_dir)
            save_config(cfg, cfg.run_dir / "config.yaml")
            shutil.copyfile(self.data.path / "tokenizer.json", cfg.run_dir / "tokenizer.json")
            if (self.data.path / "tokenizer_config.json").is_file():  # a checkpoint's own eos (not <|endoftext|>)
                shutil.copyfile(self.data.path / "tokenizer_config.json", cfg.run_dir / "tokenizer_config.json")
            if cfg.uses_memory:
                self.clustering.tree.save(cfg.run_dir / "tree.npz")
            written = ("config.yaml", "tokenizer.json", "tokenizer_config.json", "tree.npz")
            record(*(cfg.run_dir / n for n in written if (cfg.run_dir / n).is_file()))  # <run>/.checksums.json

    def _new_bank(self, init_src: Path | None, dir: Path | None) -> MemoryBank:
        m = self.cfg.memory
        src_bank = init_src / "bank" if init_src is not None else None
        source = (MemoryBank.load(src_bank, mmap=True, writable=False, cache_bytes=m.cache_bytes)
                  if src_bank is not None and (src_bank / "manifest.json").is_file() else None)
        if source is not None:
            _check_init_tree(init_src, source, self.clustering.tree, self.cfg.data_dir)
        return MemoryBank.create(spec_from_config(self.cfg), seed=self.cfg.train.seed, weights_from=source, dir=dir,
                                 dtype=m.dtype, cache_bytes=m.cache_bytes, prefetch=m.prefetch > 0)

    def _shared_bank(self, init_src: Path | None) -> None:
        """A job's bank: rank 0 writes it, block by block (none stays in memory), as generation 0 of <run>/bank
        with the values one process would make; then every rank opens that store (the one its checkpoints
        extend, memory/store.py) and reads its own shard of it."""
        bank_dir = self.cfg.run_dir / "bank"
        if self.world.is_main:
            bank_dir.parent.mkdir(parents=True, exist_ok=True)
            self._new_bank(init_src, dir=bank_dir)  # on disk, with room for the moments (zeros); dropped
        self.world.barrier()
        self.bank = self._job_bank(0)
        self._place_bank()
        self.bank_opt = bank_optimizer(self.bank, self.cfg)

    def _sharers(self) -> dict[str, dict[int, tuple[int, ...]]]:
        """Per part of the bank, node id -> the ranks of this job that fetch it (the generic block: all)."""
        spec = spec_from_config(self.cfg)
        sharers = {f"level{l}": self.shards[0].sharers(l) for _, l, _, _ in spec.level_parts()}
        if spec.generic:
            sharers[GENERIC] = {0: tuple(range(self.world.size))}
        return sharers

    def _job_bank(self, generation: int) -> MemoryBank:
        """<run>/bank at `generation`: in a job with the bank in RAM, only this rank's shard of it (the blocks it
        fetches, memory/shard.py); on disk, the whole store behind the block cache (it reads what is fetched)."""
        m = self.cfg.memory
        held = None if m.mmap or self.sharers is None else held_blocks(self.sharers, self.world.rank)
        return MemoryBank.load(self.cfg.run_dir / "bank", mmap=m.mmap, generation=generation,
                               cache_bytes=m.cache_bytes, prefetch=m.prefetch > 0, held=held)

    def _shard_plan(self, per_step: int):
        """(plan, sampler) when a memory run is split into data shards (several ranks, or train.data_shards on
        one process), else None: one process, or an anchor-only run (whose ranks split each global batch)."""
        world, t = self.world, self.cfg.train
        if not self.cfg.uses_memory or (not world.distributed and t.data_shards <= 1):
            return None
        n = t.data_shards or world.size
        if world.distributed and n != world.size:
            raise HiermemError(f"config: train.data_shards={n} on a job of {world.size} processes (0, or the "
                               "world size)")
        if per_step % n:
            raise HiermemError(f"config: the global batch (train.batch_size x train.grad_accum = {per_step}) "
                               f"must divide evenly over {n} data shards")
        runs = PathRuns.scan(self.dataset.paths, self.dataset.row_tokens)  # one run per leaf: nothing per row
        plan = plan_shards(runs, n)
        sampler = ShardedSampler(rank_pools(plan, runs), per_step // n, seed=t.seed, work_dir=self.cfg.run_dir)
        return plan, sampler

    def _indices(self, batches, step: int) -> np.ndarray:
        """This process's sequences of step `step`: the plain sampler's batch on one process, its share on a
        rank of an anchor-only job, its own shard's batch (or the union of all shards') in a memory run."""
        if self.shards is not None:
            sampler = self.shards[1]
            return sampler.batch(step, self.world.rank) if self.world.distributed else sampler.union(step)
        batch = next(batches)
        if self.world.distributed:
            return np.array_split(batch, self.world.size)[self.world.rank]
        return batch

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
        if self.world.distributed:
            self._unsynced_tokens += tokens
        else:
            self.tokens_seen += tokens
        return {**out, "tokens": tokens}

    def _sync_tokens(self) -> None:
        """tokens_seen += the target tokens every rank trained on since the last call (a collective)."""
        if self.world.distributed:
            self.tokens_seen += self.world.sum_int(self._unsynced_tokens, self.device)
            self._unsynced_tokens = 0

    def _sampler_state(self) -> dict:
        if self.shards is None:
            return self.sampler.state_dict()
        return {"kind": "sharded", "shards": self.shards[1].world, "step": self.step}

    # -- checkpoints ---------------------------------------------------------------------------------------
    def last_good(self) -> str:
        """Which checkpoint a failed or abandoned run resumes from, as the one-line messages say it (read from
        disk: the one whose state.json is there now)."""
        try:  # state.json's own seal only: a message need not re-read every checkpoint file
            step = read_json(self.cfg.run_dir / "checkpoint" / STATE_JSON)["step"]
            return f"the last good checkpoint is step {step}"
        except (HiermemError, KeyError, TypeError):
            return "there is no checkpoint yet"

    def check_finite(self) -> None:
        """With train.nonfinite=stop, an error naming the first step whose loss or gradient norm was NaN/Inf
        (the device flags are read here: at logging steps and before every checkpoint, so the error may come up
        to train.log_every steps late, but no checkpoint is ever written after a bad step)."""
        bad, what, _ = self.train_step.nonfinite()
        if bad is not None and self.cfg.train.nonfinite == "stop":
            raise HiermemError(f"non-finite {what} at step {bad + 1}; {self.last_good()}")

    def skipped_steps(self) -> int:
        """Steps whose update train.nonfinite=skip masked, since the run began (a host sync)."""
        return self.skipped_before + self.train_step.nonfinite()[2]

    def save_checkpoint(self) -> None:
        """Checkpoint the run (see _write_checkpoint), after checking that no step since the last one was
        non-finite. A write that fails (a full disk, a permission) leaves the previous checkpoint the valid one
        and is reported in one line."""
        self.check_finite()
        try:
            self._write_checkpoint()
        except OSError as e:
            raise HiermemError(f"checkpoint at step {self.step} failed: {os_reason(e)}; {self.last_good()}") from None

    def _write_checkpoint(self) -> None:
        """Checkpoint generation g: the bank's generation g (its blocks written since g-1) in <run>/bank, then the
        checkpoint's files and its state.json (the commit point), then the bank's manifest.json.

        In a job every rank writes its blocks and sends their table rows to rank 0 (a collective, so it comes
        after every shard is on disk); rank 0 then writes the table, the anchor, state.json and the manifest."""
        crash_point("checkpoint")
        world = self.world
        g = self.generation + 1
        self._sync_tokens()
        if self.bank is not None:
            self.bank.commit(self.cfg.run_dir / "bank", generation=g,
                             gather=world.gather if world.distributed else None)
        bank_opt = self.bank_opt  # in a job: every rank's step counts, on rank 0
        if self.bank_opt is not None and world.distributed:
            bank_opt = self.bank_opt.gathered(world.gather)
        named = is_sharded(self.model)
        weights, opt = self.model, self.opt
        if named:
            weights = full_model_state(self.model)
            if weights is not None and self.cfg.model.tie_embeddings:
                weights.pop("lm_head.weight", None)
            opt = full_optimizer_state(self.model, self.opt) if self.opt is not None else None
        if world.is_main:
            write_checkpoint(self.cfg.run_dir / "checkpoint", g, weights, opt, bank_opt, {
                "step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                "total_steps": self.steps, "sampler": self._sampler_state(), "world_size": world.size,
                "optimizer_named": named, "skipped_steps": self.skipped_steps()})
        self.generation = g
        if self.bank is not None and world.is_main:
            crash_point("publish")
            self.bank.publish()
        world.barrier()

    def _continue_optimizer(self, src: Path) -> None:
        """train.init_optimizer: the anchor's AdamW moments from init_from's final checkpoint, so that a run
        continuing another's schedule does not restart Adam's statistics."""
        ckpt = src / "checkpoint"
        state = load_state(ckpt)
        if state["step"] != state.get("total_steps"):
            raise HiermemError(f"{src}: train.init_optimizer needs a finished run (its checkpoint is at step "
                               f"{state['step']} of {state.get('total_steps')})")
        saved = torch.load(ckpt / state["files"]["optimizer"], weights_only=True)
        load_optimizer_state(self.model, self.opt, saved, named=state.get("optimizer_named", False))

    def _load_checkpoint(self, state: dict) -> None:
        ckpt = self.cfg.run_dir / "checkpoint"
        if self.opt is not None:
            saved = torch.load(ckpt / state["files"]["optimizer"], weights_only=True)
            load_optimizer_state(self.model, self.opt, saved, named=state.get("optimizer_named", False))
        self.generation = state["generation"]
        if self.cfg.uses_memory:
            self.bank = self._job_bank(self.generation)
            self.bank.check_compatible(spec_from_config(self.cfg))
            if self.world.is_main:
                self.bank.publish()  # a crash may have come between the checkpoint's commit and this
            self._place_bank()
            self.bank_opt = bank_optimizer(self.bank, self.cfg)
            self.bank_opt.load(ckpt / state["files"]["bank_optimizer"])
        sampler = state["sampler"]
        if sampler.get("kind") == "sharded":  # a stateless sampler's step; the plain sampler goes there
            per_epoch = self.sampler.batches_per_epoch
            sampler = {"epoch": state["step"] // per_epoch, "cursor": state["step"] % per_epoch * self.sampler.batch_size,
                       "seed": self.sampler.seed, "n": self.sampler.n}
        self.sampler.load_state_dict(sampler)
        self.step, self.tokens_seen, self.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
        self.skipped_before = state.get("skipped_steps", 0)
        if self.world.is_main:
            self._truncate_metrics()
        self.world.barrier()

    def _truncate_metrics(self) -> None:
        """Drop metrics logged after the checkpoint (a crashed run's last steps are redone, not duplicated)."""
        path = self.cfg.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                if unseal(path, json.loads(line))["step"] <= self.step:  # each line carries its crc32
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):  # a line torn by the crash
                continue
            except HiermemError as e:  # a damaged line is dropped, not kept as if it were what was logged
                print(f"warning: {e}: dropped the line {line.strip()[:60]!r}", file=sys.stderr)
        atomic_write_text(path, "".join(keep))

    def save_final(self) -> None:
        """The anchor (rank 0; gathered first under FSDP2); the bank is <run>/bank as the last checkpoint
        published it."""
        weights = full_model_state(self.model) if is_sharded(self.model) else self.model
        if self.world.is_main:
            if isinstance(weights, dict) and self.cfg.model.tie_embeddings:
                weights.pop("lm_head.weight", None)
            save_weights(weights, self.cfg.run_dir / "anchor.safetensors", metadata={"step": str(self.step)})

    def _prefetcher(self):
        """A function to call before each step: it asks the bank for the blocks of the batch memory.prefetch
        steps ahead (a second sampler, in step with the first, knows it; the first one is not moved)."""
        ahead = self.cfg.memory.prefetch if self.bank is not None and self.bank.on_disk else 0
        if not ahead:
            return lambda: None
        if self.shards is not None:  # the sharded sampler is a function of the step
            def prefetch_sharded() -> None:
                for step in range(self.step, self.step + ahead + 1):
                    if step not in queued:
                        paths = self.dataset.paths[self._indices(None, step)]
                        self.train_step.prefetch(torch.from_numpy(paths.astype("int64")), step)
                        queued.append(step)
                while queued and queued[0] < self.step:
                    queued.popleft()

            queued = deque()
            return prefetch_sharded
        sampler = BatchSampler(self.sampler.n, self.sampler.batch_size, seed=self.sampler.seed,
                               work_dir=self.sampler.work_dir)
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
    def _flop_model(self) -> tuple[float, float | None]:
        """FLOPs per trained token (train/flops.py's count) and the job's peak FLOP/s (world size x the device's
        dense bf16 peak; None off a known accelerator): fixed for a run, computed once."""
        spec = spec_from_config(self.cfg) if self.cfg.uses_memory else None
        fl = flops_per_token(self.cfg.model, self.cfg.data.seq_len, spec)
        peak = peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        return fl["anchor"] + fl["memory"], peak * self.world.size if peak else None

    @staticmethod
    def _flop_rate(tok_per_s: float, per_token: float, job_peak: float | None) -> dict:
        """Model TFLOP/s of the job and, where the peak is known, MFU."""
        flops = tok_per_s * per_token
        return {"tflops": flops / 1e12, **({"mfu": flops / job_peak} if job_peak else {})}

    def run(self, stop_at: int | None = None) -> dict:
        """Train to the end (or to step `stop_at`, for tests of --resume); returns a summary."""
        with collective_errors(self.world, self.cfg.train.dist_timeout_s):
            try:
                if self._lock is not None:
                    self._lock.acquire()
                return self._run(stop_at)
            finally:
                if self._lock is not None:
                    self._lock.release()

    def _run(self, stop_at: int | None) -> dict:
        """The loop under the stop signals' handlers (train/stop.py); a failed write (a full disk) between
        checkpoints is reported in one line, like one inside a checkpoint."""
        with StopSignals(self._abandoned) as self._signals:
            try:
                return self._train(stop_at)
            except OSError as e:
                raise HiermemError(f"training at step {self.step + 1} failed: {os_reason(e)}; "
                                   f"{self.last_good()}") from None

    def _abandoned(self, signal_name: str) -> str:
        return (f"stopped at once by a second {signal_name} at step {self.step}, without a checkpoint; "
                f"{self.last_good()}; resume with --resume")

    def _stop_requested(self, logged: bool) -> int | None:
        """The signal to stop on at this step boundary, or None. On one process: the first signal received. In a
        job the ranks agree at logging steps only (one all-reduce of two flags), so that all stop at the same
        step; a rank that is gone makes the others fail on train.dist_timeout_s, without a checkpoint."""
        signum = self._signals.signum
        if not self.world.distributed:
            return signum
        if not logged:
            return None
        flags = torch.tensor([signum == signal.SIGINT, signum == signal.SIGTERM], dtype=torch.int64,
                             device=self.device)
        sigint, sigterm = self.world.sum_(flags).tolist()
        return signal.SIGTERM if sigterm else signal.SIGINT if sigint else None

    def _stop(self, signum: int, saved: bool) -> None:
        """A clean stop: the checkpoint (unless this step just wrote one), within train.stop_timeout_s."""
        if not saved and self.cfg.train.checkpoint:
            limit = self.cfg.train.stop_timeout_s
            with deadline(limit, lambda: f"the checkpoint at step {self.step} took longer than train.stop_timeout_s="
                          f"{limit} s: stopped without it; {self.last_good()}; resume with --resume",
                          exit_code(signum)):
                self.save_checkpoint()
        raise Stopped(self.step, signum)

    def _train(self, stop_at: int | None) -> dict:
        cfg, t, main = self.cfg, self.cfg.train, self.world.is_main
        end = self.steps if stop_at is None else min(stop_at, self.steps)
        metrics_path = cfg.run_dir / "metrics.jsonl"
        batches = iter(self.sampler)
        bar = tqdm(total=self.steps, initial=self.step, desc=f"train {cfg.name}", unit="step", mininterval=1.0,
                   disable=not self.progress, dynamic_ncols=True)
        window_tokens, window_start, last = self.tokens_seen, time.perf_counter(), {}
        counts = self.train_step.counts
        fetched_before = counts.snapshot() if counts is not None else None
        io_before = self.bank.io_stats() if self.bank is not None else {}
        prefetch = self._prefetcher()
        flop_model = self._flop_model()
        profiler = (StepProfiler(t.profile_steps, cfg.run_dir / "profile.txt", self.device)
                    if t.profile_steps and main else None)
        with open(metrics_path, "a", encoding="utf-8") if main else contextlib.nullcontext() as metrics:
            while self.step < end:
                if profiler is not None:
                    profiler.before(self.step)
                t0 = time.perf_counter()
                prefetch()
                out = self.advance(self._indices(batches, self.step))
                self.elapsed += time.perf_counter() - t0
                if profiler is not None:
                    profiler.after(self.step, last=self.step == end)
                bar.update(1)
                logged = self.step % t.log_every == 0 or self.step == end
                if logged:  # the only host syncs of the loop
                    self.check_finite()  # before the step is logged
                    self._sync_tokens()
                    rate = (self.tokens_seen - window_tokens) / max(1e-9, time.perf_counter() - window_start)
                    last = as_numbers(out)
                    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{rate:,.0f}")
                    rec = {"step": self.step, "total_steps": self.steps,
                           **{k: v for k, v in last.items() if k != "tokens"},
                           "tokens_seen": self.tokens_seen, "tok_per_s": rate, "elapsed": self.elapsed,
                           "world_size": self.world.size, **self._flop_rate(rate, *flop_model)}
                    if fetched_before is not None:  # evidence that the memory is used
                        now = counts.snapshot()
                        rec["distinct_fetched"] = [int(((n - b) > 0).sum()) for n, b in zip(now, fetched_before)]
                        fetched_before = now
                    if io_before:  # a bank on disk: its traffic over the window
                        io = self.bank.io_stats()
                        rec.update(io_window(io_before, io))
                        io_before = io
                    if t.nonfinite == "skip":
                        rec["skipped_steps"] = self.skipped_steps()
                    if main:
                        metrics.write(json.dumps(seal(rec)) + "\n")
                        metrics.flush()
                    window_tokens, window_start = self.tokens_seen, time.perf_counter()
                saved = bool(t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < end)
                if saved:
                    self.save_checkpoint()
                signum = self._stop_requested(logged)
                if signum is not None and self.step < end:  # at the end the run just finishes
                    bar.close()
                    self._stop(signum, saved)
        bar.close()
        if t.checkpoint:
            self.save_checkpoint()
            if self.step >= self.steps:
                self.save_final()
        else:
            self.check_finite()  # what a checkpoint would have checked
        summary = {"steps": self.step, "total_steps": self.steps, "tokens_seen": self.tokens_seen,
                   "elapsed_s": round(self.elapsed, 2), "final_loss": last.get("loss"),
                   "parameters": parameter_report(cfg), "world_size": self.world.size,
                   "packing": self.dataset.packing_stats()}
        if self.shards is not None:
            summary["sharding"] = self.shards[0].report()
        if self.step >= self.steps and main:
            atomic_write_json(cfg.run_dir / "train_summary.json", summary)
        return summary


def os_reason(e: OSError) -> str:
    """"No space left on device (<file>)": an OSError's reason and the file it names."""
    reason = e.strerror or str(e)
    return f"{reason} ({e.filename})" if e.filename else reason


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
    trainer = Trainer(cfg, resume=resume, progress=progress)
    try:
        summary = trainer.run()
    except Stopped:  # a clean stop: every rank stopped at the same step
        close_world(trainer.world)
        raise
    # a process group left to the interpreter's exit can abort it ("terminate called without an active
    # exception"). Not after a failed collective: a dead peer's group is not waited on, the process just exits
    close_world(trainer.world)
    return summary


__all__ = ["Trainer", "as_numbers", "train", "training_rows"]
