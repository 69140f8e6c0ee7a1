"""`hiermem eval` and `hiermem generate` on a run directory (with `--rag K`: eval/rag.py)."""

from __future__ import annotations

import numpy as np

from hiermem.config import check_run_overrides
from hiermem.data.prepare import DataDir
from hiermem.errors import HiermemError
from hiermem.eval.generation import generate_ids
from hiermem.eval.inference import MemoryContext
from hiermem.eval.perplexity import perplexity
from hiermem.eval.rag import make_rag
from hiermem.eval.run import Run


# Shorthand flags of eval/generate, each the same as one dot-list override of the run's saved config.
SHORTHANDS = {"router": "routing.router", "device": "train.device"}


def open_run(run_dir: str, overrides: list[str] | tuple[str, ...] = (), router: str | None = None,
             device: str | None = None) -> Run:
    """The run from its saved config plus inference-time overrides; `router=x` / `device=x` (--router, --device)
    are shorthands for routing.router=x / train.device=x. Overrides that would change what was trained are refused."""
    given = dict(item.split("=", 1) for item in overrides if "=" in item)
    items = []
    for flag, value in (("router", router), ("device", device)):
        if value is None:
            continue
        key = SHORTHANDS[flag]
        if key in given and given[key] != value:
            raise HiermemError(f"--{flag} {value} and {key}={given[key]} disagree: give one of them")
        items.append(f"{key}={value}")
    items += list(overrides)
    check_run_overrides(items)
    return Run(run_dir, overrides=items)


def _context(run: Run, memory: str | None, block_level: int | None) -> MemoryContext:
    mode = memory or ("fetched" if run.bank is not None else "none")
    return MemoryContext(run, mode, None, block_level)  # the router: the run's routing.router (after overrides)


def probe_predictor(run: Run, ctx: MemoryContext, max_new_tokens: int = 12, paths_for=None, rag=None):
    """predict(records) -> completions: greedy decoding, each probe routed on its route_text (or prompt),
    stopping at the end of the first sentence (the answer-extraction rule never looks further).
    paths_for(records) may supply paths directly (the demo's oracle leaf). rag (eval/rag.py Rag) puts each
    prompt's nearest training documents before it (routing still uses the probe's own text)."""
    from hiermem.eval.probes import answer_complete

    tok = run.tokenizer

    def predict(records: list[dict]) -> list[str]:
        if ctx.mode == "none":
            memory = None
        elif paths_for is not None and ctx.mode == "fetched":
            memory = ctx.memory_for_paths(paths_for(records))
        else:
            memory = ctx.memory_for_texts([r.get("route_text") or r["prompt"] for r in records])
        answers = [str(r["answer"]) for r in records]
        prompts = [tok.encode(r["prompt"]) for r in records]
        if rag is not None:
            prompts = rag.augment([r["prompt"] for r in records], prompts, max_new_tokens)
        ids = generate_ids(run.model, prompts, memory=memory,
                           max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
                           stop_fn=lambda i, new: answer_complete(tok.decode(new), answers[i]))
        return [tok.decode(x) for x in ids]

    return predict


def heldout_perplexity(run: Run, ctx: MemoryContext, data: DataDir | None = None, progress: bool = False) -> dict:
    """Perplexity on the run's validation documents, each routed on its full text (as the paper's Wiki-En)."""
    data = data or run.data()
    idx = np.flatnonzero(data.is_val())
    texts = data.texts()
    dt = data.doc_tokens()
    return routed_perplexity(run, ctx, [np.asarray(dt[i]) for i in idx], [texts[i] for i in idx], progress=progress)


def routed_perplexity(run: Run, ctx: MemoryContext, docs: list[np.ndarray], texts: list[str],
                      paths: np.ndarray | None = None, progress: bool = False) -> dict:
    """Perplexity of token arrays `docs`, each with the memory of its own text (routed once per document,
    unless `paths` are given); the generic block or no memory as ctx says."""
    memory_for = None
    if ctx.mode != "none":
        if ctx.mode == "generic":
            paths = np.zeros((len(docs), run.tree.depth), np.int64)
        elif paths is None:
            paths = ctx.route(texts)
        memory_for = lambda owners: ctx.memory_for_paths(paths[owners])  # noqa: E731
    return perplexity(run.model, docs, run.tokenizer.eos_id, run.cfg.data.seq_len, memory_for, progress=progress)


def evaluate_run(run_dir: str, memory: str | None = None, router: str | None = None, block_level: int | None = None,
                 probes: str | None = None, max_new_tokens: int = 12, device: str | None = None,
                 progress: bool = True, overrides: list[str] | tuple[str, ...] = (), rag: int = 0) -> dict:
    """Held-out perplexity (never with RAG) and, given a probe file, probe accuracy (with `rag` documents)."""
    from hiermem.eval.probes import evaluate_probes, format_table, load_probes

    run = open_run(run_dir, overrides, router=router, device=device)
    ctx = _context(run, memory, block_level)
    retrieval = make_rag(run, ctx, rag)  # checked before the perplexity pass: a missing index fails at once
    label = ctx.mode if ctx.mode != "fetched" else f"fetched/{ctx.router_name}"
    if block_level is not None:
        label += f"/blocked@{block_level}"
    if rag:
        label += f"+rag:k={rag}"
    result = {"run": str(run.path), "memory": ctx.mode, "router": ctx.router_name, "block_level": block_level,
              "rag": rag, "perplexity": heldout_perplexity(run, ctx, progress=progress)}
    ppl = result["perplexity"]
    if ppl["docs"]:
        lines = [f"{run.path} [{label}] held-out perplexity {ppl['ppl']:.3f} over {ppl['tokens']:,} tokens "
                 f"({ppl['docs']} documents)"]
    else:  # data.val_fraction=0: nothing held out
        lines = [f"{run.path} [{label}] no held-out documents (data.val_fraction=0): perplexity skipped"]
    if probes:
        records = load_probes(probes)
        res = evaluate_probes(records, probe_predictor(run, ctx, max_new_tokens, rag=retrieval), progress=progress)
        result["probes"] = res
        lines.append(f"probes ({probes}): exact match {res['accuracy']:.1f}% of {res['n']}")
        lines.append(format_table({label: res}, res["groups"]))
    result["text"] = "\n".join(lines)
    return result


def generate_text(run_dir: str, prompts: list[str], memory: str | None = None, router: str | None = None,
                  block_level: int | None = None, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int = 0, device: str | None = None,
                  overrides: list[str] | tuple[str, ...] = (), rag: int = 0) -> list[str]:
    """Continuations of `prompts` (routed on the prompts; with `rag` > 0 their nearest training documents
    are put before them, see eval/rag.py)."""
    run = open_run(run_dir, overrides, router=router, device=device)
    ctx = _context(run, memory, block_level)
    retrieval = make_rag(run, ctx, rag)
    mem = ctx.memory_for_texts(prompts)
    tok = run.tokenizer
    ids = [tok.encode(p) for p in prompts]
    if retrieval is not None:
        ids = retrieval.augment(prompts, ids, max_new_tokens)
    ids = generate_ids(run.model, ids, memory=mem, max_new_tokens=max_new_tokens,
                       eos_id=tok.eos_id, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return [tok.decode(x) for x in ids]
