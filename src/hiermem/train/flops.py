"""The FLOP model of one trained token and the accelerator peaks behind MFU (used by `hiermem train`'s log and
by `hiermem bench --suite train`).

Per trained token, forward + backward = 3 x forward, 2 FLOPs per multiply-add:
  anchor = 6·(L·(4·d·w + 3·d·d_ff) + V·d) + 6·L·T·w     matmul weights; causal attention QK^T and AV
  memory = 6·L_mem·3·R·d                                  the fetched neurons (R = r1 + r2 + ...)
FLOP-bound ratio = anchor / (anchor + memory): the best memory/anchor throughput ratio at equal FLOP rate.
MFU = FLOPs/s over the card's dense bf16 peak (unknown devices, the CPU included, get no MFU).
"""

from __future__ import annotations

from hiermem.config import ModelConfig
from hiermem.memory.spec import BankSpec

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense bf16 tensor-core peaks


def flops_per_token(cfg: ModelConfig, seq: int, spec: BankSpec | None) -> dict[str, float]:
    d, w, L = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_layers
    matmul = L * (4 * d * w + 3 * d * cfg.d_ff) + cfg.vocab_size * d
    anchor = 6.0 * matmul + 6.0 * L * seq * w
    memory = 0.0 if spec is None else 6.0 * spec.n_mem_layers * 3 * spec.fetched_rank * d
    return {"anchor": anchor, "memory": memory, "flop_bound_ratio": anchor / (anchor + memory)}


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a device named like torch.cuda.get_device_name() (None when not known)."""
    return next((p for key, p in PEAK_BF16.items() if key in device_name), None)

