"""The `hiermem` command: prepare, cluster, train, eval, generate, serve, export, lm-eval, params, demo, bench, bank.

Stage commands take `--config PRESET_OR_YAML` plus dot-list overrides (`train.lr=3e-4`); commands on a trained
run (eval, generate) start from the run's saved config and take dot-list overrides of its inference-time fields
(`routing.router=centroid`). `--help` lists the fields with their defaults. Bad input ends with a one-line
`error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hiermem import config as C
from hiermem.errors import HiermemError


def _config(args):
    from hiermem.config import load_config

    return load_config(args.config, args.overrides)


def print_error(e: HiermemError) -> int:
    """A HiermemError on stderr as the command line shows it, and its exit code: one line even when the message
    quotes a path or id holding a line break; a clean stop (train/stop.py) has no "error: " prefix."""
    print(f"{getattr(e, 'prefix', 'error: ')}{C.printable(str(e))}", file=sys.stderr)
    return e.exit_code


def _stage_parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A command that builds its config from a preset and overrides; --help lists every config field."""
    p = sub.add_parser(name, help=help, description=help, epilog=C.fields_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", default="tiny", help="preset name (configs/*.yaml) or a YAML path")
    p.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. train.lr=3e-4 data.corpus=docs.jsonl")
    return p


def _run_parser(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A command on a trained run: its saved config, plus overrides of the inference-time fields only."""
    title = ("overrides: the run's saved config applies; these inference-time fields may change, as key=value "
             "(the others fixed what was trained and are refused):")
    p = sub.add_parser(name, help=help, description=help, epilog=C.fields_help(C.inference_keys(), title),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory")
    p.add_argument("overrides", nargs="*", help="dot-list overrides of the run's config, e.g. routing.knn_k=5")
    p.add_argument("--memory", choices=C.MEMORY_MODES, default=None,
                   help="memory at inference (default: fetched for memory runs, none otherwise)")
    p.add_argument("--router", choices=C.choices("routing.router"), default=None,
                   help="shorthand for routing.router=ROUTER (default: the run's)")
    p.add_argument("--block-level", type=int, default=None,
                   help="forbid the best-matching subtree at this tree level (0 = level 1)")
    p.add_argument("--device", choices=C.choices("train.device"), default=None,
                   help="shorthand for train.device=DEVICE (default: the run's)")
    return p


def _rag_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--rag", type=int, default=0, metavar="K",
                   help=f"put the K nearest training documents (the knn index) before {what}; 0 = off")


def cmd_prepare(args) -> None:
    from hiermem.data.prepare import prepare

    cfg = _config(args)
    data = prepare(cfg, force=args.force)
    m = data.meta
    print(f"prepared {data.path}: {m['n_docs']} documents ({m['n_val']} held out), {m['n_tokens']:,} tokens, "
          f"vocab {m['vocab_size']}")


def cmd_cluster(args) -> None:
    from hiermem.data.prepare import DataDir, prepare
    from hiermem.routing.clustering import cluster, format_report

    cfg = _config(args)
    data = prepare(cfg) if not (cfg.data_dir / "prepare.json").is_file() else DataDir(cfg.data_dir)
    data.check(cfg)
    report = cluster(cfg, data, progress=not args.quiet)
    print(f"tree: depth {cfg.routing.depth}, branching {cfg.routing.branching}, {report['n_docs']} documents")
    print(format_report(report))


def cmd_train(args) -> None:
    from hiermem.train.loop import train

    cfg = _config(args)
    summary = train(cfg, resume=args.resume, progress=not args.quiet)
    p = summary["parameters"]
    acct = f"anchor {p['anchor']:,}"
    if "bank" in p:
        acct += f" / fetched {p['fetched']:,} / bank {p['bank']:,}"
    loss = summary["final_loss"]  # None when there was no step left to run
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 alone reports
        return
    print(f"trained {cfg.run_dir}: {summary['steps']} steps, {summary['tokens_seen']:,} tokens, "
          f"{summary['elapsed_s']:.1f}s, final loss {'-' if loss is None else f'{loss:.4f}'}; parameters: {acct}")


def cmd_eval(args) -> None:
    from hiermem.eval.evaluate import evaluate_run

    result = evaluate_run(args.run, memory=args.memory, router=args.router, block_level=args.block_level,
                          probes=args.probes, max_new_tokens=args.max_new_tokens, device=args.device,
                          progress=not args.quiet, overrides=args.overrides, rag=args.rag)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(result["text"])


def cmd_generate(args) -> None:
    from hiermem.eval.evaluate import generate_text

    texts = generate_text(args.run, args.prompt, memory=args.memory, router=args.router,
                          block_level=args.block_level, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          device=args.device, overrides=args.overrides, rag=args.rag)
    for prompt, text in zip(args.prompt, texts):
        print(prompt + text)


def cmd_export(args) -> None:
    from transformers.utils import logging as hf_logging

    from hiermem.hf.export import EXPORT_DIR, export_run

    hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar for a one-line report
    meta = export_run(args.run, args.out, overrides=args.overrides)
    trust = ", trust_remote_code=True" if meta["trust_remote_code"] else ""
    memory = f"; bank, tree and routing in {args.out}/{EXPORT_DIR}" if meta["memory"] else ""
    print(f"exported {args.run} to {args.out}: {meta['architecture']}, load with "
          f"AutoModelForCausalLM.from_pretrained({args.out!r}{trust}) or hiermem.hf.MemoryModel{memory}")


def cmd_lm_eval(args) -> None:
    from hiermem.hf.lm_eval import format_results, run_lm_eval
    from hiermem.io_utils import atomic_write_text

    tasks = [t for t in args.tasks.split(",") if t]
    results = run_lm_eval(args.run, tasks, memory=args.memory, router=args.router, include_path=args.include_path,
                          limit=args.limit, batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                          device=args.device)
    print(format_results(results))
    if args.output:
        atomic_write_text(args.output, json.dumps(results, indent=2, default=str) + "\n")


def cmd_serve(args) -> None:
    from hiermem.serve.app import serve

    serve(args.run, args.overrides, memory=args.memory, router=args.router, block_level=args.block_level,
          device=args.device, host=args.host, port=args.port, max_batch=args.max_batch,
          max_waiting=args.max_waiting, served_model_name=args.served_model_name, rag=args.rag)


def cmd_params(args) -> None:
    from hiermem.memory.spec import parameter_report

    cfg = _config(args)
    if cfg.model.hf:  # post-hoc memories: the model (and so the bank) has the checkpoint's shape, not the preset's
        from hiermem.model.hf.causal_lm import checkpoint_shape

        cfg.model = checkpoint_shape(cfg.model)[0]
    if cfg.model.vocab_size == 0:
        raise HiermemError("params: set model.vocab_size (it is otherwise taken from the tokenizer)")
    report = parameter_report(cfg)
    for k, v in report.items():
        print(f"{k:>8}: {v:,}")


def cmd_demo(args) -> None:
    import dataclasses

    # the experiment lives outside the library: only this command (and `corpus`) imports it
    from hiermem_experiments.longtail.demo import DEFAULT_PRESET, load_spec, run_demo

    if args.quick and args.preset not in (None, "demo-quick"):
        raise HiermemError(f"demo: --quick means --preset demo-quick, not --preset {args.preset}")
    preset = "demo-quick" if args.quick else args.preset or DEFAULT_PRESET
    spec = dataclasses.replace(load_spec(preset), user_overrides=tuple(args.overrides))
    if args.ablation and args.stage != "all":
        raise HiermemError(f"demo: --stage {args.stage} runs no ablation (give --ablation without --stage)")
    if args.ablation:
        from hiermem_experiments.longtail.ablations import run_ablation

        run_ablation(args.ablation, preset, out=args.out, jobs=args.jobs, progress=not args.quiet, spec=spec)
        return
    run_demo(preset, out=args.out, jobs=args.jobs, progress=not args.quiet, spec=spec, stage=args.stage)


def cmd_corpus(args) -> None:
    from hiermem_experiments.longtail.corpus import LongTailConfig, build_corpus, write_corpus

    cfg = LongTailConfig(seed=args.seed, n_entities=args.entities, n_unseen=args.unseen,
                         n_background=args.background)
    corpus = build_corpus(cfg)
    files = write_corpus(corpus, args.out)
    print(f"wrote {len(corpus.documents)} documents and {len(corpus.probes)} probes to {args.out}: "
          + ", ".join(sorted(p.name for p in files.values())))


def cmd_bench(args) -> None:
    from hiermem.bench import run_suite

    # suite options, passed only when given (a suite that has no such option refuses it in one line)
    options = {k: v for k, v in (("size_mb", args.size_mb), ("encoder", args.encoder)) if v is not None}
    if options and args.suite != "data":
        raise HiermemError(f"bench: --size-mb and --encoder are options of --suite data, not {args.suite}")
    chaos = {k: v for k, v in (("trials", args.trials), ("seed", args.seed)) if v is not None}
    if chaos and args.suite != "chaos":
        raise HiermemError(f"bench: --trials and --seed are options of --suite chaos, not {args.suite}")
    loop = {k: v for k, v in (("stage", args.stage), ("steps", args.steps)) if v is not None}
    if loop and args.suite != "loop":
        raise HiermemError(f"bench: --stage and --steps are options of --suite loop, not {args.suite}")
    run_suite(args.suite, out=args.out, quick=args.quick, **options, **chaos, **loop)


# -- `hiermem bank`: a trained run's bank, block by block (memory/edit.py); the run-level steps live here, the
# one layer that sees the bank, the checkpoint and the router together
def _memory_run(path: str):
    """(run dir, config) of a memory run of format 3, or a one-line refusal."""
    from pathlib import Path

    from hiermem.config import read_config
    from hiermem.train.checkpoint import RUN_FORMAT_VERSION, read_run_format

    run = Path(path)
    if not run.is_dir():
        raise HiermemError(f"{run}: no such run directory")
    version = read_run_format(run)
    if version < RUN_FORMAT_VERSION:
        raise HiermemError(f"{run}: a run of format {version}; editing its bank needs format {RUN_FORMAT_VERSION}")
    cfg = read_config(run / "config.yaml")
    if not cfg.uses_memory:
        raise HiermemError(f"{run}: trained without memory (train.mode={cfg.train.mode}): it has no bank")
    return run, cfg


def _bank_nodes(run, spec, leaf, prompt, level, whole_path, router) -> tuple[list, dict]:
    """The blocks a `bank` command names and how it named them (a leaf, or a prompt routed by the run's router)."""
    from hiermem.memory.edit import path_nodes

    selector = {"leaf": leaf}
    if prompt is not None:
        from hiermem.eval.evaluate import open_run
        from hiermem.eval.inference import MemoryContext

        ctx = MemoryContext(open_run(str(run), router=router, device="cpu"), "fetched")
        path = ctx.route([prompt])[0]
        leaf = int(path[-1])
        selector = {"prompt": prompt, "router": ctx.router_name, "leaf": leaf}
    return path_nodes(spec, leaf, level, whole_path), selector


def bank_reset(run_dir: str, leaf: int | None = None, prompt: str | None = None, level: int | None = None,
               whole_path: bool = False, router: str | None = None) -> dict:
    """Reset the blocks of a run's bank that leaf (or the prompt's leaf) names: a new generation of <run>/bank, the
    checkpoint's step counts and state.json following it, and a line in <run>/edits.jsonl. Returns that line."""
    from hiermem.locking import DirLock

    run, cfg = _memory_run(run_dir)
    with DirLock(run, "bank reset"):  # never while `hiermem train` writes the run (or another edit)
        return _bank_reset(run, cfg, leaf, prompt, level, whole_path, router)


def _bank_reset(run, cfg, leaf, prompt, level, whole_path, router) -> dict:
    from hiermem.integrity import entry_of, write_sealed_json
    from hiermem.memory.bank import MemoryBank
    from hiermem.memory.edit import append_edit, block_summary, reset_blocks
    from hiermem.memory.store import open_store
    from hiermem.train.checkpoint import STATE_JSON, load_state
    from hiermem.train.step import bank_optimizer

    m, seed, ckpt = cfg.memory, cfg.train.seed, run / "checkpoint"
    state = load_state(ckpt)
    if open_store(run / "bank").generation < state["generation"]:  # a crash before the last publish: finish it
        open_store(run / "bank", state["generation"], writable=True).publish()
    bank = MemoryBank.load(run / "bank", mmap=m.mmap, generation=state["generation"], cache_bytes=m.cache_bytes)
    nodes, selector = _bank_nodes(run, bank.spec, leaf, prompt, level, whole_path, router)
    opt = bank_optimizer(bank, cfg)
    old_steps = state["files"].get("bank_optimizer")
    if old_steps:
        opt.load(ckpt / old_steps)
    before = [block_summary(bank, k, i, seed) for k, i in nodes]
    reset_blocks(bank, nodes, seed, opt)
    g = bank.commit()  # the reset blocks only, into their spare slots: generation `state` stays intact
    files = dict(state["files"], bank_optimizer=f"bank-adam-{g:06d}.npz")
    opt.save(ckpt / files["bank_optimizer"])
    checksums = {**(state.get("checksums") or {}), "bank_optimizer": entry_of(ckpt / files["bank_optimizer"])}
    write_sealed_json(ckpt / STATE_JSON, {**state, "generation": g, "files": files, "checksums": checksums})  # commit
    bank.publish()
    if old_steps and old_steps != files["bank_optimizer"]:
        (ckpt / old_steps).unlink(missing_ok=True)
    return append_edit(run, {"action": "reset", **selector, "level": level, "path": whole_path, "generation": g,
                             "blocks": [{"part": b["part"], "node": b["node"], "norm_before": b["norm"]}
                                        for b in before]})


def bank_show(run_dir: str, leaf: int | None = None, prompt: str | None = None, level: int | None = None,
              router: str | None = None) -> dict:
    """The blocks on the leaf's path (or the node at `level`): weight norm, distance from the initial values, and
    how many training documents route there (None when the run's data directory cannot say)."""
    import numpy as np

    from hiermem.data.prepare import DataDir
    from hiermem.memory.bank import MemoryBank
    from hiermem.memory.edit import block_summary
    from hiermem.routing.clustering import load_clustering
    from hiermem.routing.tree import Tree
    from hiermem.train.checkpoint import load_state

    run, cfg = _memory_run(run_dir)
    state = load_state(run / "checkpoint")
    bank = MemoryBank.load(run / "bank", mmap=True, generation=state["generation"], writable=False)
    nodes, selector = _bank_nodes(run, bank.spec, leaf, prompt, level, level is None, router)
    paths, note = None, None
    try:
        data = DataDir(cfg.data_dir)
        c = load_clustering(data, cfg, required=True)
        if c.tree.fingerprint() != Tree.load(run / "tree.npz").fingerprint():
            raise HiermemError(f"{data.path}/cluster: tree differs from the run's tree.npz")
        paths = np.asarray(c.doc_paths)[~data.is_val()]
    except HiermemError as e:
        note = str(e)
    blocks = [{**block_summary(bank, k, i, cfg.train.seed),
               "train_docs": None if paths is None else int((paths[:, int(k[5:])] == i).sum())} for k, i in nodes]
    return {"run": str(run), "generation": state["generation"], **selector, "blocks": blocks, "note": note}


def cmd_verify(args) -> int:
    from hiermem.verify import format_report, verify

    report = verify(args.path)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return 1 if report.problems else 0


def cmd_bank(args) -> None:
    if args.bank_command == "reset":
        entry = bank_reset(args.run, args.leaf, args.prompt, args.level, args.path, args.router)
        names = ", ".join(f"{b['part']} node {b['node']}" for b in entry["blocks"])
        print(f"reset {names} of {args.run} (leaf {entry['leaf']}); bank generation {entry['generation']}, "
              f"logged in {args.run}/edits.jsonl")
        return
    report = bank_show(args.run, args.leaf, args.prompt, args.level, args.router)
    print(f"{report['run']}: bank generation {report['generation']}, leaf {report['leaf']}"
          + (f" (routed by {report['router']})" if "router" in report else ""))
    print(f"{'part':<8}{'node':>7}{'norm':>12}{'from init':>12}{'train docs':>12}")
    for b in report["blocks"]:
        docs = "-" if b["train_docs"] is None else b["train_docs"]
        print(f"{b['part']:<8}{b['node']:>7}{b['norm']:>12.4f}{b['from_init']:>12.4f}{docs:>12}")
    if report["note"]:
        print(f"(training documents unknown: {report['note']})")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hiermem", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = _stage_parser(sub, "prepare", "read documents, train/load the tokenizer, tokenize, split")
    p.add_argument("--force", action="store_true", help="rebuild even if the data directory exists")
    p.set_defaults(func=cmd_prepare)

    p = _stage_parser(sub, "cluster", "embed documents, build the hierarchical k-means tree, route documents")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_cluster)

    p = _stage_parser(sub, "train", "train the anchor alone or with hierarchical memories")
    p.add_argument("--resume", action="store_true", help="continue from <run>/checkpoint exactly")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = _run_parser(sub, "eval", "held-out perplexity (and knowledge probes) of a run directory")
    p.add_argument("--probes", default=None, help="JSONL of {prompt, answer, optional group/frequency}")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--quiet", action="store_true")
    _rag_flag(p, "each probe prompt (perplexity stays without RAG)")
    p.set_defaults(func=cmd_eval)

    p = _run_parser(sub, "generate", "generate text from a run directory")
    p.add_argument("--prompt", "-p", action="append", required=True, help="prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    _rag_flag(p, "each prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a run's anchor as a transformers model (+ tokenizer, bank, tree)",
                       epilog=C.fields_help(C.inference_keys(), "overrides: the run's saved config applies; these "
                                            "inference-time fields may change, as key=value:"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory")
    p.add_argument("out", help="new output folder")
    p.add_argument("overrides", nargs="*",
                   help="dot-list overrides of the run's inference-time fields, e.g. data.dir=...")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("lm-eval", help="lm-eval-harness tasks on a run (or an export), each request routed by "
                       "its context")
    p.add_argument("run", help="run directory or `hiermem export` folder")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--memory", choices=C.MEMORY_MODES, default=None,
                   help="memory at inference (default: fetched for memory runs, none otherwise)")
    p.add_argument("--router", choices=C.choices("routing.router"), default=None, help="default: the run's")
    p.add_argument("--include_path", default=None, help="folder of extra task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="examples per task (< 1: a fraction)")
    p.add_argument("--batch_size", type=int, default=8, help="requests per forward pass")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--device", choices=C.choices("train.device"), default=None, help="default: the run's")
    p.add_argument("--output", default=None, help="also write lm-eval's results as JSON here")
    p.set_defaults(func=cmd_lm_eval)

    p = _run_parser(sub, "serve", "an OpenAI-compatible server (/v1/completions, /v1/chat/completions, /metrics) "
                    "with the memory explorer at /; --memory/--router/--block-level/--rag are the requests' defaults")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="sequences queued beyond the batch before requests get 429 (default 64)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: RUN as given)")
    _rag_flag(p, "each prompt, unless a request sets `rag`")
    p.set_defaults(func=cmd_serve)

    p = _stage_parser(sub, "params", "parameter accounting (anchor / fetched / bank) without allocating")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("demo", help="the long-tail knowledge demo: anchor vs memories, fact by fact")
    p.add_argument("--quick", action="store_true", help="a small version (< 3 minutes); = --preset demo-quick")
    p.add_argument("--preset", default=None,
                   help="demo preset name or YAML path (hiermem_experiments/longtail/presets): demo-cpu, the "
                        "default (2 epochs, about 6-7 minutes on 2 cores); demo-full (3 epochs + the anchor_staged "
                        "control); demo-quick; demo-gpu / demo-160m: shapes for one GPU")
    p.add_argument("--out", default=None, help="output folder (default runs/demo, else runs/<preset>)")
    p.add_argument("--ablation", default=None, metavar="NAME",
                   choices=("kind", "anchor", "ranks", "depth", "generic_prob", "placement", "common_text"),
                   help="after the demo, train and compare variants of its memory run: kind (memory type at equal "
                        "fetched parameters), anchor (frozen vs co-trained), ranks (rank per level), depth, "
                        "generic_prob, placement (layers holding memory), common_text (settings against held-out "
                        "text); output in <out>/ablations/NAME")
    p.add_argument("--jobs", type=int, default=2, help="parallel training processes")
    p.add_argument("--stage", default="all", choices=("all", "data", "train"),
                   help="all (default); data: build, prepare and cluster the corpus, then stop; train: the "
                        "trainings alone on a clustered --out (no encoder, no evaluation; e.g. on a GPU machine "
                        "given the folder that --stage data made), reported in <out>/train_report.json")
    p.add_argument("overrides", nargs="*", help="dot-list overrides for every run, e.g. routing.encoder=wordllama")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("corpus", help="write the long-tail knowledge corpus (real facts + Wikipedia leads) as JSONL")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--entities", type=int, default=2000, help="cities seen in training")
    p.add_argument("--unseen", type=int, default=250, help="cities never seen (guessing control)")
    p.add_argument("--background", type=int, default=1500, help="Wikipedia leads as background text")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_corpus)

    from hiermem.bench import SUITES
    from hiermem.bench.train_loop import STAGES as LOOP_STAGES

    p = sub.add_parser("bench", help="benchmark suites (train: the trainer's step, anchor vs memory; "
                       "loop: `hiermem train` itself; data: prepare/cluster at 1x/2x/4x corpus; ...), JSON + table")
    p.add_argument("--suite", default="train", choices=sorted(SUITES))
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--size-mb", type=float, default=None, help="data: MB of text of the 1x corpus (2x, 4x follow)")
    p.add_argument("--encoder", choices=C.choices("routing.encoder"), default=None,
                   help="data: the encoder cluster runs (default wordllama)")
    p.add_argument("--trials", type=int, default=None, help="chaos: killed runs per mode (default 6; --quick 2)")
    p.add_argument("--seed", type=int, default=None, help="chaos: seed of the kill times and crash points")
    p.add_argument("--stage", choices=LOOP_STAGES, default=None,
                   help="loop: data (corpus, prepare, cluster, pack: where the encoder is), train (the trainings, "
                        "on the GPU machine given that data) or all (default)")
    p.add_argument("--steps", type=int, default=None, help="loop: steps per training (default 60; --quick 12)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bank", help="inspect or edit a trained run's memory bank, block by block")
    bank_sub = p.add_subparsers(dest="bank_command", required=True)
    for name, help in (("show", "weight norm, distance from init and training documents of the blocks on a "
                        "leaf's path (or at --level)"),
                       ("reset", "reset a leaf's block (or --level L's node, or --path: every block on its path) "
                        "to its initial values, with fresh optimizer state; logged in <run>/edits.jsonl")):
        q = bank_sub.add_parser(name, help=help, description=help)
        q.add_argument("run", help="run directory")
        which = q.add_mutually_exclusive_group(required=True)
        which.add_argument("--leaf", type=int, help="leaf id (0 .. branching**depth - 1)")
        which.add_argument("--prompt", help="route this text with the run's router and take the leaf it reaches")
        q.add_argument("--level", type=int, default=None, help="the path's node at this tree level (0 = level 1)")
        if name == "reset":
            q.add_argument("--path", action="store_true", help="every block on the path")
        q.add_argument("--router", choices=C.choices("routing.router"), default=None,
                       help="router for --prompt (default: the run's)")
        q.set_defaults(func=cmd_bank)

    p = sub.add_parser("verify", help="check every file of a run or data directory in full (exit 1 on damage); "
                       "for a run, print the digest of its final weights")
    p.add_argument("path", help="run directory or data directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_verify)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    # overrides may come before or after options (`train --quiet train.lr=1e-3`): collect the leftovers
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {C.printable(' '.join(unknown))}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        code = args.func(args)  # hiermem verify returns 1 when it found damage; the others return nothing
    except HiermemError as e:
        return print_error(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
