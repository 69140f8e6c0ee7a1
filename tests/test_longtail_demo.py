"""hiermem_experiments.longtail.demo and .jobs without training: presets, job configs, the job graph, the CLI.
The end-to-end run (`hiermem demo --quick`) is tests/test_demo.py."""

import dataclasses
import json
from pathlib import Path

import pytest

from hiermem.cli import main
from hiermem.errors import HiermemError
from hiermem_experiments.longtail.corpus import LongTailConfig
from hiermem_experiments.longtail.demo import (DEFAULT_PRESET, PRESET_DIR, ROWS, DemoSpec, default_out, job_configs,
                                               load_spec)
from hiermem_experiments.longtail.jobs import depends, evals, job_costs, trainings

# What each preset holds (the former default_spec(), values verbatim; demo-cpu became 2 epochs without the
# anchor_staged control to fit the 10-minute budget, then one cosine over both phases with memory LR 3e-3 so that
# common text does not pay; demo-full keeps the former 3-epoch default and its restarted schedule).
_RESTART = dict(phase2_schedule="restart", memory_lr=1e-2, memory_lr_min=1e-3)
_GPU = ("train.device=auto", "routing.max_tokens=16", "data.val_fraction=0.0")
FORMER = {
    "demo-cpu": DemoSpec(),
    "demo-full": DemoSpec(epochs=3, staged_control=True, **_RESTART),
    "demo-quick": DemoSpec(corpus=LongTailConfig(n_entities=300, n_unseen=40, head_mentions=60, n_background=250,
                                                 n_heldout_background=40, n_heldout_facts=60),
                           overrides=("routing.branching=8", "data.vocab_size=1024"), epochs=4, phase1_epochs=2,
                           memory_lr=1e-2, memory_lr_min=1e-3),
    "demo-gpu": DemoSpec(preset="gpu", overrides=(*_GPU, "data.seq_len=128", "model.max_seq_len=128",
                                                  "routing.depth=2", "memory.ranks=[128,128]", "train.batch_size=32"),
                         epochs=4, phase1_epochs=2, lr=1e-3, phase2_lr=1e-3, **_RESTART,
                         dense=("model.d_model=768", "model.n_heads=12", "model.d_ff=2048")),
    "demo-160m": DemoSpec(preset="paper-160m", overrides=(
        *_GPU, "data.vocab_size=8192", "model.vocab_size=0", "data.seq_len=512", "model.max_seq_len=512",
        "routing.depth=3", "routing.router=knn", "memory.ranks=[256,64,16]", "memory.mmap=false",
        "train.mode=anchor", "train.grad_accum=1", "train.warmup_steps=100"),
        epochs=4, phase1_epochs=2, lr=1e-3, phase2_lr=1e-3, phase2_schedule="restart", memory_lr=1e-3,
        memory_lr_min=1e-4,
        dense=("model.d_model=768", "model.n_heads=16", "model.head_dim=48", "model.d_ff=3072")),
}
# the default (cpu) preset, field by field: the YAML must not drift from it
FORMER_CPU = {"preset": "small", "overrides": (), "user_overrides": (), "epochs": 2, "phase1_epochs": 1,
              "lr": 2e-3, "phase2_schedule": "continue", "phase2_lr": 2e-3, "memory_lr": 2e-3,
              "memory_lr_min": 2e-4,
              "dense": ("model.d_model=192", "model.n_heads=6", "model.d_ff=512"), "knn_k": 10, "max_new_tokens": 10,
              "staged_control": False, "corpus": {"seed": 0, "n_entities": 2000, "n_unseen": 250, "head_mentions": 200, "zipf_exponent": 0.606,
                         "min_mentions": 2, "n_background": 1500, "background_words": 55, "distractor_prob": 0.3,
                         "reversed_prob": 0.1, "other_fact_prob": 0.15, "min_population": 15000,
                         "max_per_country": 16, "n_heldout_background": 200, "n_heldout_facts": 300}}


def test_presets_reproduce_the_former_specs_exactly():
    assert sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) == sorted(FORMER)
    for name, want in FORMER.items():
        got = load_spec(name)
        assert got == want, name
        assert all(type(getattr(got, f.name)) is type(getattr(want, f.name)) for f in dataclasses.fields(DemoSpec))
    assert dataclasses.asdict(load_spec()) == FORMER_CPU and DEFAULT_PRESET == "demo-cpu"


def test_demo_presets_do_not_share_names_with_training_presets():
    from hiermem.config import PRESET_DIR as TRAINING_PRESETS

    training = {p.stem for p in TRAINING_PRESETS.glob("*.yaml")}
    assert training and not training & set(FORMER)
    assert all(load_spec(n).preset in training for n in FORMER)  # each names the training preset it starts from


def test_default_output_folders():
    assert [str(default_out(n)) for n in FORMER] == ["runs/demo", "runs/demo-full", "runs/demo-quick", "runs/demo-gpu", "runs/demo-160m"]


