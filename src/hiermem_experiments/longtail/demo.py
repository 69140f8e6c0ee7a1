"""`hiermem demo`: the long-tail knowledge demo (docs/method.md §7.7, the paper's Figure 1 at CPU scale).

Every model sees the same documents for the same number of epochs:
  anchor         the anchor alone, one cosine schedule over all epochs (the strong baseline)
  anchor_staged  (with staged_control) the anchor alone with the memory run's schedule: phase 1, then phase 2
  memory run     phase 1 (shared with anchor_staged), then anchor + hierarchical memory co-trained (phase 2);
                 evaluated as fetched_{centroid,knn,oracle}, generic (the generic block), memory_off
  dense2x        a dense model with about twice the anchor's parameters, one cosine schedule
Probes: "<city> has a population of about" -> the population as written in training (exact match, greedy),
by how often the city was mentioned in training; the country probe is reported next to its leaf prior.

The set-up follows the prototype of docs/method.md §9. Presets are YAML files in ``presets/`` (demo-cpu, the
default; demo-full; demo-quick; demo-gpu; demo-160m), or any YAML path: the DemoSpec fields plus a ``corpus:`` mapping of
LongTailConfig fields; a key left out keeps the dataclass default. Stages are cached in the output folder;
independent trainings run in parallel processes (one thread each, see ``jobs.py``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from hiermem.config import Config, load_config, preset_path, read_yaml_mapping
from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_write_json, atomic_write_text
from hiermem_experiments.longtail.buckets import accuracy_by_bucket, leaf_prior
from hiermem_experiments.longtail.corpus import LongTailConfig, build_corpus, load_corpus, write_corpus
from hiermem_experiments.longtail.jobs import evals, run_jobs, trainings
from hiermem_experiments.longtail.rag_rows import evaluate_rag_rows, report_rows

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "demo-cpu"


@dataclass
class DemoSpec:
    corpus: LongTailConfig = field(default_factory=LongTailConfig)
    preset: str = "small"
    overrides: tuple[str, ...] = ()  # the preset's, applied before each job's own settings
    user_overrides: tuple[str, ...] = ()  # `hiermem demo ... key=value`: applied last, so they win
    epochs: int = 2  # every model sees every document this many times (whole epochs: equal exposure)
    phase1_epochs: int = 1  # the memory run (and anchor_staged): phase 1 anchor only, then phase 2
    lr: float = 2e-3  # anchor peak LR (one cosine) and phase 1
    phase2_schedule: str = "continue"  # continue: phases 1 and 2 follow the anchor's single cosine (train.lr_span);
    #                                    restart: phase 1 decays fully, phase 2 restarts at phase2_lr
    phase2_lr: float = 2e-3  # with restart only: anchor LR in phase 2 (both runs), the cosine's new peak
    memory_lr: float = 2e-3
    memory_lr_min: float = 2e-4
    dense: tuple[str, ...] = ("model.d_model=192", "model.n_heads=6", "model.d_ff=512")
    knn_k: int = 10
    max_new_tokens: int = 10
    staged_control: bool = False  # also train anchor_staged (the memory run's schedule, no memory): phase 2 again


def load_spec(preset: str = DEFAULT_PRESET) -> DemoSpec:
    """The DemoSpec of a preset name or YAML path; errors are one line naming the file and the key."""
    path = preset_path(preset, PRESET_DIR, "demo")
    loaded = read_yaml_mapping(path)
    if "user_overrides" in loaded:
        raise HiermemError(f"{path}: key 'user_overrides' is not a preset key (give overrides after "
                           "`hiermem demo`; use 'overrides' in a preset)")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DemoSpec), loaded))
    except ConfigKeyError as e:
        raise HiermemError(f"{path}: unknown key {e.full_key!r}") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise HiermemError(f"{path}: {key + ': ' if key else ''}{str(e).splitlines()[0]}") from None


def default_out(preset: str) -> Path:
    """runs/demo for the default preset, else runs/<preset name or YAML file stem>."""
    return Path("runs/demo") if preset == DEFAULT_PRESET else Path("runs") / Path(preset).stem


# --------------------------------------------------------------------------------------------- configs
def _base(spec: DemoSpec, out: Path) -> list[str]:
    return [f"data.corpus={out / 'corpus' / 'corpus.jsonl'}", f"data.dir={out / 'data'}", "data.val_fraction=0.0",
            f"routing.knn_k={spec.knn_k}", "train.threads=1", "train.log_every=20", *spec.overrides]


def job_configs(spec: DemoSpec, out: Path) -> dict[str, Config]:
    base = _base(spec, out)
    runs = out / "runs"
    phase2 = spec.epochs - spec.phase1_epochs

    def cfg(name: str, *extra: str) -> Config:
        return load_config(spec.preset, [*base, f"name={name}", f"train.run_dir={runs / name}", *extra,
                                          *spec.user_overrides])

    lr = f"train.lr={spec.lr}"
    if spec.phase2_schedule == "continue":  # one cosine over both phases, cut where phase 1 ends
        cut = spec.phase1_epochs / spec.epochs
        p1 = [lr, f"train.lr_span=[0.0,{cut}]"]
        p2 = [f"train.epochs={phase2}", lr, f"train.lr_span=[{cut},1.0]", f"train.init_from={runs / 'phase1'}",
              "train.init_optimizer=true"]  # and Adam's moments: phase 2 picks up where phase 1 stopped
    elif spec.phase2_schedule == "restart":
        p1 = [lr]
        p2 = [f"train.epochs={phase2}", f"train.lr={spec.phase2_lr}", f"train.lr_min={spec.phase2_lr / 10}",
              "train.warmup_steps=0", f"train.init_from={runs / 'phase1'}"]
    else:
        raise HiermemError(f"demo: phase2_schedule must be continue or restart, got {spec.phase2_schedule!r}")
    configs = {
        "anchor": cfg("anchor", f"train.epochs={spec.epochs}", lr),
        "phase1": cfg("phase1", f"train.epochs={spec.phase1_epochs}", *p1),
        "anchor_staged": cfg("anchor_staged", *p2),
        "memory": cfg("memory", *p2, "train.mode=cotrain", f"memory.lr={spec.memory_lr}",
                      f"memory.lr_min={spec.memory_lr_min}"),
        "dense2x": cfg("dense2x", f"train.epochs={spec.epochs}", lr, *spec.dense),
    }
    if not spec.staged_control:
        del configs["anchor_staged"]
    return configs


# --------------------------------------------------------------------------------------------- evaluation
def _entity_leaves(out: Path, corpus, clustering) -> dict[str, int]:
    """Each seen entity's main leaf: the most common leaf among its training documents (the oracle)."""
    from hiermem.data.prepare import DataDir

    ids = DataDir(out / "data").ids()
    entity_of = {d["id"]: d.get("entity") for d in corpus.documents}
    votes: dict[str, Counter] = {}
    for i, doc_id in enumerate(ids):
        e = entity_of.get(doc_id)
        if e:
            votes.setdefault(e, Counter())[int(clustering.doc_paths[i, -1])] += 1
    return {e: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for e, c in votes.items()}


