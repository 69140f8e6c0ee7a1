"""The `hiermem` command end to end, in-process: corpus -> prepare -> cluster -> train -> eval -> generate.

This is the one test that runs the paper's encoder (the bundled all-MiniLM-L6-v2) through the whole pipeline;
routing.max_tokens=16 keeps it fast (marked slow all the same; `make test` runs it). The other tests check the
command line itself: --help, choices, and the overrides a trained run (tests/fixtures/run_v1) takes.
"""

import argparse
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from hiermem import config as C
from hiermem.cli import build_parser, main
from hiermem.config import load_config
from hiermem.model.transformer import Transformer

FIXTURE = Path(__file__).parent / "fixtures" / "run_v1"

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.torch_threads

SMALL = ["data.vocab_size=512", "routing.max_tokens=16", "model.n_layers=2", "model.d_model=64", "model.n_heads=2",
         "model.head_dim=16", "model.d_ff=128", "model.max_seq_len=64", "data.seq_len=64", "memory.ranks=[8,8]",
         "train.max_steps=6", "train.batch_size=8", "train.warmup_steps=2", "train.device=cpu"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys, *argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, f"hiermem {' '.join(map(str, argv))} failed: {err}"
    return out


def one_line_error(capsys, *argv):
    code, out, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = ok(capsys, "corpus", "--out", "corpus", "--entities", 5, "--unseen", 2, "--background", 10)
    m = re.match(r"wrote (\d+) documents and (\d+) probes to corpus", out)
    assert m and int(m.group(2)) == 2 * (5 + 2)  # population and country per city
    n_docs = int(m.group(1))
    assert (tmp_path / "corpus" / "corpus.jsonl").read_text().count("\n") == n_docs

    base = ["-c", "tiny", "data.corpus=corpus/corpus.jsonl", *SMALL]
    out = ok(capsys, "prepare", *base)
    assert out.startswith(f"prepared runs/data/tiny: {n_docs} documents")
    assert ok(capsys, "prepare", *base) == out  # rerun: reused, same report

    out = ok(capsys, "cluster", "--quiet", *base)
    assert out.startswith(f"tree: depth 2, branching 4, {n_docs} documents")
    assert re.search(r"centroid +leaf \d\.\d{3}", out) and re.search(r"knn +leaf \d\.\d{3}", out)
    meta = json.loads((tmp_path / "runs/data/tiny/cluster/cluster.json").read_text())
    assert meta["routing"]["encoder"] == "minilm" and meta["routing"]["max_tokens"] == 16
    emb = np.load(tmp_path / "runs/data/tiny" / meta["embeddings"])
    assert emb.shape == (n_docs, 384)  # MiniLM vectors

    out = ok(capsys, "train", "--quiet", *base, "train.run_dir=runs/anchor")
    assert re.match(r"trained runs/anchor: 6 steps, [\d,]+ tokens, .*final loss \d+\.\d{4}; parameters: anchor [\d,]+$",
                    out.strip())
    out = ok(capsys, "train", "--quiet", *base, "train.mode=cotrain", "train.init_from=runs/anchor",
             "train.run_dir=runs/mem")
    assert "trained runs/mem: 6 steps" in out and "/ fetched 6,144 / bank 61,440" in out  # 3*64*2*(8+8); 3*64*2*(4*8+16*8)
    for name in ("anchor.safetensors", "bank/manifest.json", "tree.npz", "metrics.jsonl", "config.yaml"):
        assert (tmp_path / "runs/mem" / name).exists(), name

    # eval: fetched (the default for a memory run), generic, none; with probes
    probes = "corpus/probes.jsonl"
    out = ok(capsys, "eval", "runs/mem", "--probes", probes, "--quiet")
    assert out.startswith("runs/mem [fetched/knn] held-out perplexity ")
    assert "exact match" in out and "of 14" in out
    ppl = {}
    for mode in ("fetched", "generic", "none"):
        res = json.loads(ok(capsys, "eval", "runs/mem", "--memory", mode, "--probes", probes, "--json", "--quiet"))
        assert res["memory"] == mode and res["probes"]["n"] == 14
        assert set(res["probes"]["per_group"]) == {p["group"] for p in map(json.loads, Path(probes).read_text().splitlines())}
        ppl[mode] = res["perplexity"]["ppl"]
    assert len(set(ppl.values())) == 3  # three different models
    out = ok(capsys, "eval", "runs/mem", "--router", "centroid", "--block-level", "1", "--quiet")
    assert "[fetched/centroid/blocked@1]" in out
    # dot-list overrides of the run's saved config: --router is a shorthand for routing.router
    out = ok(capsys, "eval", "runs/mem", "routing.router=centroid", "routing.knn_k=5", "--quiet")
    assert out.startswith("runs/mem [fetched/centroid] held-out perplexity ")
    assert ok(capsys, "eval", "runs/mem", "--router", "centroid", "--quiet", "--device", "cpu") == out
    line = one_line_error(capsys, "eval", "runs/mem", "memory.ranks=[4,4]", "--quiet")
    assert line.startswith("error: override memory.ranks: fixed when the run was trained")
    out = ok(capsys, "eval", "runs/anchor", "--quiet")
    assert out.startswith("runs/anchor [none] held-out perplexity")

    # generate: greedy (deterministic) and sampled (reproducible per seed)
    prompts = ["-p", "The city of", "-p", "Paris has a population of about"]
    greedy = ok(capsys, "generate", "runs/mem", *prompts, "--max-new-tokens", 6)
    lines = greedy.splitlines()
    assert len(lines) == 2 and lines[0].startswith("The city of") and lines[1].startswith("Paris has")
    assert ok(capsys, "generate", "runs/mem", *prompts, "--max-new-tokens", 6) == greedy
    sampled = ["generate", "runs/mem", *prompts, "--max-new-tokens", 6, "--temperature", 1.0, "--top-k", 50,
               "--top-p", 0.95, "--seed", 7]
    assert ok(capsys, *sampled) == ok(capsys, *sampled)
    out = ok(capsys, "generate", "runs/mem", "-p", "Hello", "--memory", "none", "--max-new-tokens", 3)
    assert out.startswith("Hello")

    # params: parameter accounting from shapes alone
    out = ok(capsys, "params", "-c", "tiny", "model.vocab_size=512", "train.mode=cotrain")
    report = {k.strip(): int(v.replace(",", "")) for k, v in (line.split(":") for line in out.splitlines())}
    cfg = load_config("tiny", ["model.vocab_size=512"])
    assert report["anchor"] == sum(p.numel() for p in Transformer(cfg.model).parameters())
    assert report["fetched"] == report["generic"] == 3 * 128 * 4 * (32 + 32)
    assert report["bank"] == 3 * 128 * 4 * (4 * 32 + 16 * 32)

    # a finished run is not overwritten by accident
    line = one_line_error(capsys, "train", "--quiet", *base, "train.run_dir=runs/anchor")
    assert "runs/anchor: run directory already holds a run" in line
    line = one_line_error(capsys, "generate", "runs/mem", "-p", "x", "--block-level", 7)
    assert "--block-level 7" in line


def test_error_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, "prepare", "data.corpus=missing.jsonl")
    assert line == "error: missing.jsonl: no such file or directory"
    assert not (tmp_path / "runs/data/tiny/prepare.json").exists()

    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "broken"\n')
    line = one_line_error(capsys, "prepare", "data.corpus=bad.jsonl")
    assert line.startswith("error: bad.jsonl:2: malformed JSON")
    assert not (tmp_path / "runs/data/tiny/prepare.json").exists()

    line = one_line_error(capsys, "prepare", "data.corpuss=x.jsonl")
    assert line.startswith("error: config (command line): data.corpuss: Key 'corpuss' not in 'DataConfig'")
    line = one_line_error(capsys, "train", "train.mode=sideways")
    assert "train.mode='sideways'" in line

    (tmp_path / "notarun").mkdir()
    line = one_line_error(capsys, "eval", "notarun")
    assert line == "error: notarun: not a hiermem run directory (no config.yaml)"  # read_run_format's (HEAD)
    line = one_line_error(capsys, "generate", "nowhere", "-p", "x")
    assert "nowhere: not a hiermem run directory" in line
    line = one_line_error(capsys, "params", "-c", "tiny")
    assert "model.vocab_size" in line
    line = one_line_error(capsys, "cluster", "-c", "no-such-preset")
    assert "unknown preset 'no-such-preset'" in line


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_help_lists_the_config_fields_with_defaults(capsys):
    for command in ("train", "prepare", "cluster", "params"):
        out = _help(capsys, command)
        assert re.search(r"^  train\.lr=0\.002 +peak learning rate of the anchor", out, re.M), command
        assert re.search(r"^  routing\.router=knn +router at eval/generate", out, re.M), command
        assert all(re.search(rf"^  {re.escape(k)}=", out, re.M) for k in C.fields()), command
    for command in ("eval", "generate"):
        out = _help(capsys, command, "RUN")
        assert re.search(r"^  routing\.knn_k=10 +neighbours", out, re.M)
        assert re.search(r"^  train\.device=auto ", out, re.M)
        assert not re.search(r"^  (model\.d_model|train\.lr)=", out, re.M)  # refused on a trained run
        assert "shorthand for routing.router=ROUTER" in out


