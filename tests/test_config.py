import dataclasses

import pytest
import yaml

from hiermem import config as C
from hiermem.config import Config, diff_fields, dump_config, from_dict, load_config, read_config, save_config, to_dict
from hiermem.errors import HiermemError


def test_preset_and_overrides_apply_with_types():
    cfg = load_config("tiny", ["train.lr=3e-4", "memory.ranks=[8,4]", "model.tie_embeddings=false"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert list(cfg.memory.ranks) == [8, 4]
    assert cfg.model.tie_embeddings is False
    assert cfg.name == "tiny"


def test_unknown_key_is_named():
    with pytest.raises(HiermemError, match=r"train\.lrr|lrr"):
        load_config("tiny", ["train.lrr=1"])


def test_wrong_type_is_named():
    with pytest.raises(HiermemError, match=r"model\.d_model"):
        load_config("tiny", ["model.d_model=wide"])


def test_bad_choice_and_consistency_checks_name_the_field():
    with pytest.raises(HiermemError, match=r"train\.mode='sideways'"):
        load_config("tiny", ["train.mode=sideways"])
    with pytest.raises(HiermemError, match=r"memory\.ranks has 3 levels but routing\.depth is 2"):
        load_config("tiny", ["memory.ranks=[1,2,3]"])
    with pytest.raises(HiermemError, match=r"data\.seq_len=256 exceeds model\.max_seq_len=128"):
        load_config("tiny", ["data.seq_len=256"])


def test_invalid_choice_names_the_field_and_its_allowed_values():
    declared = {k: f.metadata["choices"] for k, f in C.fields().items() if f.metadata.get("choices")}
    assert {"train.mode", "train.device", "train.dtype", "routing.encoder", "routing.long_docs", "routing.router",
            "memory.generic_sampling", "model.attention", "data.packing"} <= set(declared)
    for key, allowed in declared.items():
        assert C.default(key) in allowed, key
        with pytest.raises(HiermemError) as e:
            load_config("tiny", [f"{key}=sideways"])
        assert str(e.value) == f"config: {key}='sideways' is not one of {', '.join(allowed)}"
    assert C.choices("routing.router") == ("centroid", "knn")


def test_bounds_are_declared_once_and_shared_with_the_encoder():
    from hiermem.routing.embedders import MINILM_MAX_TOKENS, make_embedder

    assert MINILM_MAX_TOKENS == 256
    for bad in (2, 257):
        with pytest.raises(HiermemError, match=rf"^config: routing\.max_tokens must be in 3\.\.256 \(got {bad}\)$"):
            load_config("tiny", [f"routing.max_tokens={bad}"])
        with pytest.raises(HiermemError, match=rf"^routing\.max_tokens must be in 3\.\.256 \(got {bad}\)$"):
            make_embedder("minilm", bad, "truncate")  # the same rule, not a restatement
    assert load_config("tiny", ["routing.max_tokens=3"]).routing.max_tokens == 3
    with pytest.raises(HiermemError, match=r"^config: model\.n_layers must be positive \(got 0\)$"):
        load_config("tiny", ["model.n_layers=0"])


def test_every_field_has_one_line_help_and_help_text_lists_defaults():
    info = C.fields()
    assert "train.lr" in info and "name" in info and len(info) > 60
    for key, f in info.items():
        text = f.metadata.get("help", "")
        assert text and "\n" not in text, key
    text = C.fields_help()
    assert "  train.lr=0.002 " in text and "peak learning rate of the anchor" in text
    assert "  memory.ranks=[] " in text and "  memory.layers=null " in text and "  data.corpus='' " in text
    assert "\ntrain: training mode" in text  # grouped by section
    assert all(f"  {k}=" in text for k in info)


def test_training_needs_init_from_for_frozen_and_cotrain():
    # deliberately moved out of validate(): a cotrain preset loads without a run to start from
    # (`hiermem params -c paper-160m`); the Trainer calls check_training
    for mode in ("frozen", "cotrain"):
        cfg = load_config("tiny", [f"train.mode={mode}"])
        with pytest.raises(HiermemError, match=rf"^config: train\.mode={mode} needs train\.init_from"):
            C.check_training(cfg)
        C.check_training(load_config("tiny", [f"train.mode={mode}", "train.init_from=runs/anchor"]))
    C.check_training(load_config("tiny"))
    C.check_training(load_config("tiny", ["train.mode=scratch"]))


def test_a_trained_run_takes_only_inference_time_overrides():
    assert set(C.inference_keys()) >= {"routing.router", "routing.knn_k", "train.device", "memory.cache_bytes",
                                       "memory.mmap", "data.dir"}
    C.check_run_overrides(["routing.router=centroid", "routing.knn_k=5", "train.device=cpu",
                           "memory.cache_bytes=1000000", "memory.mmap=true"])
    C.check_run_overrides(["routing.rooter=knn"])  # unknown: left for read_config to name against the dataclasses
    for item in ("model.d_model=64", "memory.ranks=[4,4]", "memory.layers=[0,1]", "routing.depth=3",
                 "routing.branching=4", "routing.encoder=minilm", "data.seq_len=16", "train.lr=1", "model={}"):
        key = item.split("=")[0]
        with pytest.raises(HiermemError, match=rf"^override {key}: fixed when the run was trained") as e:
            C.check_run_overrides(["routing.router=knn", item])
        assert "\n" not in str(e.value)


def test_bad_override_syntax_and_unknown_preset():
    with pytest.raises(HiermemError, match="expected key=value"):
        load_config("tiny", ["train.lr"])
    with pytest.raises(HiermemError, match="unknown preset 'nope'"):
        load_config("nope")


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: [\n")
    with pytest.raises(HiermemError, match="bad.yaml: invalid YAML"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  widht: 3\n")
    with pytest.raises(HiermemError, match=r"unknown\.yaml.*widht"):
        load_config(str(unknown))


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("small", ["train.seed=7", "memory.layers=[1,3]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = read_config(tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert diff_fields(to_dict(cfg), to_dict(load_config("small"))) == [
        "memory.layers (None vs [1, 3])".replace("None vs [1, 3]", "[1, 3] vs None"), "train.seed (7 vs 0)"]
    assert "name: small" in dump_config(cfg)
    assert from_dict(to_dict(Config())).train.mode == "anchor"


def test_presets_load_and_apply_every_value():
    for name in ("tiny", "small", "paper-160m", "paper-410m", "gpu"):
        cfg = load_config(name)
        written = yaml.safe_load(C.preset_path(name).read_text())
        got = to_dict(cfg)
        for section, values in written.items():
            if isinstance(values, dict):
                assert {k: got[section][k] for k in values} == values, (name, section)
            else:
                assert got[section] == values, (name, section)
        assert to_dict(cfg) != to_dict(Config()), name
    assert load_config("paper-160m").train.mode == "cotrain"  # loads without train.init_from (see check_training)


def test_config_dataclasses_declare_every_field_with_setting():
    for section in (C.ModelConfig, C.MemoryConfig, C.RoutingConfig, C.DataConfig, C.TrainConfig, C.Config):
        for f in dataclasses.fields(section):
            assert "help" in f.metadata, f"{section.__name__}.{f.name}"