ROWS = {  # report row -> (trained run, memory at inference, router)
    "anchor": ("anchor", "none", None), "anchor_staged": ("anchor_staged", "none", None),
    "dense2x": ("dense2x", "none", None), "memory_off": ("memory", "none", None),
    "generic": ("memory", "generic", None), "fetched_centroid": ("memory", "fetched", "centroid"),
    "fetched_knn": ("memory", "fetched", "knn"), "fetched_oracle": ("memory", "fetched", "oracle"),
}
COUNTRY_ROWS = ("anchor", "dense2x", "fetched_knn", "fetched_oracle")


def _probe_sets(corpus) -> dict[str, list[dict]]:
    sets = {f: [dict(p, _idx=i) for i, p in enumerate(q for q in corpus.probes if q["fact"] == f)]
            for f in ("population", "country")}
    # the country probe of city i is routed like its population probe: both prompts name only the city
    assert [p["entity"] for p in sets["population"]] == [p["entity"] for p in sets["country"]]
    return sets


def _routers(run) -> dict:
    """The run's two routers, built once (the knn one holds a faiss index over the training documents)."""
    from hiermem.eval.inference import MemoryContext

    return {r: MemoryContext(run, "fetched", r) for r in ("knn", "centroid")}


def _route_all(routers: dict, texts: list[str]) -> dict[str, np.ndarray]:
    """Paths of `texts` under each router, from one embedding (both routers share the run's encoder)."""
    emb = routers["knn"].embedder.encode(texts)
    return {r: ctx.router.route(emb) for r, ctx in routers.items()}


