"""Suites `scale` and `fetch`: a bank and its optimizer state on disk (memory/disk.py), behind the block cache.

scale: the trainer's own TrainStep (train/step.py) with a bank whose records (weights and lazy-AdamW moments)
take size_gb on disk, read through a block cache of cache_gb with the prefetcher asking for the blocks of the
batches `prefetch` steps ahead (as `hiermem train` does), against the same model with a bank in RAM of the same
block shape and fewer nodes (the train suite's branching). The store is written with random weights and
moments, so every byte a step reads is real data on disk (no holes), and the page cache is dropped for its files
before the timed steps. Reported: tokens/s of both and their ratio, the peak RssAnon of the process while the
disk variant runs (sampled from /proc/self/status every 10 ms; VmHWM, the kernel's own peak of the resident set,
beside it: the bank is read with pread, never memory-mapped, so its pages are not in it), the bytes read and
written per step and the cache's hit rate. Targets (issue 8): peak < 8 GB, ratio >= 0.7.

fetch: one root-to-leaf path fetched as inference fetches it (fetch() on a read-only bank on disk, the paper's
160M block shape) against a raw pread of the same bytes, each into fresh memory: cold (a new bank, so an empty
block cache, and the page cache dropped for the bank's files with posix_fadvise DONTNEED before each trial) and
warm (consecutive prompts of one level-(depth-2) subtree after the first: their shallow blocks come from the
block cache, their leaves from disk). Cold is measured with the checksums verified (the default) and without.
Targets: cold >= 0.7 of the raw read's speed, warm >= 5x faster than cold.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from hiermem.bench.rss import RssSampler, proc_status
from hiermem.bench.table import print_rows
from hiermem.bench.train_throughput import device_name, random_bank, shape_config, synthetic_batch
from hiermem.errors import HiermemError
from hiermem.memory.bank import MemoryBank
from hiermem.memory.fetch import fetch
from hiermem.memory.precision import as_bytes, itemsize, storage_dtype
from hiermem.memory.spec import BankSpec, bank_param_counts, spec_from_config
from hiermem.memory.store import BlockStore, Layout
from hiermem.model.transformer import Transformer
from hiermem.train.step import TrainStep, anchor_optimizer, bank_optimizer

GB = 1e9


# -- shared: a store of random records, the page cache, the process's memory --------------------------------
def store_bytes(spec: BankSpec, dtype: str, state: bool) -> int:
    return sum(Layout.of(spec, k, dtype, state).record_bytes * spec.part_shape(k)[0] for k in spec.part_keys())


def fill_store(dir: Path, spec: BankSpec, dtype: str, state: bool, seed: int = 0) -> BlockStore:
    """A published store of random weights (and moments: m ~ 1e-3 N(0,1), v ~ 1e-6 chi^2), record by record:
    slices of a random pool at varying offsets, so that writing is bounded by the disk, not the RNG."""
    need = store_bytes(spec, dtype, state)
    dir.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dir.parent).free
    if need > 0.95 * free:
        raise HiermemError(f"{dir.parent}: {need / GB:.1f} GB needed for the bench's bank, {free / GB:.1f} GB free")
    store = BlockStore.create(dir, spec, dtype, state=state)
    rng = np.random.default_rng(seed)
    longest = max(int(np.prod(spec.part_shape(k)[1:])) for k in spec.part_keys())
    n = 2 * longest + 1_000_003
    w = as_bytes(torch.from_numpy(rng.standard_normal(n, np.float32) * np.float32(spec.std)).to(
        torch.bfloat16 if dtype == "bfloat16" else torch.float32))
    m = (rng.standard_normal(n, np.float32) * np.float32(1e-3)).view(np.uint8)
    v = (np.square(rng.standard_normal(n, np.float32)) * np.float32(1e-6)).view(np.uint8)
    size = itemsize(dtype)
    for key in spec.part_keys():
        count = int(np.prod(spec.part_shape(key)[1:]))
        for i in range(spec.part_shape(key)[0]):
            o = (i * 7919) % (n - count)
            parts = [w[o * size:(o + count) * size]] + ([m[4 * o:4 * (o + count)], v[4 * o:4 * (o + count)]]
                                                         if state else [])
            store.write(key, i, np.concatenate(parts))
    store.commit(0, store.writes)
    store.publish()
    return store


def drop_page_cache(files: list[Path]) -> None:
    """Evict the files' pages from the page cache (they are clean: the store fsynced them)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def save_json(res: dict, path: Path) -> None:
    path.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")


