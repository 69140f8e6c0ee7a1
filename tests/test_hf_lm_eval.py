"""hf/lm_eval.py: lm-eval-harness on a hiermem run. Hand-made requests score as hiermem's own forward pass does
(each routed by its context); lm-eval's evaluator runs tasks defined in a local YAML over a local JSONL file
(no dataset download); an export scores the same requests the same."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from hiermem.cli import main
from hiermem.errors import HiermemError
from hiermem.eval.evaluate import generate_text, open_run
from hiermem.eval.inference import MemoryContext
from hiermem.hf.lm_eval import HiermemLM

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.torch_threads

QUESTIONS = [
    {"question": "The harbour of the old port", "choices": ["is full of ships", "is a glacier", "sells hay"],
     "answer": 0},
    {"question": "Snow covers the", "choices": ["tram station", "mountain peak", "wheat field"], "answer": 1},
    {"question": "The farmer drove his", "choices": ["tractor", "submarine", "museum"], "answer": 0},
    {"question": "The city has a population of about", "choices": ["100,000", "seven", "blue"], "answer": 0},
]
TASKS = {
    "tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                "doc_to_choice": "{{choices}}", "metric_list": [{"metric": "acc"}]},
    "tiny_gen": {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{choices[0]}}",
                 "generation_kwargs": {"until": ["."], "max_gen_toks": 6}, "metric_list": [{"metric": "exact_match"}]},
    "tiny_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{question}}",
                 "metric_list": [{"metric": "word_perplexity"}]},
}


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module")
def run(memory_run):
    return open_run(str(memory_run), device="cpu")


@pytest.fixture(scope="module")
def ctx(run):
    return MemoryContext(run, "fetched")


@pytest.fixture(scope="module")
def lm(memory_run):
    return HiermemLM(str(memory_run), batch_size=3, device="cpu")


def hand_loglikelihood(ctx, route_text, context_ids, continuation_ids):
    """hiermem's own scoring: one forward pass with the memory of route_text, log-softmax at the continuation."""
    run, memory = ctx.run, ctx.memory_for_texts([route_text])
    ids = context_ids + continuation_ids
    with torch.no_grad():
        logp = F.log_softmax(run.model(torch.tensor([ids[:-1]]), memory=memory)[0][0].float(), -1)
    rows = logp[len(context_ids) - 1:]
    target = torch.tensor(continuation_ids)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def test_the_model_is_in_lm_evals_registry():
    assert get_model("hiermem") is HiermemLM


def test_loglikelihood_is_hiermems_own_scoring(lm, run, ctx):
    tok = run.tokenizer
    pairs = [(q["question"], " " + c) for q in QUESTIONS for c in q["choices"]] + [("", "Snow on the peak.")]
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (logp, greedy) in zip(pairs, got):
        if context:
            ids = tok.encode(context)
            want = hand_loglikelihood(ctx, context, ids, tok.encode(context + continuation)[len(ids):])
        else:  # an empty context is the end-of-document token; routed on the continuation
            want = hand_loglikelihood(ctx, continuation, [tok.eos_id], tok.encode(continuation))
        assert logp == pytest.approx(want[0], abs=1e-4) and greedy == want[1]


def test_loglikelihood_rolling_is_hiermems_own_scoring(lm, run, ctx):
    """lm-eval's rolling scheme: the text cut into max_length chunks, the first conditioned on the end-of-
    document token, the others on the token before them, the last (shorter) one on as many earlier tokens as
    fill the window; every chunk with the memory of the whole text."""
    tok = run.tokenizer
    texts = ["The mountain pass is closed.", " ".join(t for t in run.data().texts()[:12])]
    n = run.cfg.model.max_seq_len
    assert len(tok.encode(texts[1])) > 2 * n and len(tok.encode(texts[1])) % n  # several windows, a short last one
    got = lm.loglikelihood_rolling([request("loglikelihood_rolling", t) for t in texts])
    for text, logp in zip(texts, got):
        ids = tok.encode(text)
        want = 0.0
        for lo in range(0, len(ids), n):
            chunk = ids[lo:lo + n]
            context = [tok.eos_id] if lo == 0 else ids[lo + len(chunk) - n - 1: lo]
            want += hand_loglikelihood(ctx, text, context, chunk)[0]
        assert logp == pytest.approx(want, abs=1e-3)


