"""Typed, nested run configuration.

Presets are YAML files (src/hiermem/configs/*.yaml, also reachable as ./configs); the command line adds
dot-list overrides such as `train.lr=3e-4`. OmegaConf checks keys and types against these dataclasses; we turn
its errors into one-line messages naming the key. The resolved config is written into every run directory.

Every field is declared once, with `setting(...)`: its default, a one-line help text, and where a rule applies
its allowed values (`choices`), bounds (`min`/`max`) and whether a trained run may take it as an override
(`inference`). validate(), the command line's `choices=` and `--help`, and the refusal of shape-changing
overrides on a trained run all read these declarations.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_write_text

PRESET_DIR = Path(__file__).parent / "configs"

# Not a config field: what `--memory` of eval/generate may name (declared here so the CLI needs no torch import).
MEMORY_MODES = ("fetched", "generic", "none")


def setting(default: Any, help: str, *, choices: tuple | None = None, min: float | None = None,
            max: float | None = None, inference: bool = False):
    """A config field: default (a list default is copied per instance), one-line help, optional rules.
    inference=True: `hiermem eval/generate RUN key=value` may override it (it does not change what was trained)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "min": min, "max": max,
            "inference": inference}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls, help: str):
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class ModelConfig:
    hf: str = setting("", "a local transformers checkpoint folder to add memories to post hoc (train.mode frozen or "
                      "cotrain); its shape replaces the model.* shape keys below; '' = the native anchor")
    vocab_size: int = setting(0, "embedding rows; 0 = the tokenizer's size rounded up to a multiple of 64")
    n_layers: int = setting(4, "transformer blocks", min=1)
    d_model: int = setting(128, "residual stream width", min=1)
    n_heads: int = setting(4, "attention heads", min=1)
    head_dim: int = setting(32, "width per head (even, for RoPE); attention width = n_heads * head_dim", min=1)
    d_ff: int = setting(320, "hidden width of each SwiGLU FFN", min=1)
    tie_embeddings: bool = setting(True, "share the input embedding with the output projection")
    rope_base: float = setting(100000.0, "RoPE frequency base")
    qk_norm: bool = setting(True, "RMS-normalise queries and keys per head")
    norm_eps: float = setting(1e-5, "RMSNorm epsilon")
    max_seq_len: int = setting(128, "longest sequence the model takes (>= data.seq_len)", min=1)
    init_std: float = setting(0.02, "std of the anchor's normal initialisation")
    attention: str = setting("sdpa", "attention kernel (same weights either way): sdpa (dense document mask) "
                             "or flex (FlexAttention block mask)", choices=("sdpa", "flex"),
                             inference=True)


@dataclass
class MemoryConfig:
    ranks: List[int] = setting([], "memory rank per tree level, root level first; [] = no memory")
    layers: Optional[List[int]] = setting(None, "[start, end) of the model layers holding memory; null = all")
    init_std: Optional[float] = setting(None, "std of the memories' truncated-normal init; null = 1/sqrt(d_model)")
    kind: str = setting("ffn", "memory type: ffn (extra SwiGLU neurons), lora_qk / lora_vo / lora_ffn (LoRA "
                        "patches W + (lora_alpha/R)·B·A of q,k / v,o / gate,up,down), kv (learned key and value "
                        "slots that the queries attend to without mask or positions, added to the heads' output "
                        "before o_proj)", choices=("ffn", "lora_qk", "lora_vo", "lora_ffn", "kv"))
    lora_alpha: float = setting(2.0, "LoRA scaling numerator (memory.kind=lora_*): a patch adds (lora_alpha/R)·B·A "
                                "with R a sequence's whole fetched rank, all levels, as peft scales by alpha/r")
    generic: bool = setting(True, "also train a generic (never retrieved) block of one path's size, the control")
    generic_prob: Optional[float] = setting(None, "chance of the generic block instead of the routed path; "
                                            "null = 1/(branching+1)")
    generic_sampling: str = setting("sequence", "unit of the generic draw: one per sequence or one per batch",
                                    choices=("sequence", "batch"))
    lr: float = setting(1e-2, "peak learning rate of the memories")
    lr_min: float = setting(1e-3, "memory learning rate at the end of the cosine schedule")
    warmup_steps: int = setting(0, "memory learning-rate warmup steps", min=0)
    weight_decay: float = setting(1e-3, "weight decay of the memories")
    mmap: bool = setting(False, "keep the bank and its optimizer state in files on disk, read with pread into a "
                         "block cache of memory.cache_bytes (banks larger than RAM)", inference=True)
    dtype: str = setting("fp32", "storage dtype of the bank's weights (bf16: stochastic rounding on write); "
                         "blocks compute and optimizer moments stay fp32", choices=("fp32", "bf16"))
    cache_bytes: int = setting(4 << 30, "RAM budget in bytes of an on-disk bank's block cache; the generic block and "
                               "the shallow levels that fit in half of it stay pinned", min=1, inference=True)
    prefetch: int = setting(2, "batches ahead whose blocks a background thread reads into an on-disk bank's "
                            "cache; 0 = off", min=0)


