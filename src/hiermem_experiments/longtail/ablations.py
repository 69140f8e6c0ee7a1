"""`hiermem demo --ablation NAME`: variants of the demo's memory run, each a table row and a plot line.

Every variant starts from the same place as the demo's memory run (the same corpus, prepared data, tree and
phase-1 anchor; the demo is run first, its finished stages cached) and changes only the memory run's settings
(a dot-list of overrides). Each variant is one job, a one-thread subprocess (two at a time, as in the demo):
train, then evaluate the fetched (knn) model and the same model with its memory off. A variant whose run
directory already holds its config is not retrained; its evaluation is redone only when the run changed.
Variants that change the tree (depth) prepare and cluster a data directory of their own first.

Output: <demo out>/ablations/<NAME>/{report.json, report.txt, accuracy_by_bucket.png, runs/, eval/, logs/}.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from hiermem.config import Config, read_config, save_config, to_dict, with_overrides
from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_write_json, atomic_write_text
from hiermem_experiments.longtail.demo import DemoSpec, default_out, job_configs, load_spec, plot, run_demo
from hiermem_experiments.longtail.jobs import _done, _progress, schedule


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...]  # applied to the demo's memory-run config
    note: str = ""


def _ranks(r: list[int]) -> str:
    return f"memory.ranks=[{','.join(str(x) for x in r)}]"


def _kinds(base: Config) -> list[Variant]:
    """Memory types at (about) the FFN memory's fetched parameters per sequence."""
    from hiermem.memory.spec import equal_fetched_ranks

    out = []
    for kind in ("ffn", "lora_ffn", "lora_qk", "lora_vo", "kv"):
        ranks = equal_fetched_ranks(base, kind)
        out.append(Variant(kind, (f"memory.kind={kind}", _ranks(ranks))))
    return out


def _anchor(base: Config) -> list[Variant]:
    return [Variant("cotrain", ()), Variant("frozen", ("train.mode=frozen",), "phase-1 anchor kept fixed")]


def _ranks_per_level(base: Config) -> list[Variant]:
    """How the fetched rank is split over the two levels (total 64 = the default 32 + 32), and its size."""
    return [Variant(f"r={a}+{b}", (_ranks([a, b]),)) for a, b in ((32, 32), (64, 0), (0, 64), (16, 48), (48, 16),
                                                                   (16, 16), (64, 64))]


def _depth(base: Config) -> list[Variant]:
    """Tree depth at the same fetched rank (64 per sequence); each depth clusters its own copy of the data."""
    splits = {1: [64], 2: [32, 32], 3: [21, 21, 22]}
    return [Variant(f"depth={d}", (f"routing.depth={d}", _ranks(r))) for d, r in splits.items()]


def _generic_prob(base: Config) -> list[Variant]:
    return [Variant(f"p={p}", (f"memory.generic_prob={p}",)) for p in (0.0, 0.0588, 0.25, 0.5)]