# -- suite scale ---------------------------------------------------------------------------------------------
def branching_for(spec: BankSpec, dtype: str, size_bytes: float) -> int:
    """The smallest branching whose bank, with its moments, takes at least size_bytes on disk."""
    k = 2
    while store_bytes(BankSpec(**{**spec.to_dict(), "branching": k}), dtype, state=True) < size_bytes:
        k += 1
    return k


def time_training(step: TrainStep, cfg, warmup: int, steps: int, ahead: int) -> dict:
    """Time `steps` steps after `warmup`, asking for the blocks `ahead` batches ahead as the trainer does."""
    batches = [synthetic_batch(cfg, i, doc_len=0) for i in range(warmup + steps + ahead)]
    for i in range(ahead):
        step.prefetch(batches[i]["paths"], i)
    bank = step.bank
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            io0, t1, fetched = bank.io_stats(), time.perf_counter(), 0
        if ahead:
            step.prefetch(batches[i + ahead]["paths"], i + ahead)
        out = step(batches[i], i)
        if i >= warmup:
            fetched += out["fetched_bytes"]
    loss = float(out["loss"])
    t2 = time.perf_counter()
    io1 = bank.io_stats()
    dt = (t2 - t1) / steps
    res = {"tok_per_s": cfg.train.batch_size * cfg.data.seq_len / dt, "ms_per_step": 1e3 * dt,
           "warmup_s": t1 - t0, "loss": loss, "fetched_bytes_per_step": fetched / steps}
    if io1:
        hits, misses = io1["hits"] - io0["hits"], io1["misses"] - io0["misses"]
        res.update(disk_read_bytes_per_step=(io1["read_bytes"] - io0["read_bytes"]) / steps,
                   disk_write_bytes_per_step=(io1["written_bytes"] - io0["written_bytes"]) / steps,
                   cache_hit_rate=hits / max(1, hits + misses), cache_peak_bytes=io1["peak_bytes"])
    return res


def build(cfg, bank: MemoryBank) -> TrainStep:
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    cpu = torch.device("cpu")
    return TrainStep(cfg, model, cpu, total_steps=10_000, anchor_opt=anchor_optimizer(model, cfg), bank=bank,
                     bank_opt=bank_optimizer(bank, cfg))