@dataclass
class RoutingConfig:
    encoder: str = setting("minilm", "sentence encoder: minilm (the paper's all-MiniLM-L6-v2) or wordllama (fast, "
                           "static)", choices=("minilm", "wordllama"))
    max_tokens: int = setting(256, "MiniLM window in wordpieces, [CLS] and [SEP] included (MiniLM's is 256)",
                              min=3, max=256)
    long_docs: str = setting("truncate", "text past the window: truncate (embed its head) or mean_chunks (average "
                             "the windows)", choices=("truncate", "mean_chunks"))
    depth: int = setting(2, "levels of the hierarchical k-means tree", min=1)
    branching: int = setting(16, "children per tree node", min=1)
    kmeans_steps: int = setting(20, "k-means iterations per fit", min=1)
    kmeans_sample: int = setting(6400, "documents sampled per k-means step", min=1)
    balance: float = setting(1.5, "a cluster may hold at most balance/branching of a k-means step's assignments "
                             "(binds while fitting; final sizes on the whole corpus may exceed it)")
    fit_docs: int = setting(1_000_000, "training documents (a seeded random sample) the tree is fitted on; every "
                            "document is then routed down it", min=1)
    chunk_docs: int = setting(16384, "documents `hiermem cluster` embeds, saves and routes at a time (an "
                              "interrupted embedding resumes at a chunk)", min=1)
    embed_batch: int = setting(512, "texts per encoder batch on CUDA, where MiniLM runs fp16 (train.device "
                               "picks it; the CPU encodes 64 at a time in fp32)", min=1)
    router: str = setting("knn", "router at eval/generate: centroid (the paper's greedy descent) or knn (a vote "
                          "of the nearest documents)", choices=("centroid", "knn"), inference=True)
    knn_k: int = setting(10, "neighbours the knn router votes over", min=1, inference=True)
    knn_ram_docs: int = setting(2_000_000, "training documents up to which the knn router's index is in RAM "
                                "(4 bytes x embedding width each, exact); above, it reads the memory-mapped "
                                "embeddings as routing.knn_probe says", min=0, inference=True)
    knn_probe: int = setting(16, "above routing.knn_ram_docs: leaves of the tree whose documents the knn router "
                             "searches per prompt besides its own, the nearest by centroid (approximate; reads "
                             "only their documents); 0 scans every document per batch (exact, a full read)",
                             min=0, inference=True)
    seed: int = setting(0, "k-means seed")
    tree_from: str = setting("", "reuse this tree instead of fitting one: a run directory (its tree.npz) or a "
                             "data directory (its cluster/tree.npz); `hiermem cluster` then only embeds and "
                             "routes the documents into it (adding them to that run's memories)")


@dataclass
class DataConfig:
    corpus: str = setting("", "documents: .jsonl / .jsonl.gz / .jsonl.zst / .txt / .parquet / a folder of them")
    dir: str = setting("", "prepared data directory; '' = runs/data/<name>", inference=True)
    tokenizer: str = setting("", "an existing tokenizer.json; '' = train a byte-level BPE on the corpus")
    vocab_size: int = setting(4096, "vocabulary of the trained tokenizer", min=1)
    seq_len: int = setting(128, "training sequence length in tokens", min=1)
    val_fraction: float = setting(0.05, "fraction of documents held out, in [0, 1)")
    seed: int = setting(0, "seed of the held-out split")
    packing: str = setting("auto", "leaf: each sequence from one leaf; flat: any documents; auto: leaf iff the run "
                           "has memory", choices=("auto", "leaf", "flat"))
    packing_algo: str = setting("concat", "concat: documents back to back, cut every row (a document may span "
                                "rows); best_fit: a document that fits in a row is never split, pieces placed "
                                "best-fit-decreasing, the rest of a row padded", choices=("concat", "best_fit"))
    workers: int = setting(1, "tokenizer processes of `hiermem prepare`; 1 = tokenise in the main process", min=1)
    tokenizer_sample_bytes: int = setting(1_000_000_000, "the tokenizer trains on the training documents in "
                                          "corpus order until this many bytes of text (UTF-8)", min=1)