def _placement(base: Config) -> list[Variant]:
    """Which layers hold memory, at the same fetched parameters (half the layers, twice the rank)."""
    n = base.model.n_layers
    half = n // 2
    return [Variant(f"layers={a}-{b}", (f"memory.layers=[{a},{b}]", _ranks([r, r])))
            for (a, b), r in (((0, n), 32), ((0, half), 64), ((half, n), 64), ((n // 4, n // 4 + half), 64))]


def _common_text(base: Config) -> list[Variant]:
    """Settings of the memory run that trade held-out text against facts (README: common text must not pay)."""
    return [Variant("default", ()),
            Variant("memory_lr=2.5e-3", ("memory.lr=2.5e-3", "memory.lr_min=2.5e-4")),
            Variant("memory_lr=3e-3", ("memory.lr=3e-3", "memory.lr_min=3e-4")),
            Variant("memory_lr=1e-2", ("memory.lr=1e-2", "memory.lr_min=1e-3")),
            Variant("memory_lr_min=2e-5", ("memory.lr_min=2e-5",)),
            Variant("generic_prob=0", ("memory.generic_prob=0.0",)),
            Variant("weight_decay=0.01", ("memory.weight_decay=0.01",))]


ABLATIONS: dict[str, tuple[Callable[[Config], list[Variant]], str]] = {
    "kind": (_kinds, "memory type at equal fetched parameters"),
    "anchor": (_anchor, "frozen vs co-trained anchor in phase 2"),
    "ranks": (_ranks_per_level, "rank per tree level"),
    "depth": (_depth, "tree depth at equal fetched rank"),
    "generic_prob": (_generic_prob, "probability of the generic block instead of the routed path"),
    "placement": (_placement, "layers holding memory, at equal fetched parameters"),
    "common_text": (_common_text, "memory-run settings against held-out text"),
}


def variant_configs(spec: DemoSpec, out: Path, name: str, tokenizer=None) -> dict[str, Config]:
    """label -> the memory-run config of each variant of ablation `name`. With the demo's tokenizer, the configs
    carry its vocabulary size, as the trained runs' saved configs do (so finished variants are recognised)."""
    if name not in ABLATIONS:
        raise HiermemError(f"demo: unknown ablation {name!r}; choose from {', '.join(ABLATIONS)}")
    base = _memory_config(spec, out, tokenizer)
    folder = out / "ablations" / name
    configs = {}
    for v in ABLATIONS[name][0](base):
        extra = list(v.overrides)
        if any(o.startswith("routing.") for o in extra):  # another tree: a data directory of its own
            extra.append(f"data.dir={folder / 'data' / v.label}")
        same = with_overrides(base, extra, f"ablation {name}, variant {v.label}")
        if to_dict(same) == to_dict(base):  # the demo's own memory run (e.g. ffn at the demo's ranks): reuse it
            configs[v.label] = base
            continue
        run = [f"name=ablation-{name}-{v.label}", f"train.run_dir={folder / 'runs' / v.label}"]
        configs[v.label] = with_overrides(base, [*extra, *run], f"ablation {name}, variant {v.label}")
    return configs


def _memory_config(spec: DemoSpec, out: Path, tokenizer=None) -> Config:
    base = job_configs(spec, out)["memory"]
    if tokenizer is not None:
        from hiermem.data.tokenizer import resolve_vocab

        resolve_vocab(base, tokenizer)
    return base


def _job_main(label: str, folder: str) -> None:
    """One variant, in a one-thread subprocess: (prepare + cluster a data dir of its own), train, evaluate."""
    import torch

    torch.set_num_threads(1)
    folder_path = Path(folder)
    cfg = read_config(folder_path / "configs" / f"{label}.yaml")
    meta = json.loads((folder_path / "ablation.json").read_text())
    out = Path(meta["demo_out"])
    if not (cfg.run_dir / "train_summary.json").is_file():
        if cfg.data_dir != read_config(out / "configs" / "memory.yaml").data_dir:
            from hiermem.data.prepare import prepare
            from hiermem.routing.clustering import ensure_clustered

            ensure_clustered(cfg, prepare(cfg), progress=False)
        from hiermem.train.loop import train

        train(cfg, progress=False)
    from hiermem_experiments.longtail.demo import evaluate_job

    spec = DemoSpec(**{k: v for k, v in json.loads((out / "spec.json").read_text()).items() if k != "corpus"})
    rows = {"fetched_knn": (label, "fetched", "knn"), "memory_off": (label, "none", None)}
    result = evaluate_job(label, {label: cfg}, out, spec, rows=rows)
    result["run_config"] = to_dict(cfg)
    atomic_write_json(folder_path / "eval" / f"{label}.json", result)


def _variant_done(label: str, cfg: Config, folder: Path) -> bool:
    return _done(label, {label: cfg}, folder) and _done(f"eval_{label}", {label: cfg}, folder)


def run_ablation(name: str, preset: str, out: str | None = None, jobs: int = 2, progress: bool = True,
                 spec: DemoSpec | None = None) -> dict:
    """Run the demo (cached), then every variant of ablation `name`; write and print its table."""
    import shutil

    from hiermem.memory.spec import parameter_report

    t0 = time.perf_counter()
    spec = spec or load_spec(preset)
    out_path = Path(out) if out else default_out(preset)
    demo = run_demo(preset, out=str(out_path), jobs=jobs, progress=progress, spec=spec, quiet=True)
    folder = out_path / "ablations" / name
    from hiermem.data.prepare import DataDir

    tok = DataDir(job_configs(spec, out_path)["memory"].data_dir).tokenizer()
    configs = variant_configs(spec, out_path, name, tok)
    overrides = {v.label: v.overrides for v in ABLATIONS[name][0](_memory_config(spec, out_path, tok))}
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "eval").mkdir(parents=True, exist_ok=True)
    for old in (folder / "configs").glob("*.yaml"):
        if old.stem not in configs:
            old.unlink()
    for label, cfg in configs.items():
        save_config(cfg, folder / "configs" / f"{label}.yaml")
    atomic_write_json(folder / "ablation.json", {"name": name, "demo_out": str(out_path.resolve())})
    done = {label for label, cfg in configs.items() if _variant_done(label, cfg, folder)}
    for label, cfg in configs.items():
        if label not in done and cfg.run_dir.exists() and not _done(label, configs, folder):
            shutil.rmtree(cfg.run_dir)  # stale or interrupted: start it again

    def command(label: str) -> str:
        return (f"from hiermem_experiments.longtail.ablations import _job_main; "
                f"_job_main({label!r}, {str(folder)!r})")

    graph = {label: [] for label in configs}
    cost = {label: 1.0 for label in configs}
    wall, cpu = schedule(graph, cost, done, command, lambda n: _progress(n, configs), folder / "logs", jobs,
                         progress, f"ablation {name}")
    variants = {}
    for label, cfg in configs.items():
        res = json.loads((folder / "eval" / f"{label}.json").read_text())["rows"]
        params = parameter_report(cfg)
        variants[label] = {"fetched_knn": res["fetched_knn"], "memory_off": res["memory_off"],
                           "fetched_params": params["fetched"], "bank_params": params["bank"],
                           "overrides": list(overrides[label]),
                           "job_cpu_s": round(cpu.get(label, 0.0), 1)}
    report = {"ablation": name, "title": ABLATIONS[name][1], "buckets": demo["buckets"],
              "bucket_entities": demo["bucket_entities"], "variants": variants,
              "baselines": {k: demo["models"][k] for k in ("anchor", "dense2x") if k in demo["models"]},
              "wall_time_s": round(time.perf_counter() - t0, 1)}
    atomic_write_json(folder / "report.json", report)
    text = format_ablation(report)
    atomic_write_text(folder / "report.txt", text + "\n")
    _plot(report, folder / "accuracy_by_bucket.png")
    print(text)
    print(f"\nwrote {folder / 'report.json'}, {folder / 'report.txt'}, {folder / 'accuracy_by_bucket.png'}")
    return report


def format_ablation(report: dict) -> str:
    b = report["buckets"]
    head = (f"{'variant':<20}" + "".join(f"{x:>7}" for x in b) + f"{'all':>7}{'ppl-wiki':>10}{'off-wiki':>10}"
            f"{'fetched':>10}{'bank':>12}")
    lines = [f"ablation {report['ablation']}: {report['title']} (population exact match % by training mentions;"
             " ppl-wiki = held-out Wikipedia perplexity with the fetched memory, off-wiki = memory off)",
             head, "-" * len(head)]
    for name, m in report["baselines"].items():
        lines.append(f"{name:<20}" + "".join(f"{x:>7.1f}" for x in m["accuracy"]) + f"{m['overall']:>7.1f}"
                     f"{m['perplexity_real_text']:>10.2f}{'-':>10}{'-':>10}{'-':>12}")
    for label, v in report["variants"].items():
        f, off = v["fetched_knn"], v["memory_off"]
        lines.append(f"{label:<20}" + "".join(f"{x:>7.1f}" for x in f["accuracy"]) + f"{f['overall']:>7.1f}"
                     f"{f['perplexity_real_text']:>10.2f}{off['perplexity_real_text']:>10.2f}"
                     f"{v['fetched_params']:>10,}{v['bank_params']:>12,}")
    lines.append(f"wall time {report['wall_time_s']:.0f}s; CPU s per variant (0 = cached): "
                 + ", ".join(f"{k} {v['job_cpu_s']:.0f}" for k, v in report["variants"].items()))
    return "\n".join(lines)


def _plot(report: dict, path: Path) -> None:
    """The demo's accuracy-by-bucket plot with one line per variant (fetched, knn) and the baselines."""
    models = {**{k: m for k, m in report["baselines"].items()},
              **{label: v["fetched_knn"] for label, v in report["variants"].items()}}
    plot({"buckets": report["buckets"], "bucket_entities": report["bucket_entities"], "models": models}, path,
         title=f"hiermem demo --ablation {report['ablation']}: {report['title']}")
