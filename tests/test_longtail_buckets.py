"""hiermem_experiments.longtail.buckets: the demo's frequency buckets and the leaf-prior baseline."""

import numpy as np

from hiermem.eval.probes import evaluate_probes
from hiermem_experiments.longtail.buckets import BUCKET_EDGES, bucket_labels, bucket_of, leaf_prior


def test_buckets():
    assert BUCKET_EDGES == (2, 3, 5, 10, 25)
    assert bucket_labels() == ["unseen", "1", "2", "3-4", "5-9", "10-24", "25+"]
    cases = {0: "unseen", 1: "1", 2: "2", 3: "3-4", 4: "3-4", 5: "5-9", 9: "5-9", 10: "10-24", 24: "10-24",
             25: "25+", 200: "25+"}
    for freq, label in cases.items():
        assert bucket_of(freq) == label
    assert bucket_of(7, (1, 5)) == "5+" and bucket_of(3, (1, 5)) == "1-4"


def test_demo_buckets_through_the_library_probes():
    """The demo passes bucket_of to evaluate_probes: probes with only a frequency get the demo's buckets,
    reported rarest first, exactly as the demo's table lists them."""
    freqs = [30, 0, 4, 2, 12, 3, 7, 0]
    probes = [{"prompt": f"p{i}", "answer": "1", "frequency": f} for i, f in enumerate(freqs)]
    res = evaluate_probes(probes, lambda batch: [" 1."] * len(batch), group_of=bucket_of, progress=False)
    assert res["groups"] == ["unseen", "2", "3-4", "5-9", "10-24", "25+"]
    assert [p["group"] for p in res["predictions"]] == [bucket_of(f) for f in freqs]
    assert res["per_group"]["3-4"] == {"n": 2, "correct": 2, "accuracy": 100.0}
    # with the corpus's bucket list the order is the list's
    res = evaluate_probes(probes, lambda batch: [" 1."] * len(batch), buckets=bucket_labels(),
                          group_of=bucket_of, progress=False)
    assert res["groups"] == ["unseen", "2", "3-4", "5-9", "10-24", "25+"]


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


def test_accuracy_by_bucket_lists_every_bucket_in_order_with_zero_for_empty_ones():
    from hiermem_experiments.longtail.buckets import accuracy_by_bucket, bucket_labels

    probes = [{"prompt": "a", "answer": "1", "group": "2"}, {"prompt": "b", "answer": "2", "group": "2"},
              {"prompt": "c", "answer": "3", "group": "25+"}, {"prompt": "d", "answer": "4", "group": "unseen"}]
    answers = {"a": "1", "b": "no", "c": "3", "d": "no"}
    per_bucket, overall = accuracy_by_bucket(probes, lambda recs: [answers[r["prompt"]] for r in recs],
                                             bucket_labels())
    assert per_bucket == [0.0, 0.0, 50.0, 0.0, 0.0, 0.0, 100.0]  # unseen, 1, 2, 3-4, 5-9, 10-24, 25+
    assert overall == 50.0
