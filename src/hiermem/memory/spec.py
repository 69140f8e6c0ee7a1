"""The shape of a memory bank: one block per tree node, level by level, and its parameter accounting.

Level l holds branching**(l+1) blocks of rank r_l; a block is [n_mem_layers, 3, r_l, d] (gate rows, up rows,
transposed down columns, as in model/fetched.py). The generic block has the rank of a whole path. Every array
of a bank is a "part" named like its file stem: "level0", "level1", ..., "generic". Paths hold, per level, the
node's index within that level (0 <= id < branching**(level+1)).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hiermem.config import Config
from hiermem.errors import HiermemError
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
            return (1, self.n_mem_layers, 3, self.fetched_rank, self.d)
        level = int(key.removeprefix("level"))
        return (self.n_nodes(level), self.n_mem_layers, 3, self.ranks[level], self.d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ranks"] = list(self.ranks)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BankSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise HiermemError(f"bank spec: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise HiermemError(f"bank spec: {e}") from None


def bank_param_counts(spec: BankSpec) -> dict[str, Any]:
    """Parameter counts, arithmetically (nothing is allocated): a block of rank r holds 3·r·n_mem_layers·d."""
    per_block = 3 * spec.n_mem_layers * spec.d
    per_level = [per_block * r * spec.n_nodes(level) for level, r in enumerate(spec.ranks)]
    fetched = per_block * spec.fetched_rank
    return {"fetched": fetched, "bank": sum(per_level), "generic": fetched if spec.generic else 0,
            "per_level": per_level}



def spec_from_config(cfg: Config) -> BankSpec:
    m = cfg.memory
    return BankSpec(d=cfg.model.d_model, n_layers=cfg.model.n_layers, ranks=tuple(m.ranks),
                    branching=cfg.routing.branching, layers=tuple(m.layers) if m.layers else None,
                    generic=m.generic, init_std=m.init_std)


def parameter_report(cfg: Config) -> dict:
    """Anchor / fetched / bank parameter counts, computed from shapes alone."""
    out = {"anchor": count_parameters(cfg.model)}
    if cfg.uses_memory:
        counts = bank_param_counts(spec_from_config(cfg))
        out.update(fetched=counts["fetched"], bank=counts["bank"], generic=counts["generic"])
    return out
