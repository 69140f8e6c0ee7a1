"""The long-tail demo's frequency buckets and its no-model baseline, the leaf prior.

Buckets by training mentions, rarest first: "unseen" (0), then one bucket per edge of ``BUCKET_EDGES``
(2 / 3-4 / 5-9 / 10-24 / 25+ with the default edges; the corpus mentions every seen city at least twice, so
the "1" bucket stays empty). These are the prototype's buckets (docs/method.md §9); the library's probes use a
generic rule of their own (``hiermem.eval.probes.frequency_bucket``) unless a caller passes ``bucket_of``.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from hiermem.eval.probes import is_correct

# Lower edges of the mention-count buckets; 0 mentions is "unseen".
BUCKET_EDGES: tuple[int, ...] = (2, 3, 5, 10, 25)


def _span(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


def bucket_labels(edges: tuple[int, ...] = BUCKET_EDGES) -> list[str]:
    """All labels, rarest first: "unseen", [1..edges[0]-1], then one per edge, the last open-ended."""
    labels = ["unseen"] + ([_span(1, edges[0] - 1)] if edges[0] > 1 else [])
    labels += [_span(lo, hi - 1) for lo, hi in zip(edges, edges[1:])]
    return labels + [f"{edges[-1]}+"]


def accuracy_by_bucket(probes: list[dict], predict, buckets: list[str]) -> tuple[list[float], float]:
    """Exact match % of `probes` answered by `predict`, per bucket of `buckets` (0 for an empty one), and over
    all of them: the demo's report rows."""
    from hiermem.eval.probes import evaluate_probes

    r = evaluate_probes(probes, predict, buckets=buckets, group_of=bucket_of, progress=False)
    return [r["per_group"].get(b, {}).get("accuracy", 0.0) for b in buckets], r["accuracy"]


def bucket_of(frequency: int, edges: tuple[int, ...] = BUCKET_EDGES) -> str:
    """The label of a mention count (see ``bucket_labels``)."""
    if frequency <= 0:
        return "unseen"
    if frequency < edges[0]:
        return _span(1, edges[0] - 1)
    for lo, hi in zip(edges, edges[1:]):
        if frequency < hi:
            return _span(lo, hi - 1)
    return f"{edges[-1]}+"


def leaf_prior(probe_leaves: np.ndarray, probe_answers: list[str], probe_entities: list[str],
               train_entity_leaves: dict[str, int], train_entity_answers: dict[str, str]) -> np.ndarray:
    """Per probe: is the most common answer among the OTHER training entities in its routed leaf right?

    The no-model baseline of docs/method.md §9 (lesson 3): a fact the cluster can give away (a city's country)
    scores well without any memory. `train_entity_leaves` maps each training entity to its main leaf.
    Ties go to the alphabetically first answer; a leaf holding no other entity counts as wrong.
    """
    by_leaf: dict[int, Counter] = defaultdict(Counter)
    for ent, leaf in train_entity_leaves.items():
        if ent in train_entity_answers:
            by_leaf[int(leaf)][train_entity_answers[ent]] += 1
    out = np.zeros(len(probe_answers), dtype=bool)
    for i, (leaf, gold, ent) in enumerate(zip(np.asarray(probe_leaves).tolist(), probe_answers, probe_entities)):
        counts = Counter(by_leaf.get(int(leaf), Counter()))
        if train_entity_leaves.get(ent) == leaf and ent in train_entity_answers:
            counts[train_entity_answers[ent]] -= 1  # leave the probe's own entity out
        counts = +counts  # drop zero counts
        if counts:
            top = max(counts.values())
            guess = min(a for a, c in counts.items() if c == top)
            out[i] = is_correct(guess, gold)
    return out
