import json
import re
from collections import Counter

import numpy as np
import pytest
import torch

from hiermem.data.prepare import DataDir
from hiermem.errors import HiermemError
from hiermem.eval.evaluate import evaluate_run, generate_text
from hiermem.eval.generation import generate_ids
from hiermem.eval.perplexity import perplexity
from hiermem.eval.probes import extract_answer, is_correct
from hiermem.routing.embedders import WordLlamaEmbedder
from hiermem.eval.run import Run
from hiermem.memory.fetch import fetch

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.torch_threads


@pytest.fixture(scope="module")
def probe_file(longtail_dir, tmp_path_factory):
    """A few probes of every frequency group of the long-tail corpus."""
    rows = [json.loads(line) for line in (longtail_dir / "probes.jsonl").read_text().splitlines()]
    taken, per_group = [], Counter()
    for r in rows:
        if per_group[r["group"]] < 3:
            per_group[r["group"]] += 1
            taken.append(r)
    path = tmp_path_factory.mktemp("probes") / "probes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in taken))
    return path, taken


@pytest.fixture(scope="module")
def run(memory_run):
    return Run(memory_run, device="cpu")


def greedy_completions(run, prompts, memory):
    tok = run.tokenizer
    ids = generate_ids(run.model, [tok.encode(p) for p in prompts], memory=memory, max_new_tokens=12,
                       eos_id=tok.eos_id)
    return [tok.decode(x) for x in ids]


@pytest.mark.parametrize("memory", ["fetched", "generic", "none"])
def test_evaluate_run_reports_perplexity_and_probes_per_group(memory_run, run, probe_file, memory):
    path, probes = probe_file
    res = evaluate_run(str(memory_run), memory=memory, router="centroid", probes=str(path), device="cpu",
                       progress=False)
    assert res["memory"] == memory and res["router"] == "centroid" and res["block_level"] is None
    ppl = res["perplexity"]
    data = DataDir(run.cfg.data_dir)
    val = np.flatnonzero(data.is_val())
    assert ppl["docs"] == len(val) and ppl["tokens"] == int(data.doc_tokens().lengths[val].sum())

    # the same number by hand: route each validation document on its text, fetch, score
    docs = [np.asarray(data.doc_tokens()[i]) for i in val]
    texts = data.texts()
    if memory == "none":
        memory_for = None
    else:
        paths = run.tree.route(WordLlamaEmbedder().encode([texts[i] for i in val]))
        gen = torch.full((len(val),), memory == "generic")
        memory_for = lambda owners: fetch(run.bank, paths[owners], gen[:len(owners)]).memory  # noqa: E731
    expected = perplexity(run.model, docs, run.tokenizer.eos_id, run.cfg.data.seq_len, memory_for)
    assert ppl["loss"] == pytest.approx(expected["loss"], rel=1e-6)

    pr = res["probes"]
    groups = {p["group"] for p in probes}
    assert pr["n"] == len(probes) and set(pr["groups"]) == groups and len(groups) >= 2
    assert {g: pr["per_group"][g]["n"] for g in groups} == Counter(p["group"] for p in probes)
    correct = sum(p["correct"] for p in pr["predictions"])
    assert pr["accuracy"] == pytest.approx(100.0 * correct / len(probes))
    # completions are greedy decodes of each prompt with that probe's memory
    prompts = [p["prompt"] for p in probes[:4]]
    mem = None
    if memory != "none":
        paths = run.tree.route(WordLlamaEmbedder().encode(prompts))
        mem = fetch(run.bank, paths, torch.full((len(prompts),), memory == "generic")).memory
    full = greedy_completions(run, prompts, mem)
    for pred, whole, probe in zip(pr["predictions"][:4], full, probes[:4]):
        # decoding may stop early, once more text could not change the extracted answer
        assert whole.startswith(pred["completion"])
        assert extract_answer(pred["completion"], probe["answer"]) == extract_answer(whole, probe["answer"])
        assert pred["correct"] == is_correct(whole, probe["answer"])

    label = {"fetched": "fetched/centroid", "generic": "generic", "none": "none"}[memory]
    first = res["text"].splitlines()[0]
    assert f"[{label}]" in first and f"{ppl['ppl']:.3f}" in first
    assert "exact match" in res["text"]


def test_evaluate_defaults_and_blocking(memory_run, run):
    res = evaluate_run(str(memory_run), device="cpu", progress=False)
    assert res["memory"] == "fetched" and res["router"] == run.cfg.routing.router == "knn"
    assert "probes" not in res
    blocked = evaluate_run(str(memory_run), block_level=0, router="centroid", device="cpu", progress=False)
    assert blocked["block_level"] == 0 and "blocked@0" in blocked["text"]
    free = evaluate_run(str(memory_run), router="centroid", device="cpu", progress=False)
    assert blocked["perplexity"]["tokens"] == free["perplexity"]["tokens"]
    assert blocked["perplexity"]["loss"] != free["perplexity"]["loss"]


def test_generate_text(memory_run, run):
    prompts = ["The city of", "Hello there, this is a longer prompt about"]
    greedy = generate_text(str(memory_run), prompts, memory="fetched", router="centroid", max_new_tokens=8,
                           device="cpu")
    paths = run.tree.route(WordLlamaEmbedder().encode(prompts))
    tok = run.tokenizer
    ids = generate_ids(run.model, [tok.encode(p) for p in prompts], memory=fetch(run.bank, paths).memory,
                       max_new_tokens=8, eos_id=tok.eos_id)
    assert greedy == [tok.decode(x) for x in ids]
    kw = dict(memory="generic", max_new_tokens=8, temperature=1.2, top_p=0.9, device="cpu")
    sampled = generate_text(str(memory_run), prompts, seed=3, **kw)
    # the same draw by hand: the generic block for every prompt, the same sampling parameters and seed
    generic = fetch(run.bank, np.zeros((2, run.tree.depth), np.int64), torch.ones(2, dtype=torch.bool)).memory
    ids = generate_ids(run.model, [tok.encode(p) for p in prompts], memory=generic, max_new_tokens=8,
                       eos_id=tok.eos_id, temperature=1.2, top_p=0.9, seed=3)
    assert sampled == [tok.decode(x) for x in ids]
    assert sampled != generate_text(str(memory_run), prompts, seed=4, **kw)  # the seed matters


def test_errors(tmp_path, memory_run, probe_file):
    with pytest.raises(HiermemError, match=re.escape(f"{tmp_path}: not a hiermem run directory (no config.yaml)")):
        evaluate_run(str(tmp_path), device="cpu", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": "y"}\n{"prompt": "no answer"}\n')
    with pytest.raises(HiermemError, match=rf"{bad}:2: missing required field \"answer\""):
        evaluate_run(str(memory_run), memory="none", probes=str(bad), device="cpu", progress=False)
    with pytest.raises(HiermemError, match="--block-level 5"):
        evaluate_run(str(memory_run), block_level=5, device="cpu", progress=False)
