import json

import numpy as np
import pytest

from hiermem.errors import HiermemError
from hiermem.eval.probes import (evaluate_probes, extract_answer, format_table, is_correct, leaf_prior,
                                 load_probes)


@pytest.mark.parametrize("completion,answer,ok", [
    (" 150,000.", "150,000", True),
    (" about 150,000 people live there", "150,000", True),
    (" 1500000", "1,500,000", True),
    (" 1,500,000 and more", "1500000", True),
    (" 15,000.", "150,000", False),
    (" 150,000,000", "150,000", False),
    (" no idea, maybe 20,000 or 150,000", "150,000", False),  # only the first number counts
    (" nothing", "11", False),
    (" 11.", "11", True),
    (" 11 (sodium)", "11", True),
    (" 3.50 units", "3.5", True),
    (" France.", "France", True),
    (" france", "France", True),
    ("  United   States of America. It is", "United States of America", True),
    (" France, in western Europe.", "France", True),
    (" Frances", "France", False),
    (" a country. It is France.", "France", False),  # a later mention is wrong
    (" in the north of France", "France", False),
    (" U.S. Virgin Islands. Then", "U.S. Virgin Islands", True),
    ("\nFrance", "France", False),
    ("", "France", False),
])
def test_is_correct(completion, answer, ok):
    assert is_correct(completion, answer) is ok


def test_extract_answer():
    assert extract_answer(" about 150,000 people", "150,000") == "150000"
    assert extract_answer(" 1500000.", "1,500,000") == "1500000"
    assert extract_answer(" none", "7") == ""
    assert extract_answer(" France. It is big", "France") == "France"
    assert extract_answer(" Saint Kitts and Nevis!", "Saint Kitts and Nevis") == "Saint Kitts and Nevis"


def _write(tmp_path, lines):
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_load_probes(tmp_path):
    p = _write(tmp_path, ['{"prompt": "A is", "answer": 11, "frequency": 3, "extra": 1}', "",
                          '{"prompt": "B is", "answer": "x", "group": "rare", "route_text": "B"}',
                          '{"prompt": "C is", "answer": 2.0}'])
    probes = load_probes(p)
    assert [q["answer"] for q in probes] == ["11", "x", "2"]
    assert probes[0]["extra"] == 1 and probes[1]["route_text"] == "B"


@pytest.mark.parametrize("line,msg", [
    ("{not json", "malformed JSON"),
    ('["a"]', "JSON object"),
    ('{"answer": "x"}', '"prompt"'),
    ('{"prompt": "x"}', '"answer"'),
    ('{"prompt": 3, "answer": "x"}', '"prompt"'),
    ('{"prompt": "x", "answer": true}', '"answer"'),
    ('{"prompt": "x", "answer": "y", "frequency": "3"}', '"frequency"'),
    ('{"prompt": "x", "answer": "y", "group": 2}', '"group"'),
])
def test_load_probes_errors_name_file_and_line(tmp_path, line, msg):
    p = _write(tmp_path, ['{"prompt": "ok", "answer": "ok"}', line])
    with pytest.raises(HiermemError, match=f"p.jsonl:2: .*{msg}"):
        load_probes(p)


def test_load_probes_empty_and_missing(tmp_path):
    with pytest.raises(HiermemError, match="empty"):
        load_probes(_write(tmp_path, [""]))
    with pytest.raises(HiermemError, match="nope.jsonl"):
        load_probes(tmp_path / "nope.jsonl")