def test_generate_until_is_hiermems_greedy_generation(lm, memory_run):
    prompts = [q["question"] for q in QUESTIONS]
    got = lm.generate_until([request("generate_until", p, {"until": [".", "\n"], "max_gen_toks": 10})
                             for p in prompts])
    full = generate_text(str(memory_run), prompts, max_new_tokens=10, device="cpu")
    assert got == [t.split(".")[0].split("\n")[0] for t in full]
    with pytest.raises(HiermemError, match="decodes greedily"):
        lm.generate_until([request("generate_until", "x", {"do_sample": True})])


def test_an_export_scores_the_same_requests_the_same(lm, memory_run, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(memory_run), str(out)]) == 0
    exported = HiermemLM(str(out), batch_size=2)
    pairs = [(q["question"], " " + c) for q in QUESTIONS for c in q["choices"]]
    reqs = [request("loglikelihood", c, x) for c, x in pairs]
    for (a, ga), (b, gb) in zip(lm.loglikelihood(reqs), exported.loglikelihood(reqs)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    gen = [request("generate_until", q["question"], {"until": ["."], "max_gen_toks": 8}) for q in QUESTIONS]
    assert exported.generate_until(gen) == lm.generate_until(gen)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    for name, spec in TASKS.items():
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test", **spec}
        (folder / f"{name}.yaml").write_text(json.dumps(task))  # JSON is YAML
    return folder


def test_lm_evals_evaluator_runs_local_tasks(memory_run, task_dir, lm, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["lm-eval", str(memory_run), "--tasks", ",".join(TASKS), "--include_path", str(task_dir),
            "--batch_size", "4", "--device", "cpu", "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in TASKS)
    results = json.loads(out.read_text())
    assert results["hiermem"] == {"run": str(memory_run), "memory": "fetched", "router": "knn"}
    # the accuracy lm-eval reports is the argmax of hiermem's log-likelihoods over the choices
    scores = [[ll for ll, _ in lm.loglikelihood([request("loglikelihood", q["question"], " " + c)
                                                for c in q["choices"]])] for q in QUESTIONS]
    acc = sum(max(range(3), key=s.__getitem__) == q["answer"] for s, q in zip(scores, QUESTIONS)) / len(QUESTIONS)
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc)
    assert math.isfinite(results["results"]["tiny_ppl"]["word_perplexity,none"])
    assert "exact_match,none" in results["results"]["tiny_gen"]


def test_bad_input_gets_one_line_and_exit_code_2(memory_run, task_dir, tmp_path, capsys, monkeypatch):
    import functools

    import lm_eval.tasks

    # an unknown task is looked up among lm-eval's built-in tasks too; indexing those ~15k files takes about
    # 20 s here, so this test leaves them out (the message and the exit code are what it checks)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager,
                                                                        include_defaults=False))
    cases = [
        (["lm-eval", str(memory_run), "--tasks", "no_such_task", "--include_path", str(task_dir)], None),
        (["lm-eval", str(tmp_path), "--tasks", "tiny_mc", "--include_path", str(task_dir)],
         f"error: {tmp_path}: not a hiermem run directory (no config.yaml)"),
        (["lm-eval", str(memory_run), "--tasks", "tiny_mc", "--include_path", str(tmp_path / "nope")],
         f"error: --include_path {tmp_path / 'nope'}: not a folder"),
        (["lm-eval", str(memory_run), "--tasks", "tiny_mc", "--batch_size", "0"],
         "error: lm-eval: --batch_size must be positive (got 0)"),
    ]
    for argv, line in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        if line is None:
            assert err.startswith("error: lm-eval: unknown task no_such_task (not in lm-eval's tasks or ")
            assert err.count("\n") == 1
        else:
            assert err == line + "\n"
