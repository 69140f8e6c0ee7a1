import json

import pytest

from hiermem.errors import HiermemError
from hiermem.eval.probes import (evaluate_probes, extract_answer, format_table, frequency_bucket, is_correct,
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


def test_frequency_bucket_is_powers_of_two():
    cases = {0: "unseen", -1: "unseen", 1: "1", 2: "2-3", 3: "2-3", 4: "4-7", 7: "4-7", 8: "8-15", 15: "8-15",
             16: "16-31", 200: "128-255", 1024: "1024-2047"}
    assert {f: frequency_bucket(f) for f in cases} == cases


def _predict_even(calls=None):
    def predict(batch):
        if calls is not None:
            calls.append(len(batch))
        # right for even prompts, and for France
        return [" France." if p["answer"] == "France" else (f" {p['answer']}." if int(p["answer"]) % 2 == 0
                                                            else " 99") for p in batch]
    return predict


PROBES = [{"prompt": f"p{i}", "answer": str(i), "frequency": f} for i, f in enumerate([0, 0, 2, 3, 4, 30])]
PROBES += [{"prompt": "g", "answer": "France", "group": "text"}, {"prompt": "h", "answer": "9"}]


def test_evaluate_probes_groups_by_frequency_bucket():
    calls = []
    res = evaluate_probes(PROBES, _predict_even(calls), batch_size=3, progress=False)
    assert calls == [3, 3, 2]
    # frequency buckets rarest first, then explicit groups, then "all" (no group, no frequency)
    assert res["groups"] == ["unseen", "2-3", "4-7", "16-31", "text", "all"]
    assert res["per_group"]["unseen"] == {"n": 2, "correct": 1, "accuracy": 50.0}
    assert res["per_group"]["2-3"] == {"n": 2, "correct": 1, "accuracy": 50.0}
    assert res["per_group"]["4-7"] == {"n": 1, "correct": 1, "accuracy": 100.0}
    assert res["per_group"]["16-31"]["correct"] == 0 and res["per_group"]["text"]["accuracy"] == 100.0
    assert res["per_group"]["all"] == {"n": 1, "correct": 0, "accuracy": 0.0}
    assert res["n"] == 8 and res["accuracy"] == pytest.approx(100 * 4 / 8)
    assert res["predictions"][2] == {"prompt": "p2", "answer": "2", "completion": " 2.", "correct": True,
                                     "group": "2-3"}
    assert json.loads(json.dumps(res)) == res  # plain JSON as is: a lossless round trip


def test_evaluate_probes_group_field_wins_and_group_of_and_bucket_order():
    # a caller-supplied rule for frequencies (the demo passes its own buckets)
    res = evaluate_probes(PROBES, _predict_even(), group_of=lambda f: "rare" if f < 3 else "common",
                          progress=False)
    assert res["groups"] == ["rare", "common", "text", "all"]
    assert {g: res["per_group"][g]["n"] for g in res["groups"]} == {"rare": 3, "common": 3, "text": 1, "all": 1}
    # an explicit group wins over a frequency; explicit groups with frequencies are ordered rarest first too
    probes = [{"prompt": "a", "answer": "2", "frequency": 50, "group": "head"},
              {"prompt": "b", "answer": "2", "frequency": 1, "group": "tail"}, {"prompt": "c", "answer": "2"}]
    assert evaluate_probes(probes, _predict_even(), progress=False)["groups"] == ["tail", "head", "all"]
    # `buckets` fixes the order of the labels it names; the rest follow
    res2 = evaluate_probes(PROBES, _predict_even(), buckets=["16-31", "2-3"], progress=False)
    assert res2["groups"] == ["16-31", "2-3", "unseen", "4-7", "text", "all"]

    res = evaluate_probes(PROBES, _predict_even(), progress=False)
    table = format_table({"anchor": res, "memory": res2}, ["unseen", "2-3", "8-15", "16-31"])
    lines = table.splitlines()
    assert lines[0].split() == ["model", "unseen", "2-3", "8-15", "16-31", "all"]
    assert lines[2].split() == ["anchor", "50.0", "50.0", "-", "0.0", "50.0"]
    assert lines[3].startswith("memory")


def test_evaluate_probes_rejects_wrong_length():
    with pytest.raises(ValueError):
        evaluate_probes([{"prompt": "a", "answer": "b"}], lambda batch: [], progress=False)


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
