"""`hiermem verify PATH`: check every file of a run or data directory in full, and digest a run's weights.

Everything the loaders check cheaply (sizes, seals) and everything they leave for later (each bank block,
large memory-mapped files) is checked here in full: every file listed in a folder's .checksums.json, the
sealed JSON files, every checkpoint file against state.json, every bank block's weights and optimizer state
against the block table, each metrics.jsonl line's seal, the packed caches and the clustering. One line per
problem, naming the file (and the block).

The digest of a run is blake2b over its final weights in a canonical order, whatever their layout on disk:
the anchor's tensors (anchor.safetensors, else the last checkpoint's), by sorted name, as little-endian
float32 (integer tensors as int64), then every bank block's current value (the published generation), part
by part in sorted order, block by block, as little-endian float32. Two runs with equal digests hold the same
numbers, whether their bank was trained in RAM or on disk or written in several generations.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hiermem.errors import HiermemError
from hiermem.integrity import CHECKSUMS, check_file, read_json, unseal
from hiermem.memory.precision import from_bytes
from hiermem.memory.store import MANIFEST, open_store

DIGEST_BYTES = 32


@dataclass
class Report:
    path: Path
    kind: str  # "run" or "data"
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: int = 0  # files (or bank parts) checked
    digest: str | None = None

    def check(self, fn: Callable[[], object]) -> object:
        """fn() once; a HiermemError it raises is recorded as a problem (and None returned)."""
        self.checked += 1
        try:
            return fn()
        except HiermemError as e:
            self.problems.append(str(e))
            return None

    def to_json(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "ok": not self.problems, "problems": self.problems,
                "notes": self.notes, "checked": self.checked, "digest": self.digest}


def verify(path: str | Path) -> Report:
    path = Path(path)
    if (path / "prepare.json").is_file():
        report = Report(path, "data")
        _verify_data(path, report)
    elif (path / "config.yaml").is_file() or (path / "run.json").is_file():
        report = Report(path, "run")
        _verify_run(path, report)
    else:
        raise HiermemError(f"{path}: neither a run directory (config.yaml) nor a data directory (prepare.json)")
    return report


# -- shared ---------------------------------------------------------------------------------------------------
def _listing(folder: Path, report: Report) -> None:
    """Every file folder/.checksums.json lists, in full."""
    if not (folder / CHECKSUMS).is_file():
        report.notes.append(f"{folder}: no {CHECKSUMS} (written by an older hiermem): its files are not checked")
        return
    listing = report.check(lambda: read_json(folder / CHECKSUMS, "checksum list"))
    for name, entry in sorted((listing or {}).get("files", {}).items()):
        report.check(lambda: check_file(folder / name, "file listed in .checksums.json", entry=entry))


def _sealed(path: Path, report: Report, what: str) -> None:
    if path.is_file():
        report.check(lambda: read_json(path, what))


# -- a data directory -----------------------------------------------------------------------------------------
def _verify_data(path: Path, report: Report) -> None:
    from hiermem.data.packing import PackedDataset
    from hiermem.data.shards import DocIndex
    from hiermem.routing.clustering import read_clustering_report

    _sealed(path / "prepare.json", report, "data directory metadata")
    _listing(path, report)
    for sub in ("doc_tokens", "index"):
        if (path / sub).is_dir():
            _listing(path / sub, report)
    if (path / "index" / "shards.json").is_file():
        report.check(lambda: DocIndex(path / "index"))
    for packed in sorted((path / "packed").glob("*/")) if (path / "packed").is_dir() else []:
        if packed.is_dir() and not packed.name.startswith("."):
            _listing(packed, report)
            report.check(lambda: PackedDataset(packed))
    cluster = path / "cluster"
    if (cluster / "cluster.json").is_file():
        meta = report.check(lambda: read_clustering_report(cluster / "cluster.json"))
        for rel, entry in sorted(((meta or {}).get("checksums") or {}).get("files", {}).items()):
            file = cluster / rel if (cluster / rel).is_file() or "/" not in rel else path / rel
            report.check(lambda: check_file(file, "file of the clustering", entry=entry))


# -- a run directory ------------------------------------------------------------------------------------------
def _verify_run(path: Path, report: Report) -> None:
    from hiermem.data.tokenizer import Tokenizer
    from hiermem.routing.tree import Tree
    from hiermem.train.checkpoint import load_state, read_run_format, read_weights

    report.check(lambda: read_run_format(path))
    _listing(path, report)
    _sealed(path / "train_summary.json", report, "training summary")
    if (path / "tokenizer.json").is_file():
        report.check(lambda: Tokenizer.load(path / "tokenizer.json"))
    if (path / "tree.npz").is_file():
        report.check(lambda: Tree.load(path / "tree.npz"))
    _metrics(path / "metrics.jsonl", report)
    state = None
    if (path / "checkpoint" / "state.json").is_file():
        state = report.check(lambda: load_state(path / "checkpoint"))  # every checkpoint file, in full
    anchor = None
    if (path / "anchor.safetensors").is_file():
        anchor = report.check(lambda: read_weights(path / "anchor.safetensors"))
    elif state is not None:
        anchor = report.check(lambda: read_weights(path / "checkpoint" / state["files"]["model"]))
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    _digest_tensors(h, anchor or {})
    bank_ok = True
    if (path / "bank" / MANIFEST).is_file():
        bank_ok = _bank(path / "bank", report, h)
    if anchor is not None and bank_ok:
        report.digest = h.hexdigest()


def _metrics(path: Path, report: Report) -> None:
    if not path.is_file():
        return
    report.checked += 1
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        try:
            rec = unseal(path, json.loads(line))
            if not isinstance(rec, dict) or "step" not in rec:
                raise ValueError("no step")
        except HiermemError:
            report.problems.append(f"{path}:{n}: corrupted metrics line (checksum mismatch)")
        except ValueError as e:
            report.problems.append(f"{path}:{n}: unreadable metrics line ({type(e).__name__})")


def _bank(dir: Path, report: Report, h) -> bool:
    """Every block of the published generation, weights and optimizer state, checked; the weights digested.
    Returns whether all of it could be read."""
    store = report.check(lambda: open_store(dir))
    if store is None:
        return False
    ok = True
    for key in sorted(store.layouts):
        lay = store.layouts[key]
        nbytes = lay.weight_bytes + (lay.state_bytes if store.has_state else 0)
        report.checked += 1
        h.update(f"bank:{key}:{tuple(lay.shape)};".encode())
        for i in range(lay.n_blocks):
            try:
                (rec,) = store.read(key, np.array([i]), nbytes, check=True)
            except HiermemError as e:
                report.problems.append(str(e))
                ok = False
                continue
            w = from_bytes(rec[:lay.weight_bytes], store.dtype, tuple(lay.shape[1:]))
            h.update(w.float().numpy().astype("<f4", copy=False).tobytes())
    return ok


def _digest_tensors(h, state: dict[str, torch.Tensor]) -> None:
    for name in sorted(state):
        t = state[name].detach().cpu()
        t = t.to(torch.float32) if t.is_floating_point() else t.to(torch.int64)
        a = t.contiguous().numpy()
        a = a.astype("<f4" if a.dtype.kind == "f" else "<i8", copy=False)
        h.update(f"anchor:{name}:{tuple(t.shape)};".encode())
        h.update(a.tobytes())


def format_report(report: Report) -> str:
    lines = [*report.problems, *(f"note: {n}" for n in report.notes)]
    if report.digest is not None:
        lines.append(f"digest: {report.digest}")
    verdict = (f"damaged: {len(report.problems)} problem(s) in {report.path}" if report.problems
               else f"ok: {report.path} ({report.kind} directory, {report.checked} checks)")
    return "\n".join([*lines, verdict])