def run(out: str = "runs/bench", quick: bool = False, size_gb: float | None = None, cache_gb: float | None = None,
        steps: int | None = None, warmup: int | None = None, prefetch: int = 2, dtype: str = "fp32",
        shape: str | None = None, store_dir: str | None = None, keep: bool = False) -> dict:
    """Measure, print a table, write <out>/scale.json; the store is removed afterwards unless keep."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = shape or ("tiny" if quick else "cpu")
    size_gb = size_gb if size_gb is not None else 0.02 if quick else 40.0
    cache_gb = cache_gb if cache_gb is not None else 0.004 if quick else 1.0  # << what 300 steps touch: evictions
    steps = steps if steps is not None else 6 if quick else 300
    warmup = warmup if warmup is not None else 1 if quick else 5
    dtype = storage_dtype(dtype)
    ram_cfg = shape_config(shape, "scratch", "cpu")
    k = branching_for(spec_from_config(ram_cfg), dtype, size_gb * GB)
    disk_cfg = shape_config(shape, "scratch", "cpu", branching=k)
    spec = spec_from_config(disk_cfg)
    res: dict = {"suite": "scale", "device": device_name(torch.device("cpu")), "torch": torch.__version__,
                 "shape": shape, "batch": ram_cfg.train.batch_size, "seq": ram_cfg.data.seq_len, "dtype": dtype,
                 "steps": steps, "warmup": warmup, "prefetch": prefetch,
                 "targets": {"peak_rss_anon_gb": "< 8", "ratio": ">= 0.7"}}
    store_path = Path(store_dir) if store_dir else out_dir / "scale-bank"
    if store_path.exists():
        shutil.rmtree(store_path)
    print(f"hiermem bench --suite scale: {store_bytes(spec, dtype, True) / GB:.2f} GB bank + moments on disk "
          f"(branching {k}), cache {cache_gb} GB, {steps} steps", flush=True)
    try:
        with RssSampler(interval=0.01) as rss:
            t0 = time.perf_counter()
            store = fill_store(store_path, spec, dtype, state=True)
            setup = time.perf_counter() - t0
            drop_page_cache(store.files())
            bank = MemoryBank.load(store_path, mmap=True, cache_bytes=int(cache_gb * GB), prefetch=prefetch > 0)
            disk = time_training(build(disk_cfg, bank), disk_cfg, warmup, steps, prefetch)
        allocated = sum(f.stat().st_blocks * 512 for f in store.files())
        disk.update(branching=k, bank_params=bank_param_counts(spec)["bank"], cache_gb=cache_gb,
                    pinned=sorted(bank.cache.pinned), bytes_on_disk=store_bytes(spec, dtype, True),
                    allocated_bytes=allocated, setup_s=setup, peak_rss_anon_gb=rss.peak / GB,
                    vm_hwm_gb=proc_status().get("VmHWM", 0) / GB)
        res["disk"] = disk
        save_json(res, out_dir / "scale.json")
        del bank, store
    finally:
        if not keep:
            shutil.rmtree(store_path, ignore_errors=True)
    ram_spec = spec_from_config(ram_cfg)
    ram = time_training(build(ram_cfg, random_bank(ram_spec, torch.device("cpu"))), ram_cfg, warmup, steps, 0)
    ram.update(branching=ram_spec.branching, bank_params=bank_param_counts(ram_spec)["bank"])
    res["ram"] = ram
    res["ratio"] = disk["tok_per_s"] / ram["tok_per_s"]
    save_json(res, out_dir / "scale.json")
    print_rows([("variant", "bank params", "tok/s", "ms/step", "disk MB/step r/w", "hit rate", "peak RssAnon"),
                ("bank on disk", f"{disk['bank_params']:,}", f"{disk['tok_per_s']:,.0f}", f"{disk['ms_per_step']:.1f}",
                 f"{disk['disk_read_bytes_per_step'] / 1e6:.1f} / {disk['disk_write_bytes_per_step'] / 1e6:.1f}",
                 f"{disk['cache_hit_rate']:.3f}", f"{disk['peak_rss_anon_gb']:.2f} GB"),
                ("bank in RAM", f"{ram['bank_params']:,}", f"{ram['tok_per_s']:,.0f}", f"{ram['ms_per_step']:.1f}",
                 "-", "-", "-")])
    print(f"\non disk / in RAM: {res['ratio']:.3f} (target >= 0.7); peak RssAnon {disk['peak_rss_anon_gb']:.2f} GB "
          f"(target < 8), VmHWM {disk['vm_hwm_gb']:.2f} GB; {disk['bytes_on_disk'] / GB:.2f} GB on disk "
          f"(written in {disk['setup_s']:.0f} s); device: {res['device']}")
    return res


# -- suite fetch ---------------------------------------------------------------------------------------------
FETCH_SHAPES = {"paper-160m": (512, 35, (256, 64, 16)), "tiny": (32, 2, (8, 4, 2))}  # d, layers, ranks


def _path(spec: BankSpec, leaf: int) -> np.ndarray:
    k, depth = spec.branching, spec.depth
    return np.array([[leaf // k ** (depth - 1 - level) for level in range(depth)]], np.int64)


def _raw_read(store: BlockStore, fds: dict, path: np.ndarray) -> float:
    """Seconds to pread the weights of the path's blocks, each into fresh memory, one after the other."""
    t0 = time.perf_counter()
    for key, level, _, _ in store.spec.level_parts():
        i = int(path[0, level])
        lay = store.layouts[key]
        buf = np.empty(lay.weight_bytes, np.uint8)
        n = os.preadv(fds[store.file_of(key, i)], [buf], i * lay.record_bytes)
        assert n == lay.weight_bytes
    return time.perf_counter() - t0


def _fetch_time(dir: Path, path: np.ndarray, verify: str, bank: MemoryBank | None = None) -> float:
    bank = bank or MemoryBank.load(dir, mmap=True, writable=False, verify=verify)
    t0 = time.perf_counter()
    f = fetch(bank, path)
    dt = time.perf_counter() - t0
    assert all(len(p.weights) == 1 for p in f.memory.parts)
    return dt


