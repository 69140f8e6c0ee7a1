"""Typed, nested run configuration.

Presets are YAML files (src/hiermem/configs/*.yaml, also reachable as ./configs); the command line adds
dot-list overrides such as `train.lr=3e-4`. OmegaConf checks keys and types against these dataclasses; we turn
its errors into one-line messages naming the key. The resolved config is written into every run directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_write_text

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0: the tokenizer's size rounded up to a multiple of 64
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    head_dim: int = 32  # attention width = n_heads * head_dim (may differ from d_model, as in the paper's 160M)
    d_ff: int = 320
    tie_embeddings: bool = True
    rope_base: float = 100000.0
    qk_norm: bool = True
    norm_eps: float = 1e-5
    max_seq_len: int = 128
    init_std: float = 0.02
    attention: str = "sdpa"  # sdpa (dense document mask, plain causal where rows are whole documents) | flex


@dataclass
class MemoryConfig:
    ranks: List[int] = field(default_factory=list)  # (r1, r2, ...) per tree level; [] = no memory
    layers: Optional[List[int]] = None  # [start, end) of model layers holding memory; None = all
    init_std: Optional[float] = None  # gate/up truncated normal std; None = 1/sqrt(d_model)
    generic: bool = True  # train a non-retrieved block of one path's size as the control
    generic_prob: Optional[float] = None  # None = 1/(branching + 1), the paper's 1/17
    generic_sampling: str = "sequence"  # "sequence" or "batch": unit of the generic draw
    lr: float = 1e-2
    lr_min: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 1e-3
    mmap: bool = False  # keep the bank (and its optimizer state) in memory-mapped files
    cache_levels: int = 1  # shallow levels copied into RAM when the bank is memory-mapped


@dataclass
class RoutingConfig:
    encoder: str = "minilm"  # "minilm" (the paper's all-MiniLM-L6-v2) or "wordllama"
    max_tokens: int = 256  # encoder window in wordpieces
    long_docs: str = "truncate"  # "truncate" or "mean_chunks"
    depth: int = 2
    branching: int = 16
    kmeans_steps: int = 20
    kmeans_sample: int = 6400
    balance: float = 1.5  # a cluster may hold at most balance/branching of a step's assignments
    router: str = "knn"  # default router at eval/generate: "knn" or "centroid"
    knn_k: int = 10
    seed: int = 0


@dataclass
class DataConfig:
    corpus: str = ""  # .jsonl / .txt / folder / .parquet
    dir: str = ""  # prepared data directory ("" = runs/data/<name>)
    tokenizer: str = ""  # existing tokenizer.json ("" = train a byte-level BPE)
    vocab_size: int = 4096
    seq_len: int = 128
    val_fraction: float = 0.05
    seed: int = 0
    packing: str = "auto"  # "leaf": sequences from one leaf only; "flat": any documents; auto = leaf iff memory


@dataclass
class TrainConfig:
    mode: str = "anchor"  # anchor | frozen | cotrain | scratch
    init_from: str = ""  # run directory whose anchor (and bank, if any) starts this run
    run_dir: str = ""  # "" = runs/<name>
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 0  # 0: derived from epochs
    epochs: float = 1.0
    lr: float = 2e-3
    lr_min: float = 2e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 autocast on GPU) | fp32 | bf16
    threads: int = 0  # torch threads on CPU; 0 = torch's default
    log_every: int = 10
    ckpt_every: int = 0  # 0 = only at the end
    compile: bool = False


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.train.run_dir or f"runs/{self.name}")

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir or f"runs/data/{self.name}")

    @property
    def uses_memory(self) -> bool:
        return self.train.mode != "anchor" and any(r > 0 for r in self.memory.ranks)

    @property
    def pack_by_leaf(self) -> bool:
        return self.data.packing == "leaf" or (self.data.packing == "auto" and self.uses_memory)


_CHOICES = {
    "train.mode": ("anchor", "frozen", "cotrain", "scratch"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.dtype": ("auto", "fp32", "bf16"),
    "routing.encoder": ("minilm", "wordllama"),
    "routing.long_docs": ("truncate", "mean_chunks"),
    "routing.router": ("knn", "centroid"),
    "memory.generic_sampling": ("sequence", "batch"),
    "model.attention": ("sdpa", "flex"),
}


def _get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> Config:
    """Checks that types alone cannot express; each message names the field."""
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise HiermemError(f"config: {key}={value!r} is not one of {', '.join(allowed)}")
    m, r, t = cfg.model, cfg.routing, cfg.train
    positive = {
        "model.n_layers": m.n_layers, "model.d_model": m.d_model, "model.n_heads": m.n_heads,
        "model.head_dim": m.head_dim, "model.d_ff": m.d_ff, "model.max_seq_len": m.max_seq_len,
        "data.seq_len": cfg.data.seq_len, "data.vocab_size": cfg.data.vocab_size,
        "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
        "routing.depth": r.depth, "routing.branching": r.branching, "routing.max_tokens": r.max_tokens,
        "routing.knn_k": r.knn_k,
    }
    for key, value in positive.items():
        if value <= 0:
            raise HiermemError(f"config: {key} must be positive (got {value})")
    if m.head_dim % 2:
        raise HiermemError(f"config: model.head_dim must be even for RoPE (got {m.head_dim})")
    if cfg.data.seq_len > m.max_seq_len:
        raise HiermemError(
            f"config: data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise HiermemError(f"config: data.val_fraction must be in [0, 1) (got {cfg.data.val_fraction})")
    if r.max_tokens > 256:
        raise HiermemError(f"config: routing.max_tokens must be <= 256, MiniLM's window (got {r.max_tokens})")
    mem = cfg.memory
    if mem.ranks and len(mem.ranks) != r.depth:
        raise HiermemError(
            f"config: memory.ranks has {len(mem.ranks)} levels but routing.depth is {r.depth}")
    if any(x < 0 for x in mem.ranks):
        raise HiermemError(f"config: memory.ranks must be >= 0 (got {list(mem.ranks)})")
    if mem.layers is not None:
        if len(mem.layers) != 2 or not 0 <= mem.layers[0] < mem.layers[1] <= m.n_layers:
            raise HiermemError(
                f"config: memory.layers must be [start, end) with 0 <= start < end <= {m.n_layers} "
                f"(got {list(mem.layers)})")
    if mem.generic_prob is not None and not 0.0 <= mem.generic_prob < 1.0:
        raise HiermemError(f"config: memory.generic_prob must be in [0, 1) (got {mem.generic_prob})")
    if t.mode != "anchor" and not any(x > 0 for x in mem.ranks):
        raise HiermemError(f"config: train.mode={t.mode} needs memory.ranks with a non-zero level")
    if cfg.data.packing == "flat" and t.mode != "anchor":
        raise HiermemError(f"config: data.packing=flat cannot feed train.mode={t.mode}: memory runs pack by leaf")
    if t.mode == "frozen" and not t.init_from:
        raise HiermemError("config: train.mode=frozen needs train.init_from (a trained anchor run directory)")
    return cfg


def _one_line(err: OmegaConfBaseException) -> str:
    msg = str(err).splitlines()[0]
    key = getattr(err, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def preset_path(name_or_path: str) -> Path:
    """A preset name (tiny, small, ...) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise HiermemError(f"{p}: config file not found")
        return p
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        names = ", ".join(sorted(x.stem for x in PRESET_DIR.glob("*.yaml")))
        raise HiermemError(f"config: unknown preset {name_or_path!r} (presets: {names})")
    return candidate


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- preset YAML (if any) <- dot-list overrides, then validated."""
    if not preset:
        return _merge({}, overrides, "defaults")
    path = preset_path(preset)
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise HiermemError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise HiermemError(f"{path}: expected a mapping at the top level")
    return _merge(loaded, overrides, str(path))


def _merge(base: dict, overrides: list[str] | tuple[str, ...], source: str) -> Config:
    """Defaults <- base <- dot-list overrides, validated; errors name the source and the key."""
    for item in overrides:
        if "=" not in item:
            raise HiermemError(f"override {item!r}: expected key=value (e.g. train.lr=3e-4)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), base)
    except OmegaConfBaseException as e:
        raise HiermemError(f"config ({source}): {_one_line(e)}") from None
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise HiermemError(f"config (command line): {_one_line(e)}") from None
    return validate(cfg)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, source: str = "config") -> Config:
    return _merge(d, (), source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, dump_config(cfg))


# Keys that older versions wrote into a run's config.yaml and that no longer exist: dropped when read.
REMOVED_KEYS = {"memory.dispatch": "0.1.0: one memory representation now serves every device"}


def read_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A saved config (a run's or a data directory's), with dot-list overrides applied on top."""
    path = Path(path)
    if not path.is_file():
        raise HiermemError(f"{path}: missing (not a hiermem run or data directory?)")
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise HiermemError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(saved, dict):
        raise HiermemError(f"{path}: expected a mapping at the top level")
    for key in REMOVED_KEYS:
        section, name = key.split(".")
        if isinstance(saved.get(section), dict):
            saved[section].pop(name, None)
    return _merge(saved, overrides, str(path))


def resolve_paths(cfg: Config) -> Config:
    """A copy whose file and folder fields are absolute, so that a run's saved config works from any directory."""
    out = from_dict(to_dict(cfg))
    out.data.dir = str(cfg.data_dir.resolve())
    out.train.run_dir = str(cfg.run_dir.resolve())
    for section, key in (("data", "corpus"), ("data", "tokenizer"), ("train", "init_from")):
        value = getattr(getattr(cfg, section), key)
        if value:
            setattr(getattr(out, section), key, str(Path(value).resolve()))
    return out


def diff_fields(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (for 'made by another config' errors)."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_fields(va, vb, name + ".")
        elif va != vb:
            out.append(f"{name} ({va!r} vs {vb!r})")
    return out
