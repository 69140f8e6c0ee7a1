"""memory/spec.py: the bank's shape (levels, parts, layer placement), its validation and parameter accounting."""

import pytest

from hiermem.config import load_config
from hiermem.errors import HiermemError
from hiermem.memory.spec import GENERIC, BankSpec, bank_param_counts, parameter_report, spec_from_config

SPEC = BankSpec(d=8, n_layers=4, ranks=(3, 0, 2), branching=3, layers=(1, 3))


def test_param_counts_match_the_paper():
    paper = BankSpec(d=512, n_layers=35, ranks=(256, 64, 16, 0), branching=16)
    c = bank_param_counts(paper)
    assert c["fetched"] == 18_063_360 and c["bank"] == 4_624_220_160
    assert c["generic"] == c["fetched"] and sum(c["per_level"]) == c["bank"] and c["per_level"][3] == 0
    loc = bank_param_counts(BankSpec(d=512, n_layers=35, ranks=(0, 64, 0, 0), branching=16, generic=False))
    assert loc["fetched"] == 3_440_640 and loc["bank"] == 880_803_840 and loc["generic"] == 0


@pytest.mark.parametrize("d,n_layers,ranks,fetched,bank", [
    (1024, 24, (512, 128, 32, 0), 49_545_216, 12_683_575_296),  # 410M, row B2 (docs/method.md §3.2)
    (2048, 24, (768, 256, 16, 0), 153_354_240, 21_139_292_160),  # 1.4B, row C2
    (512, 35, (0, 0, 16, 0), 860_160, 3_523_215_360),  # tokens-per-parameter study: 4,096 blocks of rank 16
])
def test_param_counts_of_the_other_paper_configurations(d, n_layers, ranks, fetched, bank):
    c = bank_param_counts(BankSpec(d=d, n_layers=n_layers, ranks=ranks, branching=16))
    assert (c["fetched"], c["bank"]) == (fetched, bank)
    # by hand: a block of rank r holds 3·r·L·d; level l has 16^(l+1) blocks
    assert c["per_level"] == [3 * r * n_layers * d * 16 ** (level + 1) for level, r in enumerate(ranks)]


def test_shapes_parts_and_layer_placement():
    assert SPEC.n_mem_layers == 2 and SPEC.first_layer == 1 and SPEC.fetched_rank == 5 and SPEC.depth == 3
    assert [SPEC.n_nodes(l) for l in range(3)] == [3, 9, 27]
    assert SPEC.level_parts() == [("level0", 0, 0, 3), ("level2", 2, 3, 2)]  # offsets along the fetched R
    assert SPEC.part_keys() == ["level0", "level2", GENERIC]
    assert SPEC.part_shape("level0") == (3, 2, 3, 3, 8) and SPEC.part_shape("level2") == (27, 2, 3, 2, 8)
    assert SPEC.part_shape(GENERIC) == (1, 2, 3, 5, 8)
    c = bank_param_counts(SPEC)  # by hand: 3·2·8 = 48 parameters per unit of rank
    assert c == {"fetched": 48 * 5, "bank": 48 * (3 * 3 + 2 * 27), "generic": 48 * 5, "per_level": [432, 0, 2592]}
    full = BankSpec(d=8, n_layers=4, ranks=(1,), branching=2, generic=False)
    assert full.n_mem_layers == 4 and full.first_layer == 0 and full.part_keys() == ["level0"]
    assert full.std == 8 ** -0.5 and BankSpec(d=8, n_layers=4, ranks=(1,), branching=2, init_std=0.1).std == 0.1


@pytest.mark.parametrize("kw,match", [
    (dict(layers=(2, 5)), r"memory.layers"),
    (dict(layers=(3, 3)), r"memory.layers"),
    (dict(layers=(1,)), r"memory.layers"),
    (dict(ranks=(0, 0)), r"memory.ranks"),
    (dict(ranks=()), r"memory.ranks"),
    (dict(ranks=(2, -1)), r"memory.ranks"),
    (dict(branching=0), r"memory.branching"),
    (dict(d=0), r"d and n_layers must be positive"),
    (dict(init_std=0.0), r"memory.init_std"),
])
def test_bad_specs_are_refused(kw, match):
    args = dict(d=8, n_layers=4, ranks=(1,), branching=2) | kw
    with pytest.raises(HiermemError, match=match):
        BankSpec(**args)


def test_dict_round_trip_and_unknown_fields():
    d = SPEC.to_dict()
    assert d["ranks"] == [3, 0, 2] and d["layers"] == [1, 3]
    assert BankSpec.from_dict(d) == SPEC
    assert BankSpec.from_dict(BankSpec(d=8, n_layers=4, ranks=(1,), branching=2).to_dict()).layers is None
    with pytest.raises(HiermemError, match=r"unknown field\(s\) colour"):
        BankSpec.from_dict(d | {"colour": "red"})
    with pytest.raises(HiermemError, match=r"bank spec:"):
        BankSpec.from_dict({"d": 8})


def test_spec_from_config_and_parameter_report():
    cfg = load_config("paper-160m")
    spec = spec_from_config(cfg)
    assert spec == BankSpec(d=512, n_layers=35, ranks=(256, 64, 16, 0), branching=16)
    assert parameter_report(cfg) == {"anchor": 163_510_016, "fetched": 18_063_360, "bank": 4_624_220_160,
                                     "generic": 18_063_360}
    assert parameter_report(load_config("paper-160m", ["train.mode=anchor"])) == {"anchor": 163_510_016}
    placed = load_config("paper-160m", ["memory.generic=false", "memory.layers=[5,35]", "memory.init_std=0.01"])
    spec = spec_from_config(placed)
    assert spec.layers == (5, 35) and spec.first_layer == 5 and not spec.generic and spec.init_std == 0.01
    # 30 of 35 layers: 30/35 of the counts above
    assert parameter_report(placed) == {"anchor": 163_510_016, "fetched": 15_482_880, "bank": 3_963_617_280,
                                        "generic": 0}
