"""--rag K (eval/rag.py): retrieval over the knn router's index, the context it builds, generation, the CLI."""

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hiermem.cli import main
from hiermem.config import load_config
from hiermem.errors import HiermemError
from hiermem.eval import evaluate
from hiermem.eval.evaluate import evaluate_run, generate_text, open_run, probe_predictor
from hiermem.eval.generation import generate_ids
from hiermem.eval.inference import MemoryContext
from hiermem.eval.rag import build_context, make_rag
from hiermem.routing.embedders import l2_normalize
from hiermem.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.torch_threads

PROMPTS = ["Harbour city of Lyon has a population of about", "The ship sailed", "Snow on the peak"]


@pytest.fixture(scope="module")
def anchor_run(longtail_data, tmp_path_factory):
    """An anchor run on the clustered long-tail data (the memory run's data directory, as in the demo)."""
    run_dir = tmp_path_factory.mktemp("rag") / "anchor"
    train(load_config("tiny", [*longtail_data, "train.max_steps=6", f"train.run_dir={run_dir}"]), progress=False)
    return run_dir


@pytest.fixture(scope="module")
def mem(memory_run):
    return open_run(str(memory_run), router="knn")


def brute_force(run, texts, k):
    """Document ids and cosine similarities of the k nearest training documents, by a full scan."""
    c = run.clustering()
    train_docs = np.flatnonzero(~run.data().is_val())
    docs = l2_normalize(np.asarray(c.doc_emb())[train_docs])
    q = l2_normalize(MemoryContext(run, "none").embedder.encode(texts))
    sims = q @ docs.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return train_docs[order], np.take_along_axis(sims, order, 1)


def manual_prompt(run, doc_id, prompt, max_new_tokens):
    """The nearest document, its separator and the prompt, concatenated by hand."""
    tok = run.tokenizer
    p = tok.encode(prompt)
    doc = tok.encode(run.data().texts_at([doc_id])[0])
    room = run.model.cfg.max_seq_len - len(p) - max_new_tokens
    return doc[:room - 1] + [tok.eos_id] + p


def test_retrieval_returns_exactly_the_nearest_training_documents(mem, anchor_run):
    ctx = MemoryContext(mem, "fetched", "knn")
    rag = make_rag(mem, ctx, 5)
    assert rag.retriever.router is ctx.router  # the routing index itself, not a second one
    ids, sims = rag.retriever.search(PROMPTS, 5)
    want_ids, want_sims = brute_force(mem, PROMPTS, 6)  # one more: a tie at the 5th place shows
    np.testing.assert_allclose(sims, want_sims[:, :5], atol=1e-5)
    assert not np.isin(ids, np.flatnonzero(mem.data().is_val())).any()
    gap = -np.diff(want_sims, axis=1, prepend=2.0) > 1e-5  # gap[:, j]: rank j is clearly below rank j-1
    untied = gap[:, :5] & gap[:, 1:]  # no tie on either side: that rank's document is determined
    assert (ids[untied] == want_ids[:, :5][untied]).all() and untied.mean() > 0.5
    tied = ~untied  # tied ranks: the same similarities, so the same set of candidates up to the tie
    np.testing.assert_allclose(sims[tied], want_sims[:, :5][tied], atol=1e-5)
    # a centroid-routed memory run and an anchor run on the same data dir retrieve the same documents
    centroid = make_rag(mem, MemoryContext(mem, "fetched", "centroid"), 5)
    anchor = open_run(str(anchor_run))
    from_anchor = make_rag(anchor, MemoryContext(anchor, "none"), 5)
    for other in (centroid, from_anchor):
        got_ids, got_sims = other.retriever.search(PROMPTS, 5)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_sims, sims)


def test_build_context_fills_the_window_nearest_document_last():
    docs = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12], list(range(13, 31))]
    prompt = [100, 101]
    # room 20 - 2 - 4 = 14: the nearest (5 + eos), the second (7 + eos); the third does not start
    assert build_context(docs, prompt, 20, 4, 0) == [6, 7, 8, 9, 10, 11, 12, 0, 1, 2, 3, 4, 5, 0, 100, 101]
    # room 10: the nearest whole, the second's head, the third dropped
    assert build_context(docs, prompt, 16, 4, 0) == [6, 7, 8, 0, 1, 2, 3, 4, 5, 0, 100, 101]
    assert build_context(docs, prompt, 7, 4, 0) == prompt  # room 1: only a separator would fit
    assert build_context([[], [7, 8]], prompt, 50, 4, 0) == [7, 8, 0, 100, 101]  # an empty document is skipped


@settings(max_examples=200, deadline=None)
@given(docs=st.lists(st.lists(st.integers(1, 50), max_size=12), max_size=5),
       prompt=st.lists(st.integers(1, 50), min_size=1, max_size=10), window=st.integers(1, 40),
       new=st.integers(1, 8))
