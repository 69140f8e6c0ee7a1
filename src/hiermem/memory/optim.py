"""Lazy (sparse) AdamW for the memory bank.

Only the blocks fetched in a step are updated: their moments, their weight decay and their own step count
(bias corrections use the per-block count). Every other block, with its m, v and count, stays bit-identical:
dense AdamW would keep moving un-fetched blocks through stale momentum and decoupled weight decay
(docs/method.md §6.2). The update itself mirrors torch.optim.AdamW's single-tensor code, op for op.

State per part ("level{l}", "generic"): m and v arrays shaped like the part and an int64 step count per block.
For memory-mapped parts m and v are memory-mapped files too, in state_dir (default: <bank dir>/adam), and that
folder is reopened by the next LazyAdamW on the same bank: the state of a bank larger than RAM lives beside it.
Saved files: m.<part>.npy, v.<part>.npy, step.<part>.npy and adam.json (they can share the bank's folder).
Hyperparameters always come from the constructor (the config); adam.json records them for reference only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_write_json
from hiermem.memory.bank import MemoryBank
from hiermem.memory.fetch import BlockGrads
from hiermem.memory.files import open_npy, rows_per_chunk, save_npy

STATE_JSON = "adam.json"
FORMAT = "hiermem-lazy-adamw/1"


class LazyAdamW:
    def __init__(self, bank: MemoryBank, lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 1e-3, state_dir: str | Path | None = None):
        self.bank, self.lr, self.betas, self.eps, self.weight_decay = bank, lr, tuple(betas), eps, weight_decay
        mapped = [k for k in bank.parts() if bank.is_mapped(k)]
        if state_dir is None and mapped:
            state_dir = bank.dir / "adam"
        self.state_dir = None if state_dir is None else Path(state_dir)
        resume = self.state_dir is not None and (self.state_dir / STATE_JSON).is_file()
        if resume:
            self._check_saved(self.state_dir)
        self.m, self.v, self.steps = {}, {}, {}
        self._maps: dict[tuple[str, str], np.memmap] = {}
        for key in bank.parts():
            shape = tuple(bank.part(key).shape)
            for name, store in (("m", self.m), ("v", self.v)):
                path = self.state_dir / f"{name}.{key}.npy" if self.state_dir is not None else None
                if path is not None and key in mapped:
                    if resume:
                        mm = open_npy(path, shape, np.float32, "r+", f"{self.state_dir / STATE_JSON}")
                    else:  # a fresh .npy memory map is all zeros (a sparse file: nothing is written)
                        path.parent.mkdir(parents=True, exist_ok=True)
                        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
                    self._maps[(name, key)] = mm
                    store[key] = torch.from_numpy(mm)
                elif resume:
                    a = open_npy(path, shape, np.float32, None, f"{self.state_dir / STATE_JSON}")
                    store[key] = torch.from_numpy(a).to(bank.device)
                else:
                    store[key] = torch.zeros(shape, device=bank.device)
            self.steps[key] = (open_npy(self.state_dir / f"step.{key}.npy", shape[:1], np.int64, None,
                                        f"{self.state_dir / STATE_JSON}") if resume else np.zeros(shape[0], np.int64))
        if self.state_dir is not None and not resume:
            self.save(self.state_dir)  # marks the folder as holding this bank's state

    # -- the update ----------------------------------------------------------------------------------------
    def step(self, grads: BlockGrads, lr: float | None = None) -> list[int]:
        """Update the blocks in grads; returns the number of distinct blocks updated per tree level."""
        lr = self.lr if lr is None else float(lr)
        b1, b2 = self.betas
        updated = [0] * self.bank.spec.depth
        for key, ids in grads.ids.items():
            if not len(ids):
                continue
            m_all, v_all, steps = self.m[key], self.v[key], self.steps[key]
            g = grads.grads[key].to(m_all.device, torch.float32)
            if g.shape != (len(ids),) + tuple(m_all.shape[1:]):
                raise ValueError(f"LazyAdamW.step: {key} gradient has shape {tuple(g.shape)} for {len(ids)} blocks")
            ids = ids.cpu()
            ids_np, idx = ids.numpy(), ids.to(m_all.device)
            steps[ids_np] += 1
            # per-block bias corrections, computed in float64 like torch's Python-float scalars
            t = torch.from_numpy(steps[ids_np].astype(np.float64))
            bshape = (-1,) + (1,) * (g.dim() - 1)
            step_size = (lr / (1 - b1 ** t)).to(m_all.device, torch.float32).view(bshape)
            bc2_sqrt = ((1 - b2 ** t) ** 0.5).to(m_all.device, torch.float32).view(bshape)

            w = self.bank.read_blocks(key, ids).to(m_all.device)
            m, v = m_all.index_select(0, idx), v_all.index_select(0, idx)
            w.mul_(1 - lr * self.weight_decay)  # decoupled weight decay, touched blocks only
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            w.add_(-step_size * m / denom)  # = addcdiv_(m, denom, value=-step_size), same op order
            m_all.index_copy_(0, idx, m)
            v_all.index_copy_(0, idx, v)
            self.bank.write_blocks(key, ids, w)
            if key.startswith("level"):
                updated[int(key[5:])] = len(ids)
        return updated

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """m and v are the live tensors (memory-mapped ones are not copied); steps are copies."""
        return {"m": dict(self.m), "v": dict(self.v), "step": {k: s.copy() for k, s in self.steps.items()},
                "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for name, store in (("m", self.m), ("v", self.v)):
            got = sd.get(name, {})
            if sorted(got) != sorted(store):
                raise HiermemError(f"optimizer state: {name} holds parts {sorted(got)}, the bank has {sorted(store)}")
            for key, t in store.items():
                src = torch.as_tensor(got[key])
                if tuple(src.shape) != tuple(t.shape):
                    raise HiermemError(f"optimizer state: {name}.{key} has shape {tuple(src.shape)}, "
                                       f"the bank needs {tuple(t.shape)}")
        for key, s in self.steps.items():
            src = np.asarray(sd["step"][key])
            if src.shape != s.shape:
                raise HiermemError(f"optimizer state: step.{key} has shape {src.shape}, the bank needs {s.shape}")
        for name, store in (("m", self.m), ("v", self.v)):
            for key, t in store.items():
                t.copy_(torch.as_tensor(sd[name][key]))
        for key, s in self.steps.items():
            s[:] = np.asarray(sd["step"][key], dtype=np.int64)

    def save(self, dir: str | Path | None = None) -> None:
        """Write the state to dir (default: state_dir), each file atomically, adam.json last.
        Into its own state_dir, memory-mapped m/v are only flushed."""
        dir = Path(dir) if dir is not None else self.state_dir
        if dir is None:
            raise ValueError("LazyAdamW.save: no state_dir; pass a folder")
        in_place = self.state_dir is not None and dir.resolve() == self.state_dir.resolve()
        dir.mkdir(parents=True, exist_ok=True)
        for name, store in (("m", self.m), ("v", self.v)):
            for key, t in store.items():
                mm = self._maps.get((name, key))
                if in_place and mm is not None:
                    mm.flush()
                else:
                    save_npy(dir / f"{name}.{key}.npy", mm if mm is not None else t.cpu().numpy())
        for key, s in self.steps.items():
            save_npy(dir / f"step.{key}.npy", s)
        atomic_write_json(dir / STATE_JSON, {
            "format": FORMAT, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay,
            "parts": {k: list(t.shape) for k, t in self.m.items()}})

    def load(self, dir: str | Path) -> None:
        """Read a state saved by save(dir) into this optimizer (memory-mapped state is copied in chunks)."""
        dir = Path(dir)
        self._check_saved(dir)
        what = f"{dir / STATE_JSON}"
        for name, store in (("m", self.m), ("v", self.v)):
            for key, t in store.items():
                path = dir / f"{name}.{key}.npy"
                src = open_npy(path, tuple(t.shape), np.float32, "r", what)
                mm = self._maps.get((name, key))
                if mm is not None and Path(mm.filename).resolve() == path.resolve():
                    continue  # that file is our own live state
                step = rows_per_chunk(src.shape)
                for lo in range(0, src.shape[0], step):
                    t[lo:lo + step].copy_(torch.from_numpy(np.array(src[lo:lo + step])))
        for key, s in self.steps.items():
            s[:] = open_npy(dir / f"step.{key}.npy", s.shape, np.int64, None, what)

    def _check_saved(self, dir: Path) -> None:
        path = dir / STATE_JSON
        if not path.is_file():
            raise HiermemError(f"{path}: missing (no saved bank optimizer state in {dir})")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            parts = {k: tuple(v) for k, v in meta["parts"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise HiermemError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
        if meta.get("format") != FORMAT:
            raise HiermemError(f"{path}: not a hiermem LazyAdamW state (format {meta.get('format')!r})")
        want = {k: tuple(self.bank.part(k).shape) for k in self.bank.parts()}
        if sorted(parts) != sorted(want):
            raise HiermemError(f"{path}: holds state for parts {sorted(parts)}, the bank has {sorted(want)}")
        for k, shape in want.items():
            if parts[k] != shape:
                raise HiermemError(f"{path}: {k} state has shape {parts[k]}, the bank needs {shape}")