def _routing(run, routers: dict, out: Path, corpus, probes: list[dict]) -> tuple[dict, dict, dict]:
    """Paths of every population probe under each router (+ the oracle leaf), and routing agreement."""
    from hiermem.routing.tree import paths_from_leaves

    leaves = _entity_leaves(out, corpus, run.clustering())
    paths = _route_all(routers, [p["prompt"] for p in probes])
    oracle_leaf = np.array([leaves.get(p["entity"], -1) for p in probes])
    seen = oracle_leaf >= 0
    paths["oracle"] = paths["knn"].copy()  # unseen cities have no leaf of their own: they keep the knn path
    paths["oracle"][seen] = paths_from_leaves(oracle_leaf[seen], run.tree.depth, run.tree.branching)
    agreement = {r: {"leaf": float((paths[r][seen, -1] == oracle_leaf[seen]).mean() * 100),
                     "per_level": [float((paths[r][seen, l] == paths["oracle"][seen, l]).mean() * 100)
                                   for l in range(run.tree.depth)]} for r in ("centroid", "knn")}
    return paths, agreement, leaves


def evaluate_job(run_name: str, configs: dict[str, Config], out: Path, spec: DemoSpec,
                 rows: dict[str, tuple] | None = None) -> dict:
    """Every report row of one trained run (rows: row -> (run, memory mode, router), default ROWS): probes by
    bucket and held-out perplexity (+ routing for memory runs)."""
    from hiermem.eval.evaluate import probe_predictor, routed_perplexity
    from hiermem.eval.inference import MemoryContext
    from hiermem.eval.run import Run

    corpus = load_corpus(out / "corpus")
    probes = _probe_sets(corpus)
    run = Run(configs[run_name].run_dir, device=configs[run_name].train.device)
    heldout = {k: [d["text"] for d in corpus.heldout if d["kind"] == k] for k in ("background", "fact")}
    result: dict = {"rows": {}}
    paths = heldout_paths = None
    if run.bank is not None:
        routers = _routers(run)
        paths, result["routing_agreement"], leaves = _routing(run, routers, out, corpus, probes["population"])
        by_kind = {k: _route_all(routers, t) for k, t in heldout.items()}
        heldout_paths = {r: {k: by_kind[k][r] for k in heldout} for r in routers}
        heldout_paths["oracle"] = heldout_paths["knn"]  # held-out documents are routed, not given a leaf
        answers = {e["name"]: e["country"] for e in corpus.entities if e["mentions"] > 0}
        result["country_leaf_prior"] = {}
        for r in ("knn", "centroid", "oracle"):
            ok = leaf_prior(paths[r][:, -1], [p["answer"] for p in probes["country"]],
                            [p["entity"] for p in probes["country"]], leaves, answers)
            groups = np.array([p["group"] for p in probes["country"]])
            result["country_leaf_prior"][r] = [float(ok[groups == b].mean() * 100) if (groups == b).any() else 0.0
                                               for b in corpus.buckets]
    for row, (name, mode, router) in (rows or ROWS).items():
        if name != run_name:
            continue
        ctx = MemoryContext(run, mode, router if router in ("knn", "centroid") else "knn")
        table = paths[router] if mode == "fetched" else None
        paths_for = (lambda recs, t=table: t[[r["_idx"] for r in recs]]) if table is not None else None
        predict = probe_predictor(run, ctx, spec.max_new_tokens, paths_for=paths_for)
        rec: dict = {}
        for fact in ("population", "country") if row in COUNTRY_ROWS else ("population",):
            prefix = "" if fact == "population" else "country_"
            rec[prefix + "accuracy"], rec[prefix + "overall"] = accuracy_by_bucket(probes[fact], predict,
                                                                                   corpus.buckets)
        for kind, key in (("background", "perplexity_real_text"), ("fact", "perplexity_facts")):
            texts = heldout[kind]
            docs = [np.asarray(run.tokenizer.encode(t)) for t in texts]
            hp = heldout_paths[router][kind] if mode == "fetched" else None
            rec[key] = routed_perplexity(run, ctx, docs, texts, paths=hp)["ppl"]
        result["rows"][row] = rec
    if rows is None:  # the default report also has the RAG rows (rag_rows.py)
        result["rows"].update(evaluate_rag_rows(run_name, run, probes["population"], corpus.buckets,
                                                paths["knn"] if paths else None, spec.max_new_tokens))
    return result