def test_build_context_never_exceeds_the_window(docs, prompt, window, new):
    out = build_context(docs, prompt, window, new, 0)
    context = out[:len(out) - len(prompt)]
    assert out[len(context):] == prompt
    if not context:
        return
    room = window - new - len(prompt)
    assert len(out) <= window - new and context[-1] == 0
    parts, current = [], []  # the documents' heads, split at the separator (0 is in no document)
    for t in context:
        if t == 0:
            parts.append(current)
            current = []
        else:
            current.append(t)
    parts.reverse()  # nearest first
    nonempty = [d for d in docs if d]
    assert all(part == doc for part, doc in zip(parts[:-1], nonempty))  # only the last one taken is cut
    last, doc = parts[-1], nonempty[len(parts) - 1]
    assert last and last == doc[:len(last)]
    left = room - len(context)
    assert left == 0 if len(last) < len(doc) else (len(parts) == len(nonempty) or left < 2)  # nothing more fits


@pytest.mark.parametrize("kind", ["anchor", "memory"])
def test_generation_with_rag_equals_generation_on_the_concatenated_prompt(kind, mem, anchor_run, memory_run,
                                                                          monkeypatch):
    run_dir = str(anchor_run if kind == "anchor" else memory_run)
    run = mem if kind == "memory" else open_run(run_dir)
    nearest, _ = brute_force(mem, PROMPTS, 1)
    manual = [manual_prompt(run, int(d), p, 8) for d, p in zip(nearest[:, 0], PROMPTS)]
    ctx = MemoryContext(run, "fetched" if kind == "memory" else "none", "knn")
    memory = ctx.memory_for_texts(PROMPTS)  # routed on the prompts alone, as generate does with --rag
    want = generate_ids(run.model, manual, memory=memory, max_new_tokens=8, eos_id=run.tokenizer.eos_id)
    fed = []  # what generate_text hands the decoder (a tiny model's text barely shows its context)
    monkeypatch.setattr(evaluate, "generate_ids", lambda model, prompts, **kw: fed.append(prompts) or
                        generate_ids(model, prompts, **kw))
    got = generate_text(run_dir, PROMPTS, router="knn", max_new_tokens=8, rag=1)
    assert fed == [manual] and got == [run.tokenizer.decode(w) for w in want]


def test_anchor_run_without_a_knn_index_names_what_is_missing(anchor_run, tmp_path, capsys):
    data = open_run(str(anchor_run)).data().path
    bare = tmp_path / "bare"
    shutil.copytree(data, bare, ignore=shutil.ignore_patterns("cluster", "embeddings", "packed"))
    want = (f"{anchor_run}: --rag needs a knn index, and this anchor run's data directory {bare} has no "
            "cluster/cluster.json (run `hiermem cluster` on it with the run's routing config)")
    with pytest.raises(HiermemError) as e:
        generate_text(str(anchor_run), PROMPTS, rag=1, overrides=[f"data.dir={bare}"])
    assert str(e.value) == want
    assert main(["generate", str(anchor_run), "-p", "x", "--rag", "1", f"data.dir={bare}"]) == 2
    assert capsys.readouterr().err == f"error: {want}\n"
    assert main(["generate", str(anchor_run), "-p", "x", "--rag", "-1"]) == 2
    assert capsys.readouterr().err == "error: --rag must be 0 (off) or a number of documents, got -1\n"


def test_cli_rag_end_to_end(memory_run, mem, longtail_dir, tmp_path, capsys):
    rows = [json.loads(line) for line in (longtail_dir / "probes.jsonl").read_text().splitlines()][:4]
    probes = tmp_path / "probes.jsonl"
    probes.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", str(memory_run), "--probes", str(probes), "--router", "knn", "--json", "--quiet",
            "--max-new-tokens", "6"]
    assert main([*args, "--rag", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["rag"] == 1 and "[fetched/knn+rag:k=1]" in res["text"]
    # the probes decode the retrieval-augmented prompts; perplexity is the same as without RAG
    ctx = MemoryContext(mem, "fetched", "knn")
    predict = probe_predictor(mem, ctx, 6, rag=make_rag(mem, ctx, 1))
    assert [p["completion"] for p in res["probes"]["predictions"]] == predict(rows)
    assert res["perplexity"] == evaluate_run(str(memory_run), router="knn", progress=False)["perplexity"]
    assert main(["generate", str(memory_run), "-p", PROMPTS[0], "--rag", "1", "--router", "knn",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == PROMPTS[0] + generate_text(str(memory_run), PROMPTS[:1], router="knn",
                                                                max_new_tokens=5, rag=1)[0] + "\n"