@dataclass
class TrainConfig:
    mode: str = setting("anchor", "anchor: no memory; frozen: init_from's anchor fixed; cotrain: it and the "
                        "memories learn; scratch: both from random init",
                        choices=("anchor", "frozen", "cotrain", "scratch"))
    init_from: str = setting("", "run directory whose anchor (and bank, if any) starts this run")
    init_optimizer: bool = setting(False, "also start from init_from's anchor AdamW moments (its final "
                                   "checkpoint): a run continuing another's schedule (train.lr_span)")
    run_dir: str = setting("", "output run directory; '' = runs/<name>")
    batch_size: int = setting(16, "sequences per micro-batch", min=1)
    grad_accum: int = setting(1, "micro-batches per optimizer step", min=1)
    max_steps: int = setting(0, "optimizer steps; 0 = derived from train.epochs", min=0)
    epochs: float = setting(1.0, "passes over the training sequences (when max_steps is 0)")
    lr: float = setting(2e-3, "peak learning rate of the anchor (AdamW, cosine schedule)")
    lr_min: float = setting(2e-4, "anchor learning rate at the end of the cosine schedule")
    lr_span: List[float] = setting([0.0, 1.0], "fraction [a, b] of one warmup-cosine schedule this run covers "
                                   "(e.g. [0, 0.5] then [0.5, 1]: a run continued by an init_from run)")
    warmup_steps: int = setting(20, "anchor learning-rate warmup steps", min=0)
    weight_decay: float = setting(0.1, "AdamW weight decay of the anchor")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    grad_clip: float = setting(1.0, "max global gradient norm over anchor and fetched memory; 0 = off")
    seed: int = setting(0, "seed of initialisation and batch order")
    device: str = setting("auto", "auto (cuda if available) | cpu | cuda", choices=("auto", "cpu", "cuda"),
                          inference=True)
    dtype: str = setting("auto", "auto (fp32 on CPU, bf16 autocast on GPU) | fp32 | bf16",
                         choices=("auto", "fp32", "bf16"))
    threads: int = setting(0, "torch threads on CPU; 0 = torch's default")
    log_every: int = setting(10, "optimizer steps between metrics lines", min=1)
    ckpt_every: int = setting(0, "optimizer steps between checkpoints; 0 = only at the end", min=0)
    checkpoint: bool = setting(True, "false: write no checkpoint and no final model, only metrics.jsonl and "
                               "train_summary.json (and, with memory.mmap, the bank's working files): throughput "
                               "runs at scale, where the paper's bank with its moments is ~55 GB a checkpoint")
    compile: bool = setting(False, "torch.compile each transformer block and the loss")
    profile_steps: List[int] = setting([], "[start, end): torch.profiler over steps start+1 .. end, its operator "
                                       "table in <run>/profile.txt (rank 0); [] = off")
    parallel: str = setting("ddp", "anchor parallelism under torchrun: ddp (replicated) | fsdp (fully_shard, for "
                            "anchors too large to replicate)", choices=("ddp", "fsdp"))
    dist_timeout_s: int = setting(300, "seconds a collective waits for the other processes before the job "
                                  "stops with an error", min=1)
    data_shards: int = setting(0, "memory runs: 0 = one data shard per process; N on one process trains on the "
                               "union of the batches N processes would see (a reference for a multi-process run)",
                               min=0)
    stop_timeout_s: int = setting(60, "seconds the checkpoint after SIGINT/SIGTERM may take before training exits "
                                  "without it (the previous checkpoint stays valid)", min=1)
    nonfinite: str = setting("stop", "a NaN/Inf loss or gradient norm: stop (error, no checkpoint after it) | skip "
                             "(that step's update is masked and counted in metrics.jsonl skipped_steps)",
                             choices=("stop", "skip"))


