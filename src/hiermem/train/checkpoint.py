"""Checkpoints: anchor weights in safetensors, optimizer and loader state beside them, committed atomically.

A run directory's run.json names its on-disk format version (RUN_FORMAT_VERSION); a run written before
versions existed (hiermem 0.1.0, format 1) still loads: its FFN and attention weights had other names
(w1/w2/w3, wq/wk/wv/wo), which load_weights maps to today's.

Layout of <run>/checkpoint/ (format 3). Checkpoint g writes its files under names that carry g, then replaces
state.json, the commit point, atomically; only then are the files of older checkpoints removed. So a crash at
any instant leaves either the previous checkpoint or the new one, complete, and costs at most the steps since
the last complete checkpoint (tested by killing a training process inside a checkpoint):
  model-<g>.safetensors       anchor weights (tied weights stored once)
  optimizer-<g>.pt            anchor AdamW state (absent in frozen mode)
  bank-adam-<g>.npz           the lazy AdamW's per-block step counts (memory runs)
  state.json                  step, tokens seen, data-sampler position, elapsed time, generation g, the file names,
                              the world size that wrote it and whether the optimizer's state is keyed by name
A job of several processes (train/parallel.py) writes the same layout: the anchor once (rank 0, gathered first
under FSDP2, whose optimizer state is then saved keyed by parameter name), the bank by every rank into the one
store, then state.json by rank 0 once every rank's bank rows arrived: any world size resumes it.
The bank itself (weights and moments) is <run>/bank, a format-3 store (memory/store.py) whose generation g the
trainer commits before state.json: only the blocks written since checkpoint g-1, never a copy of the bank.
Formats 1 and 2 kept model.safetensors, optimizer.pt and a full copy of the bank (bank/) in checkpoint/.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hiermem.errors import HiermemError, check_format_version
from hiermem.integrity import CHECKSUMS, check_file, entry_of, record, unseal, write_sealed_json
from hiermem.io_utils import atomic_write_json, atomic_write_with
from hiermem.memory.files import crash_point
from hiermem.memory.optim import LazyAdamW
from hiermem.memory.store import naming

RUN_JSON = "run.json"
RUN_FORMAT = "hiermem-run"
RUN_FORMAT_VERSION = 3  # 1: hiermem 0.1.0 (no run.json); 2: run.json, LLaMA/HF layer names, absolute data paths;
# 3: checkpoint files named by generation, state.json their commit point, the bank a format-3 store in <run>/bank
STATE_JSON = "state.json"
WEIGHTS_CRC = "hiermem_crc32"  # safetensors metadata: crc32 of the tensors (tensors_crc32)
_V1_NAMES = {".w1.": ".gate_proj.", ".w2.": ".up_proj.", ".w3.": ".down_proj.", ".wq.": ".q_proj.",
             ".wk.": ".k_proj.", ".wv.": ".v_proj.", ".wo.": ".o_proj."}


def write_run_format(run_dir: Path) -> None:
    atomic_write_json(run_dir / RUN_JSON, {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION})
    record(run_dir / RUN_JSON)  # in <run>/.checksums.json


def read_run_format(run_dir: Path) -> int:
    """The run's format version: 1 for a run without run.json; a newer version than ours is refused."""
    path = run_dir / RUN_JSON
    if not path.is_file():
        if not (run_dir / "config.yaml").is_file():
            raise HiermemError(f"{run_dir}: not a hiermem run directory (no config.yaml)")
        if (run_dir / CHECKSUMS).is_file():  # written by a hiermem that also writes run.json: it was lost
            raise HiermemError(f"{path}: missing (the run's format version)")
        return 1
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        fmt, version = meta["format"], meta["format_version"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HiermemError(f"{path}: unreadable ({type(e).__name__}: {' '.join(str(e).split())})") from None
    version = check_format_version(path, fmt, version, RUN_FORMAT, RUN_FORMAT_VERSION, "run", "hiermem run")
    check_file(path, "run format")  # after the format: a newer hiermem's run.json is refused as newer
    return version


def tensors_crc32(state: dict[str, torch.Tensor]) -> int:
    """crc32 over (name, dtype, shape, bytes) of every tensor in sorted name order: the file's layout aside."""
    crc = 0
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        crc = zlib.crc32(f"{name}:{t.dtype}:{tuple(t.shape)};".encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return crc


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied weights stored once (safetensors refuses shared storage)."""
    state = model.state_dict()
    if getattr(model.cfg, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_weights(model: torch.nn.Module | dict[str, torch.Tensor], path: Path,
                 metadata: dict[str, str] | None = None) -> None:
    """A model's weights, or a state dict already gathered (an FSDP2 anchor's full weights, tied ones once)."""
    state = model if isinstance(model, dict) else model_state(model)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {**(metadata or {}), WEIGHTS_CRC: str(tensors_crc32(state))}  # load_weights checks it
    atomic_write_with(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked against the crc32 its metadata records (save_weights)."""
    if not path.is_file():
        raise HiermemError(f"{path}: missing anchor weights")
    try:
        with safe_open(str(path), "pt") as f:  # one open: the tensors and the metadata holding their crc32
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged file
        raise HiermemError(f"{path}: cannot read weights ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    if WEIGHTS_CRC in meta and meta[WEIGHTS_CRC] != str(tensors_crc32(state)):
        raise HiermemError(f"{path}: corrupted anchor weights (checksum mismatch)")
    return state


def load_weights(model: torch.nn.Module, path: Path) -> None:
    state = read_weights(path)
    for old, new in _V1_NAMES.items():  # format 1 names
        state = {k.replace(old, new): v for k, v in state.items()}
    if model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise HiermemError(f"{path}: {key} has shape {tuple(value.shape)}, model expects {tuple(own[key].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise HiermemError(f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def save_torch(obj, path: Path) -> None:
    atomic_write_with(path, lambda tmp: torch.save(obj, tmp))


def write_checkpoint(ckpt: Path, generation: int, model: torch.nn.Module | dict[str, torch.Tensor],
                     anchor_opt: torch.optim.Optimizer | dict | None, bank_opt: LazyAdamW | None, state: dict) -> None:
    """Checkpoint `generation` into ckpt (see the module docstring); the bank's generation is committed first.
    model and anchor_opt may be given as state dicts already gathered from the ranks of a job. A failed write
    (a full disk) raises OSError naming its file; state.json is then still the previous checkpoint's."""
    ckpt.mkdir(parents=True, exist_ok=True)
    files = {"model": f"model-{generation:06d}.safetensors"}
    with naming(ckpt / files["model"]):
        save_weights(model, ckpt / files["model"])
    if anchor_opt is not None:
        files["optimizer"] = f"optimizer-{generation:06d}.pt"
        with naming(ckpt / files["optimizer"]):
            save_torch(anchor_opt if isinstance(anchor_opt, dict) else anchor_opt.state_dict(),
                       ckpt / files["optimizer"])
    if bank_opt is not None:
        files["bank_optimizer"] = f"bank-adam-{generation:06d}.npz"
        with naming(ckpt / files["bank_optimizer"]):
            bank_opt.save(ckpt / files["bank_optimizer"])
    crash_point("state")
    checksums = {k: entry_of(ckpt / name) for k, name in files.items()}  # load_state checks them
    with naming(ckpt / STATE_JSON):
        write_sealed_json(ckpt / STATE_JSON, {**state, "generation": generation, "files": files,
                                              "checksums": checksums})
    keep = {STATE_JSON, *files.values()}
    for p in ckpt.iterdir():  # older checkpoints' files, and a format-2 checkpoint's
        if p.name not in keep and not p.name.startswith("."):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def load_state(ckpt: Path) -> dict:
    """A checkpoint's state.json: step, tokens_seen, elapsed, sampler, generation, files (format 3)."""
    path = ckpt / STATE_JSON
    if not path.is_file():
        raise HiermemError(f"{ckpt}: no checkpoint to resume from (missing state.json)")
    try:
        state = unseal(path, json.loads(path.read_text(encoding="utf-8")))
        for key in ("step", "tokens_seen", "elapsed", "sampler", "generation", "files"):
            state[key]
        state["files"]["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HiermemError(f"{path}: unreadable checkpoint state ({type(e).__name__}: "
                           f"{' '.join(str(e).split())})") from None
    check_checkpoint_files(ckpt, state)
    return state


def check_checkpoint_files(ckpt: Path, state: dict) -> None:
    """Every file state.json names is there, and (a checkpoint that recorded them) has its size and crc32."""
    checksums = state.get("checksums") or {}
    for key, name in state["files"].items():
        check_file(ckpt / name, f"checkpoint {key}, named by {STATE_JSON}", entry=checksums.get(key))