# --------------------------------------------------------------------------------------------- report
def plot(report: dict, path: Path,
         title: str = "Long-tail facts: anchor vs hierarchical memory (hiermem demo)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = [f"{b}\n({n} cities)" for b, n in zip(report["buckets"], report["bucket_entities"])]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    styles = {"fetched_knn": ("-o", 2.5), "fetched_oracle": (":o", 1.5), "fetched_centroid": ("--o", 1.5),
              "anchor": ("-s", 2.0), "anchor_staged": ("--s", 1.2), "dense2x": ("-^", 2.0),
              "generic": ("-.x", 1.2), "memory_off": (":x", 1.2)}
    for name, m in report["models"].items():
        style, width = styles.get(name, ("-", 1.0))
        ax.plot(buckets, m["accuracy"], style, lw=width, label=name)
    ax.set_xlabel("training mentions of the city (bucket)")
    ax.set_ylabel("population exact match (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    from hiermem.io_utils import atomic_write_with

    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def format_report(report: dict) -> str:
    b = report["buckets"]
    head = f"{'model':<18}" + "".join(f"{x:>8}" for x in b) + f"{'all':>8}{'ppl-wiki':>10}{'ppl-facts':>10}"
    lines = ["city -> population, exact match % by training mentions (rarest first)", head, "-" * len(head)]
    for name, m in report["models"].items():
        lines.append(f"{name:<18}" + "".join(f"{x:>8.1f}" for x in m["accuracy"]) + f"{m['overall']:>8.1f}"
                     + "".join("-".rjust(10) if m[k] is None else f"{m[k]:>10.2f}"  # None: RAG rows
                               for k in ("perplexity_real_text", "perplexity_facts")))
    lines += ["", "city -> country (the leaf can give this away; leaf prior = most common country in the leaf)"]
    for name in COUNTRY_ROWS:
        m = report["models"][name]
        lines.append(f"{name:<18}" + "".join(f"{x:>8.1f}" for x in m["country_accuracy"]))
    for r, acc in report["country_leaf_prior"].items():
        lines.append(f"{'leaf prior/' + r:<18}" + "".join(f"{x:>8.1f}" for x in acc))
    a = report["routing_agreement"]
    lines += ["", "routing agreement (population prompt -> the city's main leaf, seen cities): "
              + ", ".join(f"{r} {v['leaf']:.1f}%" for r, v in a.items())]
    p = report["parameters"]
    lines.append(f"parameters: anchor {p['anchor']:,}, fetched {p['fetched']:,} per sequence, bank {p['bank']:,}, "
                 f"dense2x {p['dense2x']:,}")
    lines.append(f"wall time {report['wall_time_s']:.0f}s; per job (s, 0 = cached): "
                 + ", ".join(f"{k} {v:.0f}" for k, v in report["job_wall_s"].items()))
    if "job_cpu_s" in report:  # reports written before CPU accounting lack it
        lines.append(f"CPU time {sum(report['job_cpu_s'].values()):.0f}s; per job (s): "
                     + ", ".join(f"{k} {v:.0f}" for k, v in report["job_cpu_s"].items()))
    return "\n".join(lines)


STAGES = ("all", "data", "train")  # data: corpus, prepare, cluster (the encoder); train: the trainings alone


def training_report(configs: dict[str, Config], names, out: Path, wall: dict[str, float], quiet: bool) -> dict:
    """--stage train: each training's steps, tokens, time and last loss (train_summary.json), its wall time as a
    job (0 when cached) and the device it ran on, into <out>/train_report.json (printed unless quiet)."""
    import torch

    from hiermem.bench.table import print_rows

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    runs = {}
    for name in names:
        s = json.loads((configs[name].run_dir / "train_summary.json").read_text())
        runs[name] = {"steps": s["steps"], "tokens_seen": s["tokens_seen"], "elapsed_s": s["elapsed_s"],
                      "tok_per_s": s["tokens_seen"] / max(1e-9, s["elapsed_s"]), "final_loss": s["final_loss"],
                      "job_wall_s": round(wall.get(name, 0.0), 1)}
    report = {"stage": "train", "device": device, "torch": torch.__version__, "runs": runs,
              "total_job_wall_s": round(sum(wall.values()), 1)}
    atomic_write_json(out / "train_report.json", report)
    if not quiet:
        rows = [("training", "steps", "tokens", "train s", "tok/s", "job wall s", "last loss")]
        rows += [(n, str(r["steps"]), f"{r['tokens_seen']:,}", f"{r['elapsed_s']:.1f}", f"{r['tok_per_s']:,.0f}",
                  f"{r['job_wall_s']:.1f}", f"{r['final_loss']:.3f}") for n, r in runs.items()]
        print_rows(rows)
        print(f"\n{device}; wall time of the jobs {report['total_job_wall_s']:.0f} s (0 = cached); wrote "
              f"{out / 'train_report.json'}")
    return report


def run_demo(preset: str = DEFAULT_PRESET, out: str | None = None, jobs: int = 2, progress: bool = True,
             spec: DemoSpec | None = None, quiet: bool = False, stage: str = "all") -> dict:
    """Build (or reuse) the corpus, run every job of `spec` (default: the preset's) and write the report
    (printed unless quiet). stage=data stops once the data is clustered; stage=train then runs the trainings
    alone (no encoder, no evaluation: for a GPU machine given the clustered output folder) and reports them."""
    if stage not in STAGES:
        raise HiermemError(f"demo: --stage must be one of {', '.join(STAGES)}, got {stage!r}")
    from hiermem.data.prepare import prepare
    from hiermem.data.tokenizer import resolve_vocab
    from hiermem.memory.spec import parameter_report

    t0 = time.perf_counter()
    spec = spec or load_spec(preset)
    quick = Path(preset).stem == "demo-quick"
    out = Path(out) if out else default_out(preset)
    corpus_dir = out / "corpus"
    if (corpus_dir / "entities.json").is_file() and load_corpus(corpus_dir).config == spec.corpus:
        corpus = load_corpus(corpus_dir)
    else:
        corpus = build_corpus(spec.corpus)
        write_corpus(corpus, corpus_dir)
    configs = job_configs(spec, out)
    tok = prepare(configs["anchor"]).tokenizer()
    for cfg in configs.values():  # resolve model.vocab_size now, so cached runs compare equal to their configs
        resolve_vocab(cfg, tok)
    only = {"data": {"cluster"}, "train": set(trainings(spec))}.get(stage)
    wall, cpu = run_jobs(configs, out, spec, jobs, progress, only=only)
    if stage == "data":
        if not quiet:
            print(f"{out / 'data'}: prepared and clustered; train with --stage train --out {out}")
        return {"stage": "data", "data_dir": str(out / "data")}
    if stage == "train":
        return training_report(configs, trainings(spec), out, wall, quiet)
    if not any(wall.values()) and (out / "report.json").is_file():  # nothing ran: the report stands as it is
        report = json.loads((out / "report.json").read_text())
        if not quiet:
            print((out / "report.txt").read_text().rstrip())
        return report
    results = {n: json.loads((out / "eval" / f"{n}.json").read_text()) for n in evals(spec).values()}
    models = {row: results[run]["rows"][row] for row, (run, _, _) in ROWS.items() if run in results}
    models.update(report_rows(results))
    summaries = {n: json.loads((c.run_dir / "train_summary.json").read_text()) for n, c in configs.items()}
    params = parameter_report(configs["memory"])
    params["dense2x"] = parameter_report(configs["dense2x"])["anchor"]
    counts = Counter(e["bucket"] for e in corpus.entities if e["kind"] == "city")
    report = {
        "buckets": corpus.buckets, "bucket_entities": [counts[b] for b in corpus.buckets],
        "models": models, "routing_agreement": results["memory"]["routing_agreement"],
        "country_leaf_prior": results["memory"]["country_leaf_prior"], "parameters": params,
        "tokens": {n: s["tokens_seen"] for n, s in summaries.items()},
        "train_time_s": {n: s["elapsed_s"] for n, s in summaries.items()},
        "job_wall_s": {n: round(v, 1) for n, v in wall.items()},
        "job_cpu_s": {n: round(v, 1) for n, v in cpu.items()},
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "spec": json.loads(json.dumps(dataclasses.asdict(spec), default=list)), "quick": quick,
        "notes": ["staged models: tokens = phase1 + phase2 (phase1 is shared by anchor_staged and the memory run)",
                  "cached stages are not retrained; job_wall_s is 0 for them"],
    }
    for staged in ("anchor_staged", "memory"):
        if staged in report["tokens"]:
            report["tokens"][staged] += report["tokens"]["phase1"]
    atomic_write_json(out / "report.json", report)
    plot(report, out / "accuracy_by_bucket.png")
    text = format_report(report)
    atomic_write_text(out / "report.txt", text + "\n")
    if not quiet:
        print(text)
        print(f"\nwrote {out / 'report.json'}, {out / 'report.txt'}, {out / 'accuracy_by_bucket.png'}")
    return report