@dataclass
class Config:
    name: str = setting("run", "run name: the default run (runs/<name>) and data (runs/data/<name>) folders")
    model: ModelConfig = section(ModelConfig, "the anchor transformer's shape")
    memory: MemoryConfig = section(MemoryConfig, "hierarchical memories: shape, optimiser, storage")
    routing: RoutingConfig = section(RoutingConfig, "the encoder, the k-means tree and the router")
    data: DataConfig = section(DataConfig, "corpus, tokenizer and packing")
    train: TrainConfig = section(TrainConfig, "training mode, optimiser and device")

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


# ---------------------------------------------------------------- the declarations, read back


@functools.lru_cache(maxsize=None)
def fields() -> dict[str, dataclasses.Field]:
    """Every leaf field by dotted key ("name", "model.vocab_size", ...), in declaration order."""
    out = {}
    for f in dataclasses.fields(Config):
        if f.name in _SECTIONS:
            out.update({f"{f.name}.{g.name}": g for g in dataclasses.fields(f.default_factory)})
        else:
            out[f.name] = f
    return out


# section name -> its field on Config (the only Config fields with a default_factory)
_SECTIONS = {f.name: f for f in dataclasses.fields(Config) if f.default_factory is not dataclasses.MISSING}


def field_info(key: str) -> dataclasses.Field:
    try:
        return fields()[key]
    except KeyError:
        raise HiermemError(f"config: no field {key!r}") from None


def choices(key: str) -> tuple:
    """The allowed values of a field (as declared on it)."""
    allowed = field_info(key).metadata.get("choices")
    if not allowed:
        raise HiermemError(f"config: {key} declares no choices")
    return allowed


def default(key: str):
    f = field_info(key)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def inference_keys() -> tuple[str, ...]:
    """Fields a trained run may take as overrides at eval/generate (they leave the trained weights valid)."""
    return tuple(k for k, f in fields().items() if f.metadata.get("inference"))


def check_value(key: str, value, label: str | None = None) -> None:
    """The declared rule (choices, min, max) of one field; the message names the field and what it allows."""
    meta = field_info(key).metadata
    label = label or f"config: {key}"
    allowed = meta.get("choices")
    if allowed and value not in allowed:
        raise HiermemError(f"{label}={value!r} is not one of {', '.join(allowed)}")
    lo, hi = meta.get("min"), meta.get("max")
    if value is None or (lo is None and hi is None):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HiermemError(f"{label}: {value!r} is not a number")
    if lo is not None and hi is not None:
        if not lo <= value <= hi:
            raise HiermemError(f"{label} must be in {lo}..{hi} (got {value})")
    elif lo is not None and value < lo:
        raise HiermemError(f"{label} must be {'positive' if lo == 1 else f'>= {lo}'} (got {value})")
    elif hi is not None and value > hi:
        raise HiermemError(f"{label} must be <= {hi} (got {value})")