def _subcommand_options(name: str) -> dict:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {opt: a for a in sub.choices[name]._actions for opt in a.option_strings}


def test_cli_choices_are_the_config_declarations():
    for name in ("eval", "generate"):
        opts = _subcommand_options(name)
        assert tuple(opts["--router"].choices) == C.choices("routing.router") == C.field_info(
            "routing.router").metadata["choices"]
        assert tuple(opts["--device"].choices) == C.choices("train.device")
        assert tuple(opts["--memory"].choices) == C.MEMORY_MODES
        assert opts["--router"].default is None and opts["--device"].default is None  # default: the run's


def test_a_trained_run_takes_inference_time_overrides(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run_v1"
    shutil.copytree(FIXTURE, run)
    expected = json.loads((run / "expected_fetched.json").read_text())  # made with the centroid router
    prompt, completion = expected["prompts"][0], expected["completions"][0]
    gen = ["generate", run, "-p", prompt, "--max-new-tokens", expected["max_new_tokens"]]
    want = prompt + completion + "\n"
    assert ok(capsys, *gen) == want  # the saved routing.router (centroid)
    assert ok(capsys, *gen, "routing.router=centroid", "routing.knn_k=5", "train.device=cpu") == want
    assert ok(capsys, *gen, "--router", "centroid", "--device", "cpu") == want
    # the override reaches the run: knn needs the (here missing) data directory, centroid does not
    line = one_line_error(capsys, *gen, "routing.router=knn", "data.dir=nowhere")
    assert "nowhere: not a prepared data directory" in line
    assert ok(capsys, *gen, "routing.router=centroid", "data.dir=nowhere") == want
    for command in (gen, ["eval", run, "--quiet"]):
        for item in ("model.d_model=64", "routing.depth=3", "data.seq_len=16", "routing.encoder=minilm"):
            key = item.split("=")[0]
            line = one_line_error(capsys, *command, item)
            assert line.startswith(f"error: override {key}: fixed when the run was trained"), line
        line = one_line_error(capsys, *command, "--router", "knn", "routing.router=centroid")
        assert line == "error: --router knn and routing.router=centroid disagree: give one of them"
        line = one_line_error(capsys, *command, "routing.rooter=knn")
        assert "routing.rooter" in line


def test_params_of_a_cotrain_preset_without_a_run(capsys):
    out = ok(capsys, "params", "-c", "paper-160m")  # the preset's header comment gives these counts
    report = {k.strip(): int(v.replace(",", "")) for k, v in (line.split(":") for line in out.splitlines())}
    assert (report["anchor"], report["fetched"], report["bank"]) == (163_510_016, 18_063_360, 4_624_220_160)


def test_resuming_a_run_killed_after_its_last_checkpoint_reports_no_step_left(longtail_data, tmp_path, capsys):
    """A crash between the final checkpoint and train_summary.json: --resume has no step left to run; it
    writes the summary and prints '-' for the loss instead of failing on a missing number."""
    args = ["train", "-c", "tiny", *longtail_data, "train.max_steps=2", f"train.run_dir={tmp_path / 'r'}", "--quiet"]
    ok(capsys, *args)
    (tmp_path / "r" / "train_summary.json").unlink()
    out = ok(capsys, *args, "--resume")
    assert "2 steps" in out and "final loss -;" in out
    assert json.loads((tmp_path / "r" / "train_summary.json").read_text())["steps"] == 2