def _yaml(tmp_path, text, name="mine.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,msg", [
    ("epochs: 2\nwarmup: 3\n", "unknown key 'warmup'"),
    ("corpus:\n  n_entities: 10\n  elements: true\n", "unknown key 'corpus.elements'"),
    ("epochs: many\n", "epochs"),
    ("epochs: [1\n", "invalid YAML"),
    ("- epochs\n", "mapping"),
    ("user_overrides: [train.lr=1]\n", "user_overrides"),
])
def test_a_bad_preset_is_a_one_line_error_naming_the_file_and_key(tmp_path, text, msg):
    path = _yaml(tmp_path, text)
    with pytest.raises(HiermemError) as err:
        load_spec(str(path))
    assert str(err.value).startswith(f"{path}: ") and msg in str(err.value) and "\n" not in str(err.value)


def test_a_preset_yaml_with_an_unknown_key_fails_on_the_command_line(tmp_path, capsys):
    path = _yaml(tmp_path, "epochs: 2\nwarmup: 3\n")
    assert main(["demo", "--preset", str(path), "--quiet", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}: unknown key 'warmup'\n"
    assert not (tmp_path / "out").exists()


def test_a_partial_preset_keeps_the_defaults_and_coerces_numbers(tmp_path):
    path = _yaml(tmp_path, "epochs: 5\nlr: 1e-3\ncorpus: {n_entities: 50}\n")  # PyYAML reads 1e-3 as a string
    spec = load_spec(str(path))
    assert spec == dataclasses.replace(DemoSpec(), epochs=5, lr=1e-3,
                                       corpus=dataclasses.replace(LongTailConfig(), n_entities=50))


def test_unknown_and_old_preset_names(capsys):
    with pytest.raises(HiermemError, match="unknown preset 'cpu' .*demo-160m, demo-cpu, demo-full, demo-gpu, demo-quick"):
        load_spec("cpu")
    assert main(["demo", "--quick", "--preset", "demo-gpu"]) == 2
    assert "--quick" in capsys.readouterr().err


@pytest.mark.parametrize("staged", [False, True])
def test_job_graph_is_consistent(tmp_path, staged):
    spec = dataclasses.replace(load_spec("demo-quick"), staged_control=staged)
    configs = job_configs(spec, tmp_path)
    graph = depends(spec)
    assert set(job_costs(spec)) == set(graph) and set(configs) == set(trainings(spec))
    assert ("anchor_staged" in configs) == staged and ("eval_anchor_staged" in graph) == staged
    assert set(evals(spec).values()) == set(configs) - {"phase1"}
    assert all(set(d) <= set(graph) for d in graph.values())
    assert {run for run, _, _ in ROWS.values()} - {"anchor_staged"} <= set(configs)
    assert configs["memory"].train.init_from == str(configs["phase1"].run_dir)
    # every model sees the same number of epochs over the same corpus
    total = configs["anchor"].train.epochs
    assert configs["phase1"].train.epochs + configs["memory"].train.epochs == total
    if staged:
        assert configs["anchor_staged"].train.init_from == str(configs["phase1"].run_dir)
        assert configs["phase1"].train.epochs + configs["anchor_staged"].train.epochs == total
    assert configs["dense2x"].train.epochs == total
    assert configs["dense2x"].model.d_model > configs["anchor"].model.d_model
    assert all(c.routing.branching == 8 and c.data.vocab_size == 1024 for c in configs.values())


def test_demo_overrides_reach_every_run(tmp_path, capsys):
    """Dot-list overrides after `hiermem demo` are applied (and checked) for every run's config."""
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path), "train.lr=fast"]) == 2
    assert "train.lr" in capsys.readouterr().err
    spec = dataclasses.replace(load_spec("demo-quick"), user_overrides=("memory.generic_prob=0.25", "train.lr=5e-4"))
    configs = job_configs(spec, tmp_path)
    assert all(c.memory.generic_prob == 0.25 and c.train.lr == 5e-4 for c in configs.values())


def test_spec_json_round_trips_for_the_eval_jobs():
    """The evaluation subprocesses rebuild the DemoSpec from spec.json (without the corpus)."""
    spec = load_spec("demo-gpu")
    stored = json.loads(json.dumps(dataclasses.asdict(spec), default=list))
    back = DemoSpec(**{k: v for k, v in stored.items() if k != "corpus"})
    assert (back.max_new_tokens, back.knn_k, list(back.overrides)) == (spec.max_new_tokens, spec.knn_k,
                                                                       list(spec.overrides))


def test_a_finished_training_counts_as_done_under_a_relative_output_folder(tmp_path, monkeypatch):
    """The trainer saves its config with absolute paths; the scheduler must still recognise the run as done
    when the demo's folder was given relative to the working directory (the default runs/demo)."""
    from hiermem.config import resolve_paths, save_config
    from hiermem_experiments.longtail.jobs import _done

    monkeypatch.chdir(tmp_path)
    configs = job_configs(load_spec("demo-quick"), Path("runs/demo"))
    cfg = configs["anchor"]
    cfg.model.vocab_size = 1024  # as resolved before the trainings start
    cfg.run_dir.mkdir(parents=True)
    save_config(resolve_paths(cfg), cfg.run_dir / "config.yaml")  # what the trainer writes
    (cfg.run_dir / "train_summary.json").write_text("{}")
    assert _done("anchor", configs, Path("runs/demo"))
    cfg.train.lr *= 2  # another setting: not done
    assert not _done("anchor", configs, Path("runs/demo"))