def run_fetch(out: str = "runs/bench", quick: bool = False, shape: str | None = None, branching: int | None = None,
              trials: int | None = None, dtype: str = "fp32", store_dir: str | None = None,
              keep: bool = False) -> dict:
    """Measure, print a table, write <out>/fetch.json; the store is removed afterwards unless keep."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = shape or ("tiny" if quick else "paper-160m")
    d, layers, ranks = FETCH_SHAPES[shape]
    spec = BankSpec(d=d, n_layers=layers, ranks=ranks, branching=branching or (4 if quick else 8))
    trials = trials or (3 if quick else 8)
    dtype = storage_dtype(dtype)
    store_path = Path(store_dir) if store_dir else out_dir / "fetch-bank"
    if store_path.exists():
        shutil.rmtree(store_path)
    path_bytes = sum(Layout.of(spec, key, dtype, False).weight_bytes for key, *_ in spec.level_parts())
    res: dict = {"suite": "fetch", "device": device_name(torch.device("cpu")), "shape": shape,
                 "spec": spec.to_dict(), "dtype": dtype, "trials": trials, "bytes_per_path": path_bytes,
                 "targets": {"cold_vs_raw": ">= 0.7", "warm_speedup": ">= 5"}}
    print(f"hiermem bench --suite fetch: {shape} blocks, {path_bytes / 1e6:.1f} MB per path, "
          f"{store_bytes(spec, dtype, False) / GB:.2f} GB bank", flush=True)
    try:
        store = fill_store(store_path, spec, dtype, state=False)
        files = store.files()
        fds = {f: os.open(f, os.O_RDONLY) for f in files}
        n_leaves = spec.n_nodes(spec.depth - 1)
        raw, cold, unverified = [], [], []
        for t in range(trials):
            path = _path(spec, (t * 7919) % n_leaves)
            for times, measure in ((raw, lambda: _raw_read(store, fds, path)),
                                   (cold, lambda: _fetch_time(store_path, path, "fetch")),
                                   (unverified, lambda: _fetch_time(store_path, path, "none"))):
                drop_page_cache(files)
                times.append(measure())
        drop_page_cache(files)
        bank = MemoryBank.load(store_path, mmap=True, writable=False)
        k = spec.branching
        first = (int(_path(spec, 0)[0, -1]) // k) * k  # the leaves of one level-(depth-2) subtree
        _fetch_time(store_path, _path(spec, first), "fetch", bank)  # the subtree's first prompt: cold
        warm = [_fetch_time(store_path, _path(spec, first + j), "fetch", bank) for j in range(1, k)]
        for fd in fds.values():
            os.close(fd)
    finally:
        if not keep:
            shutil.rmtree(store_path, ignore_errors=True)
    med = {name: float(np.median(v)) for name, v in (("raw", raw), ("cold", cold), ("cold_unverified", unverified),
                                                      ("warm", warm))}
    res.update(seconds=med, all_seconds={"raw": raw, "cold": cold, "cold_unverified": unverified, "warm": warm},
               cold_vs_raw=med["raw"] / med["cold"], cold_unverified_vs_raw=med["raw"] / med["cold_unverified"],
               warm_speedup=med["cold"] / med["warm"])
    save_json(res, out_dir / "fetch.json")
    rows = [("read of one path", "ms (median)", "GB/s", "vs raw")]
    for name, label in (("raw", "raw pread"), ("cold", "fetch, cold"), ("cold_unverified", "fetch, cold, no crc"),
                        ("warm", "fetch, warm (same subtree)")):
        rows.append((label, f"{1e3 * med[name]:.2f}", f"{path_bytes / med[name] / GB:.2f}",
                     f"{med['raw'] / med[name]:.2f}"))
    print_rows(rows)
    print(f"\ncold / raw speed: {res['cold_vs_raw']:.2f} (target >= 0.7; without checksums "
          f"{res['cold_unverified_vs_raw']:.2f}); warm is {res['warm_speedup']:.1f}x faster than cold (target >= 5); "
          f"device: {res['device']}")
    return res


__all__ = ["fill_store", "run", "run_fetch"]
