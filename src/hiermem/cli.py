"""The `hiermem` command: prepare, cluster, train, eval, generate, serve, export, lm-eval, params, demo, bench.

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
                          progress=not args.quiet, overrides=args.overrides)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(result["text"])


def cmd_generate(args) -> None:
    from hiermem.eval.evaluate import generate_text

    texts = generate_text(args.run, args.prompt, memory=args.memory, router=args.router,
                          block_level=args.block_level, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          device=args.device, overrides=args.overrides)
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
          max_waiting=args.max_waiting, served_model_name=args.served_model_name)


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
    run_demo(preset, out=args.out, jobs=args.jobs, progress=not args.quiet, spec=spec)


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
    run_suite(args.suite, out=args.out, quick=args.quick, **options)


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
    p.set_defaults(func=cmd_eval)

    p = _run_parser(sub, "generate", "generate text from a run directory")
    p.add_argument("--prompt", "-p", action="append", required=True, help="prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
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
                    "with the memory explorer at /; --memory/--router/--block-level are the requests' defaults")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="sequences queued beyond the batch before requests get 429 (default 64)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: RUN as given)")
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
    p.add_argument("--jobs", type=int, default=2, help="parallel training processes")
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

    p = sub.add_parser("bench", help="benchmark suites (train: the trainer's step, anchor vs memory; "
                       "data: prepare/cluster at 1x/2x/4x corpus), JSON + table")
    p.add_argument("--suite", default="train", choices=sorted(SUITES))
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--size-mb", type=float, default=None, help="data: MB of text of the 1x corpus (2x, 4x follow)")
    p.add_argument("--encoder", choices=C.choices("routing.encoder"), default=None,
                   help="data: the encoder cluster runs (default wordllama)")
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    # overrides may come before or after options (`train --quiet train.lr=1e-3`): collect the leftovers
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        args.func(args)
    except HiermemError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