def _show(value) -> str:
    """A default as one would write it in a dot-list override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return "''"
    if isinstance(value, list):
        return "[" + ",".join(map(_show, value)) + "]"
    return str(value)


def fields_help(keys: tuple[str, ...] | None = None, title: str | None = None) -> str:
    """`--help` text: each field as key=default with its help, grouped by section (all fields unless `keys`)."""
    info = fields()
    keys = tuple(info) if keys is None else keys
    title = title or ("config fields, as key=default (a preset sets some; dot-list overrides such as "
                      "train.lr=3e-4 set any):")
    width = max(len(f"{k}={_show(default(k))}") for k in keys) + 2
    lines, current = [title], None
    for key in keys:
        head = key.split(".")[0] if "." in key else ""
        if head != current:
            current = head
            lines += ["", f"{head}: {_SECTIONS[head].metadata['help']}" if head else "run:"]
        meta = info[key].metadata
        text = meta["help"]
        if meta.get("choices") and not all(c in text for c in meta["choices"]):
            text += f" ({' | '.join(meta['choices'])})"
        lines.append(f"  {f'{key}={_show(default(key))}':<{width}}{text}")
    return "\n".join(lines)


# ---------------------------------------------------------------- validation


def _get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check_plain(key: str, value) -> None:
    """What OmegaConf lets through a typed field and that would fail far from the config: a list item that is
    itself a container, a non-finite float, an int beyond 64 bits (numpy, torch), a NUL in a string (a path)."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, (list, dict)):
                raise HiermemError(f"config: {key}[{i}] must be a single value, not a {type(item).__name__}")
            _check_plain(f"{key}[{i}]", item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise HiermemError(f"config: {key} must be a finite number (got {value})")
    elif isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        raise HiermemError(f"config: {key} does not fit in 64 bits (got {value:.3e})")
    elif isinstance(value, str) and "\0" in value:
        raise HiermemError(f"config: {key} contains a NUL character")


def validate(cfg: Config) -> Config:
    """The declared per-field rules, then the checks that relate fields; each message names the field.
    What a training run needs besides (train.init_from for frozen and cotrain) is check_training's."""
    for key in fields():
        _check_plain(key, _get(cfg, key))
        check_value(key, _get(cfg, key))
    m, r, t = cfg.model, cfg.routing, cfg.train
    if m.head_dim % 2:
        raise HiermemError(f"config: model.head_dim must be even for RoPE (got {m.head_dim})")
    if cfg.data.seq_len > m.max_seq_len:
        raise HiermemError(
            f"config: data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise HiermemError(f"config: data.val_fraction must be in [0, 1) (got {cfg.data.val_fraction})")
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
    span = cfg.train.lr_span
    if len(span) != 2 or not 0 <= span[0] < span[1] <= 1:
        raise HiermemError(f"config: train.lr_span must be [a, b] with 0 <= a < b <= 1 (got {list(span)})")
    if not mem.lora_alpha > 0:
        raise HiermemError(f"config: memory.lora_alpha must be > 0 (got {mem.lora_alpha})")
    if t.mode != "anchor" and not any(x > 0 for x in mem.ranks):
        raise HiermemError(f"config: train.mode={t.mode} needs memory.ranks with a non-zero level")
    if t.profile_steps and (len(t.profile_steps) != 2 or not 0 <= t.profile_steps[0] < t.profile_steps[1]):
        raise HiermemError(f"config: train.profile_steps must be [start, end) with 0 <= start < end (got "
                           f"{list(t.profile_steps)})")
    if not t.checkpoint and t.ckpt_every:
        raise HiermemError(f"config: train.ckpt_every={t.ckpt_every} needs train.checkpoint=true")
    if cfg.data.packing == "flat" and t.mode != "anchor":
        raise HiermemError(f"config: data.packing=flat cannot feed train.mode={t.mode}: memory runs pack by leaf")
    return cfg


def check_training(cfg: Config) -> None:
    """What a training run needs beyond a valid config (called by the Trainer, so that `hiermem params` and
    `hiermem prepare` take a cotrain preset that names no anchor yet)."""
    t = cfg.train
    if cfg.memory.kind != "ffn" and cfg.model.hf:  # the transformers hooks add ffn memory only
        raise HiermemError(f"config: model.hf supports memory.kind=ffn only (got {cfg.memory.kind})")
    if cfg.model.hf:  # post-hoc memories: the checkpoint is the anchor
        if t.mode not in ("frozen", "cotrain"):
            raise HiermemError(f"config: model.hf trains memories on the checkpoint: train.mode frozen or cotrain, "
                               f"not {t.mode}")
        if t.init_from or t.compile:
            raise HiermemError("config: model.hf takes neither train.init_from (the checkpoint is the anchor) nor "
                               "train.compile")
        return
    if t.mode in ("frozen", "cotrain") and not t.init_from:
        hint = "; train.mode=scratch trains anchor and memory from random initialisation" if t.mode == "cotrain" else ""
        raise HiermemError(f"config: train.mode={t.mode} needs train.init_from (a trained anchor run directory){hint}")


def check_run_overrides(overrides: list[str] | tuple[str, ...]) -> None:
    """Overrides for a trained run (eval/generate) may only name inference-time fields: the others fixed what
    was trained (its shape, data, tree or optimiser) and cannot apply to its weights."""
    allowed = inference_keys()
    known = fields()
    for item in overrides:
        key = item.split("=", 1)[0].strip().lstrip("+~")
        if key in allowed:
            continue
        if key in known or key in _SECTIONS:
            raise HiermemError(f"override {key}: fixed when the run was trained, so it cannot change on a trained "
                               f"run (inference-time keys: {', '.join(allowed)})")
        # an unknown key: read_config names it against the dataclasses


def printable(text: str) -> str:
    """Line breaks and other control characters escaped (\\r, \\x1c): a key may hold them, a message may not."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _one_line(err: OmegaConfBaseException) -> str:
    msg = str(err).split("\n")[0]  # OmegaConf's message, then its context lines
    key = getattr(err, "full_key", None)
    return printable(f"{key}: {msg}" if key and key not in msg else msg)


def preset_path(name_or_path: str, folder: Path = PRESET_DIR, what: str = "config") -> Path:
    """A preset name (a YAML file's stem in folder: tiny, small, ...) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise HiermemError(f"{p}: {what} file not found")
        return p
    candidate = folder / f"{name_or_path}.yaml"
    if not candidate.is_file():
        names = ", ".join(sorted(x.stem for x in folder.glob("*.yaml")))
        raise HiermemError(f"{what}: unknown preset {name_or_path!r} (presets: {names})")
    return candidate


def read_yaml_mapping(path: Path) -> dict:
    """A YAML file whose top level is a mapping (empty file: {}); errors are one line naming the file."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise HiermemError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise HiermemError(f"{path}: invalid YAML (nested too deeply)") from None
    if not isinstance(loaded, dict):
        raise HiermemError(f"{path}: expected a mapping at the top level")
    return loaded


def load_config(preset: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- preset YAML (if any) <- dot-list overrides, then validated."""
    if not preset:
        return _merge({}, overrides, "defaults")
    path = preset_path(preset)
    return _merge(read_yaml_mapping(path), overrides, str(path))


def _merge(base: dict, overrides: list[str] | tuple[str, ...], source: str) -> Config:
    """Defaults <- base <- dot-list overrides, validated; errors name the source and the key."""
    for item in overrides:
        if "=" not in item:
            raise HiermemError(f"override {item!r}: expected key=value (e.g. train.lr=3e-4)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), base)
    except OmegaConfBaseException as e:
        raise HiermemError(f"config ({source}): {_one_line(e)}") from None
    except TypeError as e:  # OmegaConf's own: e.g. a mapping merged into a list field
        raise HiermemError(f"config ({source}): {str(e).splitlines()[0]}") from None
    try:
        merged = OmegaConf.merge(merged, _dotlist(overrides))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise HiermemError(f"config (command line): {_one_line(e)}") from None
    except TypeError as e:
        raise HiermemError(f"config (command line): {str(e).splitlines()[0]}") from None
    return validate(cfg)


def _dotlist(overrides: list[str] | tuple[str, ...]):
    """OmegaConf.from_dotlist, whose values are YAML: a value YAML cannot parse is named with its override."""
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (yaml.YAMLError, RecursionError):
        for item in overrides:
            key = printable(item.split("=", 1)[0])
            try:
                OmegaConf.from_dotlist([item])
            except yaml.YAMLError as e:
                raise HiermemError(f"override {key}: invalid value ({str(e).splitlines()[0]})") from None
            except RecursionError:
                raise HiermemError(f"override {key}: invalid value (nested too deeply)") from None
        raise


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, source: str = "config") -> Config:
    return _merge(d, (), source)


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...], source: str = "config") -> Config:
    """A copy of cfg with dot-list overrides applied, validated (errors name `source` and the key)."""
    return _merge(to_dict(cfg), overrides, source)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, dump_config(cfg))


# Keys that older versions wrote into a run's config.yaml and that no longer exist: dropped when read.
REMOVED_KEYS = {"memory.dispatch": "0.1.0: one memory representation now serves every device",
                "memory.cache_levels": "bank format 3: the block cache (memory.cache_bytes) pins shallow levels"}


def read_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A saved config (a run's or a data directory's), with dot-list overrides applied on top."""
    path = Path(path)
    if not path.is_file():
        raise HiermemError(f"{path}: missing (not a hiermem run or data directory?)")
    saved = read_yaml_mapping(path)
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
    for section, key in (("data", "corpus"), ("data", "tokenizer"), ("train", "init_from"), ("model", "hf"),
                         ("routing", "tree_from")):
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
