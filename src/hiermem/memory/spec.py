"""The shape of a memory bank: one block per tree node, level by level, and its parameter accounting.

Level l holds branching**(l+1) blocks of rank r_l; a block is [n_mem_layers, S, r_l, d]: for FFN memory S = 3
(gate rows, up rows, transposed down columns, as in model/fetched.py), for the other kinds (memory.kind) the
slabs of their matrices (model/memory_kinds.py). The generic block has the rank of a whole path. Every array
of a bank is a "part" named like its file stem: "level0", "level1", ..., "generic". Paths hold, per level, the
node's index within that level (0 <= id < branching**(level+1)).

A spec names only the widths its kind's layout depends on (attn_width for lora_qk, lora_vo and kv; d_ff for
lora_ffn; lora_alpha for the LoRA kinds); the others stay None, so an FFN spec is the same whatever the
anchor's other widths, and a bank manifest written before memory kinds existed (no `kind`) loads as ffn.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from hiermem.config import Config
from hiermem.errors import HiermemError
from hiermem.model.memory_kinds import KINDS, MemoryKind
from hiermem.model.transformer import count_parameters

GENERIC = "generic"


@dataclass(frozen=True)
class BankSpec:
    d: int
    n_layers: int
    ranks: tuple[int, ...]  # r_l per tree level (paper's (r1, r2, r3, r4)); 0 = no memory at that level
    branching: int
    layers: tuple[int, int] | None = None  # [start, end) of model layers carrying memory; None = all
    generic: bool = True  # an extra non-retrieved block of size sum(ranks): the generic-memory control
    init_std: float | None = None  # None -> 1/sqrt(d) (OpenLM), truncated at ±3σ
    kind: str = "ffn"  # memory type (model/memory_kinds.py)
    attn_width: int | None = None  # n_heads·head_dim: lora_qk, lora_vo and kv only
    d_ff: int | None = None  # the FFN's hidden width: lora_ffn only
    lora_alpha: float | None = None  # LoRA scaling numerator (a row adds (alpha/R)·B·A): lora_* only

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if self.d <= 0 or self.n_layers <= 0:
            raise HiermemError(f"memory: d and n_layers must be positive, got d={self.d}, n_layers={self.n_layers}")
        if not self.ranks or any(r < 0 for r in self.ranks) or sum(self.ranks) == 0:
            raise HiermemError(f"memory.ranks: need one rank >= 0 per tree level and at least one > 0, "
                               f"got {self.ranks}")
        if self.branching < 1:
            raise HiermemError(f"memory.branching: must be >= 1, got {self.branching}")
        if self.layers is not None:
            lo, hi = self.layers if len(self.layers) == 2 else (-1, -1)
            if not 0 <= lo < hi <= self.n_layers:
                raise HiermemError(f"memory.layers: need [start, end) with 0 <= start < end <= {self.n_layers}, "
                                   f"got {self.layers}")
        if self.init_std is not None and not self.init_std > 0:
            raise HiermemError(f"memory.init_std: must be > 0, got {self.init_std}")
        if self.kind not in KINDS:
            raise HiermemError(f"memory.kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        needs = MemoryKind(self.kind).needs
        for name in ("attn_width", "d_ff"):
            value = getattr(self, name)
            if name in needs and not (isinstance(value, int) and value > 0):
                raise HiermemError(f"memory.{name}: memory.kind={self.kind} needs a positive width, got {value}")
            if name not in needs and value is not None:
                raise HiermemError(f"memory.{name}: memory.kind={self.kind} does not use it, got {value}")
        lora = self.kind.startswith("lora_")
        if lora and self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", MemoryKind(self.kind).lora_alpha)
        if lora and not self.lora_alpha > 0:
            raise HiermemError(f"memory.lora_alpha: must be > 0, got {self.lora_alpha}")
        if not lora and self.lora_alpha is not None:
            raise HiermemError(f"memory.lora_alpha: memory.kind={self.kind} does not use it, got {self.lora_alpha}")

    @property
    def depth(self) -> int:
        return len(self.ranks)

    @property
    def first_layer(self) -> int:
        return 0 if self.layers is None else self.layers[0]

    @property
    def n_mem_layers(self) -> int:
        return self.n_layers if self.layers is None else self.layers[1] - self.layers[0]

    @property
    def fetched_rank(self) -> int:
        return sum(self.ranks)

    @property
    def memory_kind(self) -> MemoryKind:
        return MemoryKind(self.kind, self.attn_width, self.d_ff, self.lora_alpha)

    @property
    def n_slabs(self) -> int:
        return self.memory_kind.n_slabs(self.d)

    @property
    def std(self) -> float:
        return self.init_std if self.init_std is not None else self.d ** -0.5

    def n_nodes(self, level: int) -> int:
        return self.branching ** (level + 1)

    def level_parts(self) -> list[tuple[str, int, int, int]]:
        """(key, level, offset, rank) for each level that has memory; offset = its start along the fetched R."""
        out, off = [], 0
        for level, r in enumerate(self.ranks):
            if r > 0:
                out.append((f"level{level}", level, off, r))
            off += r
        return out

    def part_keys(self) -> list[str]:
        return [p[0] for p in self.level_parts()] + ([GENERIC] if self.generic else [])

    def part_shape(self, key: str) -> tuple[int, ...]:
        if key == GENERIC:
            return (1, self.n_mem_layers, self.n_slabs, self.fetched_rank, self.d)
        level = int(key.removeprefix("level"))
        return (self.n_nodes(level), self.n_mem_layers, self.n_slabs, self.ranks[level], self.d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ranks"] = list(self.ranks)
        d["layers"] = None if self.layers is None else list(self.layers)
        for name in ("attn_width", "d_ff", "lora_alpha"):  # what the kind does not use is not written,
            if d[name] is None:
                del d[name]
        if self.kind == "ffn":  # and an ffn spec is written as before memory kinds existed
            del d["kind"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BankSpec":
        """The spec of a manifest (one without `kind`, from before memory kinds, is an ffn bank)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise HiermemError(f"bank spec: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise HiermemError(f"bank spec: {e}") from None


def bank_param_counts(spec: BankSpec) -> dict[str, Any]:
    """Parameter counts, arithmetically (nothing is allocated), of real parameters (not a layout's padding): a
    block of rank r holds r·n_mem_layers·c parameters, c = 3d for ffn, 2(d + h·d_h) for lora_qk and lora_vo,
    3(d + d_ff) for lora_ffn, 2·h·d_h for kv."""
    per_rank = spec.n_mem_layers * spec.memory_kind.params_per_rank(spec.d)
    per_level = [per_rank * r * spec.n_nodes(level) for level, r in enumerate(spec.ranks)]
    fetched = per_rank * spec.fetched_rank
    return {"fetched": fetched, "bank": sum(per_level), "generic": fetched if spec.generic else 0,
            "per_level": per_level}


def stored_entries(spec: BankSpec) -> int:
    """Entries the bank stores (its levels and generic block), the layout's zero padding included."""
    return sum(math.prod(spec.part_shape(key)) for key in spec.part_keys())


def equal_fetched_ranks(cfg_or_spec: "Config | BankSpec", kind: str) -> tuple[int, ...]:
    """Per-level ranks for memory kind `kind` whose fetched parameter count is as close as possible to that of
    FFN memory with the configured ranks (3·d·n_mem_layers per unit of rank); the total is split over the levels
    in proportion to the configured ranks (largest remainders), levels without memory stay at 0, and each
    level with memory keeps at least rank 1 when the total allows it. A spec must carry the widths `kind`
    needs (a config always does)."""
    if kind not in KINDS:
        raise HiermemError(f"memory.kind: {kind!r} is not one of {', '.join(KINDS)}")
    if isinstance(cfg_or_spec, Config):
        spec, m = spec_from_config(cfg_or_spec), cfg_or_spec.model
        widths = {"attn_width": m.n_heads * m.head_dim, "d_ff": m.d_ff}
    else:
        spec = cfg_or_spec
        widths = {"attn_width": spec.attn_width, "d_ff": spec.d_ff}
    target = MemoryKind(kind, **{k: widths[k] for k in MemoryKind(kind).needs})
    missing = [k for k in target.needs if getattr(target, k) is None]
    if missing:
        raise HiermemError(f"equal_fetched_ranks: memory.kind={kind} needs {missing[0]}; pass the config")
    ranks = spec.ranks
    total = max(1, round(3 * spec.d * sum(ranks) / target.params_per_rank(spec.d)))
    quotas = [total * r / sum(ranks) for r in ranks]
    out = [math.floor(q) for q in quotas]
    for i in sorted(range(len(ranks)), key=lambda i: out[i] - quotas[i])[:total - sum(out)]:
        out[i] += 1  # the largest remainders first
    for i, r in enumerate(ranks):
        if r > 0 and out[i] == 0 and total >= sum(1 for x in ranks if x > 0):
            out[max(range(len(out)), key=lambda j: out[j])] -= 1
            out[i] = 1
    return tuple(out)



def spec_from_config(cfg: Config) -> BankSpec:
    m, model = cfg.memory, cfg.model
    needs = MemoryKind(m.kind).needs
    return BankSpec(d=model.d_model, n_layers=model.n_layers, ranks=tuple(m.ranks),
                    branching=cfg.routing.branching, layers=tuple(m.layers) if m.layers else None,
                    generic=m.generic, init_std=m.init_std, kind=m.kind,
                    attn_width=model.n_heads * model.head_dim if "attn_width" in needs else None,
                    d_ff=model.d_ff if "d_ff" in needs else None,
                    lora_alpha=float(m.lora_alpha) if m.kind.startswith("lora_") else None)


def parameter_report(cfg: Config) -> dict:
    """Anchor / fetched / bank parameter counts of the configured memory kind, computed from shapes alone;
    stored: the entries the bank stores, padding included, where its layout pads matrices (some non-ffn kinds)."""
    out = {"anchor": count_parameters(cfg.model)}
    if cfg.uses_memory:
        spec = spec_from_config(cfg)
        counts = bank_param_counts(spec)
        out.update(fetched=counts["fetched"], bank=counts["bank"], generic=counts["generic"])
        if stored_entries(spec) != counts["bank"] + counts["generic"]:
            out["stored"] = stored_entries(spec)
    return out
