"""`hiermem lm-eval RUN --tasks NAMES`: lm-eval-harness's own evaluator on a hiermem model.

The model is registered in lm-eval's registry as `hiermem` (importing this module registers it). lm-eval 0.4.x
(0.4.13 is pinned) keeps a registry but discovers no models from other packages: it has no entry-point
lookup, so `lm_eval --model hiermem` works only in a later lm-eval that loads plugins; until then
`hiermem lm-eval` (or lm_eval.simple_evaluate(model=HiermemLM(...)) from Python) is the way in.

RUN is a native run directory (its anchor, bank and router, as `hiermem eval` loads them) or a folder written
by `hiermem export` (the transformers model with fetched memory, hf/memory_model.py): the same requests score
the same on both. Every request is routed once, on its context as the paper routes evaluation examples
(docs/method.md §4.5): loglikelihood on the context (the continuation when the context is empty),
loglikelihood_rolling on the whole text, generate_until on the prompt. Requests run in batches of similar
length, each row with its own memory; contexts longer than the model's window keep their last tokens.
Log-likelihoods follow lm-eval's conventions: an empty context is the end-of-document token, rolling
windows are lm-eval's own (get_rolling_token_windows, prefix = end-of-document). generate_until decodes
greedily (do_sample=true is refused) and stops at the first `until` string or the end-of-document token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from hiermem.errors import HiermemError
from hiermem.eval.evaluate import open_run
from hiermem.eval.generation import generate_ids
from hiermem.eval.inference import MemoryContext
from hiermem.hf.memory_model import MemoryModel


class NativeScorer:
    """A native run: its Transformer, tokenizer and per-context memory (eval/inference.py)."""

    def __init__(self, run_dir: str, memory: str | None, router: str | None, device: str | None):
        self.run = open_run(run_dir, router=router, device=device)
        self.ctx = MemoryContext(self.run, memory or ("fetched" if self.run.bank is not None else "none"))
        tok = self.run.tokenizer
        self.encode, self.decode, self.eos_id = tok.encode, tok.decode, tok.eos_id
        self.max_length = self.run.cfg.model.max_seq_len
        self.mode, self.router_name = self.ctx.mode, self.ctx.router_name
        self.depth = self.run.tree.depth if self.run.tree is not None else 1

    def paths(self, texts: list[str]) -> np.ndarray:
        return self.ctx.route(texts) if self.mode == "fetched" else np.zeros((len(texts), self.depth), np.int64)

    def memory(self, paths: np.ndarray):
        return self.ctx.memory_for_paths(paths)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, memory) -> torch.Tensor:
        return self.run.model(ids.to(self.run.device), memory=memory)[0]

    def generate(self, prompts: list[list[int]], memory, max_new_tokens: int, stop_fn) -> list[list[int]]:
        return generate_ids(self.run.model, prompts, memory=memory, max_new_tokens=max_new_tokens,
                            eos_id=self.eos_id, stop_fn=stop_fn)


class ExportScorer:
    """An export folder (hiermem export): the transformers model with MemoryHooks (hf/memory_model.py)."""

    def __init__(self, path: str, memory: str | None, router: str | None, device: str | None):
        self.mm = MemoryModel.from_pretrained(path, memory=memory, router=router, device=device or "cpu")
        tok = self.mm.tokenizer
        self.encode = lambda text: tok.encode(text, add_special_tokens=False)
        self.decode = tok.decode
        self.eos_id = int(self.mm.meta["eos_id"])
        self.max_length = int(self.mm.model.config.max_position_embeddings)
        self.mode, self.router_name = self.mm.mode, self.mm.cfg.routing.router
        self.depth = self.mm.tree.depth if self.mm.tree is not None else 1

    def paths(self, texts: list[str]) -> np.ndarray:
        return self.mm.route(texts) if self.mode == "fetched" else np.zeros((len(texts), self.depth), np.int64)

    def memory(self, paths: np.ndarray):
        return self.mm.memory_for(paths=paths)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor, memory) -> torch.Tensor:
        with self.mm.hooks.using(memory):
            return self.mm.model(input_ids=ids.to(self.mm.device)).logits

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], memory, max_new_tokens: int, stop_fn) -> list[list[int]]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.eos_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, as the exported tokenizer pads
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1

        class Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([bool(stop_fn(i, row[width:].tolist())) for i, row in enumerate(input_ids)],
                                    device=input_ids.device)

        dev = self.mm.device
        with self.mm.hooks.using(memory):
            out = self.mm.model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False,
                                         max_new_tokens=max_new_tokens,
                                         stopping_criteria=StoppingCriteriaList([Stop()]))
        rows = [row[width:].tolist() for row in out.cpu()]
        return [r[: r.index(self.eos_id)] if self.eos_id in r else r for r in rows]


def open_scorer(run: str, memory: str | None, router: str | None, device: str | None):
    """A run directory or an export folder (one with config.json and hiermem/export.json)."""
    path = Path(run)
    if (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        return ExportScorer(run, memory, router, device)
    return NativeScorer(run, memory, router, device)


@register_model("hiermem")
class HiermemLM(TemplateLM):
    """lm-eval's model interface over a hiermem run or export; `lm_eval --model hiermem --model_args
    run=PATH,memory=fetched,router=knn,batch_size=8` where lm-eval can load it (see the module docstring)."""

    def __init__(self, run: str, memory: str | None = None, router: str | None = None, batch_size: int | str = 8,
                 device: str | None = None, max_batch_size: int | None = None):
        """max_batch_size: passed by lm-eval's own command line; unused (batches are batch_size requests)."""
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise HiermemError("lm-eval: --batch_size auto is not supported; give a number of requests")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise HiermemError(f"lm-eval: --batch_size must be positive (got {batch_size})")
        self.scorer = open_scorer(run, memory, router, device)

    @property
    def eot_token_id(self) -> int:
        return self.scorer.eos_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.scorer.encode(string)

    def _batches(self, order: list[int]):
        for lo in range(0, len(order), self.batch_size):
            yield order[lo: lo + self.batch_size]

    def _route(self, texts: list[str]) -> np.ndarray:
        """Each text's path, every distinct text routed once (rolling windows and options share theirs)."""
        unique = list(dict.fromkeys(texts))
        at = {t: i for i, t in enumerate(unique)}
        return self.scorer.paths(unique)[[at[t] for t in texts]]

    def _score(self, items: list[tuple[str, list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(route text, context tokens, continuation tokens) -> (log p(continuation | context), greedy?), in
        batches of similar length, each row with the memory of its route text."""
        longest = max((len(cont) for _, _, cont in items), default=0)
        if longest > self.max_length:
            raise HiermemError(f"lm-eval: a continuation of {longest} tokens is longer than the model's window "
                               f"({self.max_length} tokens)")
        paths = self._route([text for text, _, _ in items])
        whole = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in items]
        order = sorted(range(len(items)), key=lambda i: -len(whole[i]))
        out: list[tuple[float, bool] | None] = [None] * len(items)
        for batch in self._batches(order):
            width = max(len(whole[i]) - 1 for i in batch)
            ids = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)  # right padding
            for r, i in enumerate(batch):
                ids[r, : len(whole[i]) - 1] = torch.tensor(whole[i][:-1])
            memory = self.scorer.memory(paths[batch])
            logp = F.log_softmax(self.scorer.logits(ids, memory).float(), dim=-1).cpu()
            for r, i in enumerate(batch):
                cont = items[i][2]
                end = len(whole[i]) - 1
                rows = logp[r, end - len(cont): end]
                target = torch.tensor(cont)
                out[i] = (float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all()))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        items = [(context or continuation, ctx, cont) for (context, continuation), ctx, cont in requests]
        results = self._score(items)
        for ((context, continuation), _, _), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", (context, continuation), res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        items, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            windows = get_rolling_token_windows(self.tok_encode(text), self.eot_token_id, self.max_length, 1)
            for ctx, cont in map(make_disjoint_window, windows):
                items.append((text, ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self._score(items)):
            totals[n] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # one batch shape per distinct gen_kwargs, as lm-eval's own models do
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            if kwargs.get("do_sample"):
                raise HiermemError("lm-eval: generate_until decodes greedily; a task asking do_sample=true is not "
                                   "supported")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            contexts = [requests[i].args[0] for i in members]
            # the window's room left for the prompt; an empty prompt is the end-of-document token
            prompts = [(self.tok_encode(c) or [self.eot_token_id])[-max(1, self.max_length - max_new):]
                       for c in contexts]
            paths = self._route(contexts)
            order = sorted(range(len(members)), key=lambda j: -len(prompts[j]))
            for batch in self._batches(order):
                memory = self.scorer.memory(paths[batch])

                def stop_fn(row: int, new: list[int]) -> bool:
                    return any(s in self.scorer.decode(new) for s in until)

                ids = self.scorer.generate([prompts[j] for j in batch], memory, max_new, stop_fn)
                for j, new in zip(batch, ids):
                    text = self.scorer.decode(new)
                    for s in until:
                        text = text.split(s)[0]
                    out[members[j]] = text
                    self.cache_hook.add_partial("generate_until", requests[members[j]].args, text)
        return out


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager: only the tasks under include_path when it holds every task asked for (indexing
    lm-eval's ~15k built-in task files takes seconds), else the built-in tasks as well. Unknown tasks are
    refused in one line."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise HiermemError(f"--include_path {include_path}: not a folder")
    manager = None
    if include_path is not None:
        manager = TaskManager(include_path=include_path, include_defaults=False)
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = "lm-eval's tasks" + (f" or {include_path}" if include_path else "")
        raise HiermemError(f"lm-eval: unknown task {', '.join(unknown)} (not in {where})")
    return manager


def run_lm_eval(run: str, tasks: list[str], memory: str | None = None, router: str | None = None,
                include_path: str | None = None, limit: float | None = None, batch_size: int = 8,
                num_fewshot: int | None = None, device: str | None = None) -> dict:
    """lm-eval's simple_evaluate on RUN; returns its results dict (results, configs, versions, ...)."""
    from lm_eval import simple_evaluate

    lm = HiermemLM(run, memory=memory, router=router, batch_size=batch_size, device=device)
    manager = task_manager(tasks, include_path)
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=False)
    results["hiermem"] = {"run": str(run), "memory": lm.scorer.mode, "router": lm.scorer.router_name}
    return results


def _show(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "N/A"


def format_results(results: dict) -> str:
    """One line per task and metric: value and standard error (as lm-eval reports them; N/A: none)."""
    rows = [("task", "metric", "filter", "value", "stderr")]
    for task, metrics in sorted(results["results"].items()):
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",", 1)
            err = metrics.get(f"{metric}_stderr,{filt}")
            rows.append((task, metric, filt, _show(value), _show(err)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


__all__ = ["ExportScorer", "HiermemLM", "NativeScorer", "format_results", "open_scorer", "run_lm_eval",
           "task_manager"]