def test_evaluate_probes_groups_by_bucket():
    probes = [{"prompt": f"p{i}", "answer": str(i), "frequency": f} for i, f in enumerate([0, 0, 2, 3, 4, 30])]
    probes.append({"prompt": "g", "answer": "France", "group": "text"})
    probes.append({"prompt": "h", "answer": "9"})
    calls = []

    def predict(batch):
        calls.append(len(batch))
        # right for even prompts, and for France
        return [" France." if p["answer"] == "France" else (f" {p['answer']}." if int(p["answer"]) % 2 == 0
                                                            else " 99") for p in batch]

    res = evaluate_probes(probes, predict, batch_size=3, progress=False)
    assert calls == [3, 3, 2]
    assert res["groups"] == ["unseen", "2", "3-4", "25+", "text", "all"]
    assert res["per_group"]["unseen"] == {"n": 2, "correct": 1, "accuracy": 50.0}
    assert res["per_group"]["3-4"] == {"n": 2, "correct": 1, "accuracy": 50.0}
    assert res["per_group"]["25+"]["correct"] == 0 and res["per_group"]["text"]["accuracy"] == 100.0
    assert res["n"] == 8 and res["accuracy"] == pytest.approx(100 * 4 / 8)
    assert res["predictions"][2] == {"prompt": "p2", "answer": "2", "completion": " 2.", "correct": True,
                                     "group": "2"}
    json.dumps(res)  # serialisable as is
    res2 = evaluate_probes(probes, predict, buckets=["25+", "3-4"], progress=False)
    assert res2["groups"][:2] == ["25+", "3-4"] and set(res2["groups"]) == set(res["groups"])

    table = format_table({"anchor": res, "memory": res2}, ["unseen", "2", "3-4", "5-9", "25+"])
    lines = table.splitlines()
    assert lines[0].split() == ["model", "unseen", "2", "3-4", "5-9", "25+", "all"]
    assert lines[2].split() == ["anchor", "50.0", "100.0", "50.0", "-", "0.0", "50.0"]
    assert lines[3].startswith("memory")


def test_evaluate_probes_rejects_wrong_length():
    with pytest.raises(ValueError):
        evaluate_probes([{"prompt": "a", "answer": "b"}], lambda batch: [], progress=False)


def test_leaf_prior_hand_made():
    # training entities: leaf 0 holds two French and one Spanish city; leaf 1 one German city
    leaves = {"a": 0, "b": 0, "c": 0, "d": 1, "e": 2}
    answers = {"a": "France", "b": "France", "c": "Spain", "d": "Germany", "e": "Italy"}
    probe_leaves = np.array([0, 0, 1, 1, 0, 3, 2])
    probe_answers = ["France", "Spain", "Germany", "Germany", "France", "France", "Italy"]
    probe_entities = ["a", "c", "d", "x", "new", "y", "e"]
    got = leaf_prior(probe_leaves, probe_answers, probe_entities, leaves, answers)
    # a: others in leaf 0 = {France: 1, Spain: 1} -> tie -> "France" (alphabetical) -> right
    # c: others = {France: 2} -> wrong; d: leaf 1 holds no other entity -> wrong
    # x (unseen) routed to leaf 1: Germany -> right; new: {France 2, Spain 1} -> right
    # y: empty leaf -> wrong; e: alone in leaf 2 -> wrong
    assert got.tolist() == [True, False, False, True, True, False, False]
    assert got.dtype == bool


def test_leaf_prior_numeric_answers_compare_as_numbers():
    got = leaf_prior(np.array([0]), ["150,000"], ["p"], {"a": 0}, {"a": "150000"})
    assert got.tolist() == [True]


def test_answer_complete_never_stops_before_the_prediction_is_final():
    """If decoding stops where answer_complete says so, no continuation could change the prediction."""
    from hiermem.eval.probes import answer_complete

    cases = [("150,000", [" 150", ",000", ".", " It", " is"]), ("France", [" Fr", "ance", ".", " The"]),
             ("U.S. Virgin Islands", [" U", ".S", ".", " Virgin", " Islands", ".", " x"]),
             ("3.5", [" 3", ".", "5", " people"]), ("42", [" 4", "2", ",", " and"])]
    tails = ["", "0", ",000", ".5", " more", "\n", ". Next"]
    for gold, pieces in cases:
        text = ""
        for piece in pieces:
            text += piece
            if answer_complete(text, gold):
                for tail in tails:
                    assert extract_answer(text + tail, gold) == extract_answer(text, gold), (text, tail)
        assert answer_complete(text, gold), (gold, text)
