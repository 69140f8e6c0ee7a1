import pytest

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
    with pytest.raises(HiermemError, match=r"train\.mode=frozen needs train\.init_from"):
        load_config("tiny", ["train.mode=frozen"])


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


def test_paper_presets_load():
    for name in ("paper-160m", "paper-410m", "gpu"):
        assert load_config(name).name == name
