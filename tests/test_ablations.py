"""The ablation runner's variants (hiermem_experiments/longtail/ablations.py): configs, accounting and table.
Training the variants is the benchmark's job (`hiermem demo --ablation NAME`); here only what it is built from."""

import pytest

from hiermem.cli import build_parser
from hiermem.errors import HiermemError
from hiermem.memory.spec import bank_param_counts, spec_from_config
from hiermem_experiments.longtail.ablations import ABLATIONS, format_ablation, variant_configs
from hiermem_experiments.longtail.demo import load_spec


@pytest.fixture(scope="module")
def spec():
    return load_spec("demo-cpu")


def test_the_cli_offers_every_ablation_and_no_other():
    demo = build_parser()._subparsers._group_actions[0].choices["demo"]
    action = next(a for a in demo._actions if a.dest == "ablation")
    assert set(action.choices) == set(ABLATIONS)


def test_memory_kinds_are_compared_at_equal_fetched_parameters(spec, tmp_path):
    configs = variant_configs(spec, tmp_path, "kind")
    assert list(configs) == ["ffn", "lora_ffn", "lora_qk", "lora_vo", "kv"]
    fetched = {k: bank_param_counts(spec_from_config(c))["fetched"] for k, c in configs.items()}
    ffn = fetched["ffn"]
    assert ffn == 98_304  # the demo's (32, 32) FFN memory over 4 layers of d 128
    for kind, n in fetched.items():
        assert configs[kind].memory.kind == kind
        assert abs(n - ffn) / ffn < 0.05, (kind, n)  # rounding to whole ranks only


def test_every_variant_differs_from_the_memory_run_only_where_it_says(spec, tmp_path):
    from hiermem.config import diff_fields, to_dict
    from hiermem_experiments.longtail.demo import job_configs

    base = to_dict(job_configs(spec, tmp_path)["memory"])
    for name in ABLATIONS:
        for label, cfg in variant_configs(spec, tmp_path, name).items():
            changed = {d.split(" ")[0] for d in diff_fields(base, to_dict(cfg))} - {"name", "train.run_dir"}
            if changed:
                assert cfg.run_dir == tmp_path / "ablations" / name / "runs" / label
            else:  # the demo's memory run itself: reused, not retrained
                assert cfg.run_dir == tmp_path / "runs" / "memory", (name, label)
            if name == "depth":  # another tree: its own data directory
                assert cfg.data_dir == tmp_path / "ablations" / "depth" / "data" / label
                assert len(cfg.memory.ranks) == cfg.routing.depth
            assert changed <= {"memory.kind", "memory.ranks", "train.mode", "routing.depth", "data.dir",
                               "memory.generic_prob", "memory.layers", "memory.lr", "memory.lr_min",
                               "memory.weight_decay"}, (name, label, changed)
    assert not {d.split(" ")[0] for d in diff_fields(base, to_dict(variant_configs(spec, tmp_path, "anchor")[
        "cotrain"]))} - {"name", "train.run_dir"}  # the reference variant is the demo's memory run itself
    frozen = variant_configs(spec, tmp_path, "anchor")["frozen"]
    assert frozen.train.mode == "frozen" and variant_configs(spec, tmp_path, "anchor")["cotrain"].train.mode == "cotrain"


def test_an_unknown_ablation_is_one_line(spec, tmp_path):
    with pytest.raises(HiermemError, match="demo: unknown ablation 'nope'; choose from kind, anchor, ranks"):
        variant_configs(spec, tmp_path, "nope")


def test_the_table_shows_baselines_and_variants():
    m = {"accuracy": [1.0, 2.0], "overall": 1.5, "perplexity_real_text": 150.0}
    report = {"ablation": "anchor", "title": "frozen vs co-trained anchor in phase 2", "buckets": ["2", "3-4"],
              "baselines": {"anchor": m},
              "variants": {"frozen": {"fetched_knn": dict(m, accuracy=[10.0, 20.0]), "memory_off": m,
                                      "fetched_params": 98304, "bank_params": 13369344, "job_cpu_s": 12.0}},
              "wall_time_s": 30.0}
    lines = format_ablation(report).splitlines()
    assert lines[3].split() == ["anchor", "1.0", "2.0", "1.5", "150.00", "-", "-", "-"]
    assert lines[4].split() == ["frozen", "10.0", "20.0", "1.5", "150.00", "150.00", "98,304", "13,369,344"]
    assert lines[-1] == "wall time 30s; CPU s per variant (0 = cached): frozen 12"


def test_the_memory_run_continues_the_anchors_schedule(spec, tmp_path):
    from hiermem_experiments.longtail.demo import job_configs

    configs = job_configs(spec, tmp_path)
    assert configs["phase1"].train.lr_span == [0.0, 0.5] and configs["memory"].train.lr_span == [0.5, 1.0]
    assert configs["memory"].train.init_optimizer and configs["memory"].train.lr == configs["anchor"].train.lr
    assert configs["anchor"].train.lr_span == [0.0, 1.0]
