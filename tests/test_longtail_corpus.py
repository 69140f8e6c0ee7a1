"""hiermem_experiments.longtail.corpus: the long-tail corpus (real city facts, Zipf mentions, Wikipedia leads)."""

import dataclasses
import json
import re
from collections import Counter

import pytest

from hiermem.data.wiki import wiki_leads
from hiermem.errors import HiermemError
from hiermem_experiments.longtail import corpus as lt
from hiermem_experiments.longtail.buckets import bucket_of
from hiermem_experiments.longtail.corpus import LongTailConfig, build_corpus, write_corpus

SMALL = LongTailConfig(seed=3, n_entities=150, n_unseen=40, head_mentions=30, n_background=60)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(SMALL)


def test_zipf_counts_follow_the_formula(corpus):
    seen = [e for e in corpus.entities if e["mentions"] > 0]
    assert [e["rank"] for e in seen] == list(range(1, SMALL.n_entities + 1))
    for e in seen:
        i = e["rank"]
        assert e["mentions"] == max(SMALL.min_mentions, round(SMALL.head_mentions * i ** -SMALL.zipf_exponent))
    assert seen[0]["mentions"] == SMALL.head_mentions and seen[-1]["mentions"] == SMALL.min_mentions
    assert lt.zipf_mentions(3, 200, 0.606, 2) == [200, 131, 103]


def test_default_head_and_tail_match_the_prototype():
    counts = lt.zipf_mentions(2000, 200, 0.606, 2)
    sizes = Counter(bucket_of(c) for c in counts)
    # docs/method.md §9: 617 / 859 / 372 / 121 / 31 (rounding ties may move an entity or two)
    for label, want in {"2": 617, "3-4": 859, "5-9": 372, "10-24": 121, "25+": 31}.items():
        assert abs(sizes[label] - want) <= 3


def test_one_document_per_mention_and_unseen_never_in_text(corpus):
    per_entity = Counter(d["entity"] for d in corpus.documents if d["kind"] == "fact")
    for e in corpus.entities:
        assert per_entity.get(e["name"], 0) == e["mentions"]
    unseen = [e["name"] for e in corpus.entities if e["mentions"] == 0]
    assert len(unseen) == SMALL.n_unseen
    text = "\n".join(d["text"] for d in corpus.documents)
    for name in unseen:
        assert not re.search(rf"\b{re.escape(name)}\b", text, re.IGNORECASE), name


def test_documents_name_only_their_own_city(corpus):
    names = {e["name"] for e in corpus.entities}
    pattern = re.compile("|".join(rf"\b{re.escape(n)}\b" for n in sorted(names, key=len, reverse=True)))
    for d in corpus.documents:
        found = set(pattern.findall(d["text"]))
        assert found <= ({d["entity"]} if d["kind"] == "fact" else set()), (d, found)


def test_probe_answers_appear_in_the_entity_documents(corpus):
    docs = {}
    for d in corpus.documents:
        if d["kind"] == "fact":
            docs.setdefault(d["entity"], []).append(d["text"])
    facts = Counter(p["fact"] for p in corpus.probes)
    assert facts == {"population": 190, "country": 190}
    for p in corpus.probes:
        assert p["group"] == bucket_of(p["frequency"])
        if p["frequency"] == 0:
            assert p["group"] == "unseen" and p["entity"] not in docs
            continue
        # the probe phrasing itself is a training phrasing: prompt + " " + answer occurs verbatim
        hits = [t for t in docs[p["entity"]] if f"{p['prompt']} {p['answer']}" in t]
        if p["fact"] == "population":
            assert hits, p
        else:
            assert all(p["answer"] in t for t in docs[p["entity"]])


def test_population_rounded_to_two_significant_digits(corpus):
    assert lt.round_sig(15853) == 16000 and lt.round_sig(16500) == 17000
    assert lt.round_sig(1234567) == 1200000 and lt.round_sig(99) == 99 and lt.round_sig(995) == 1000
    for e in corpus.entities:
        value = int(e["population_text"].replace(",", ""))
        assert value == lt.round_sig(e["population"]) and f"{value:,}" == e["population_text"]
        assert len(str(value).rstrip("0")) <= 2


def test_text_is_ascii_and_names_are_clean(corpus):
    for d in corpus.documents:
        assert d["text"].isascii() and d["text"].strip()
    for p in corpus.probes:
        assert p["prompt"].isascii() and p["answer"].isascii() and "." not in p["answer"]
    for e in corpus.entities:
        assert re.fullmatch(r"[A-Za-z][A-Za-z -]*", e["name"]) and len(e["name"]) <= 16
    counts = Counter(e["country"] for e in corpus.entities)
    assert max(counts.values()) <= SMALL.max_per_country
    assert len({e["name"].lower() for e in corpus.entities}) == len(corpus.entities)


def test_background_comes_from_the_wiki_package(corpus):
    data = wiki_leads()
    leads = {lt.to_ascii(v["extract"]) for v in data.values() if v.get("extract")}
    bg = [d for d in corpus.documents if d["kind"] == "background"]
    assert len(bg) == SMALL.n_background
    for d in bg:
        assert d["entity"] is None and len(d["text"].split()) == SMALL.background_words
        assert any(lead and " ".join(lead.split()).startswith(d["text"]) for lead in leads)


def test_default_buckets_listed(corpus):
    assert corpus.buckets == ["unseen", "2", "3-4", "5-9", "10-24", "25+"]


def test_write_is_deterministic(tmp_path, corpus):
    a = write_corpus(corpus, tmp_path / "a")
    b = write_corpus(build_corpus(SMALL), tmp_path / "b")
    c = write_corpus(build_corpus(dataclasses.replace(SMALL, seed=4)), tmp_path / "c")
    assert set(a) >= {"corpus", "probes", "entities", "probes_population", "probes_country"}
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes(), key
    assert a["corpus"].read_bytes() != c["corpus"].read_bytes()
    rows = [json.loads(line) for line in a["corpus"].read_text().splitlines()]
    assert rows == corpus.documents and set(rows[0]) == {"id", "text", "entity", "kind"}
    back = lt.load_corpus(tmp_path / "a")
    assert back.probes == corpus.probes and back.config == SMALL and back.buckets == corpus.buckets


def test_a_corpus_written_by_an_older_version_still_loads(tmp_path, corpus):
    """Older versions wrote the since removed `elements` option (off by default) into entities.json."""
    paths = write_corpus(corpus, tmp_path)
    meta = json.loads(paths["entities"].read_text())
    meta["config"]["elements"] = False
    paths["entities"].write_text(json.dumps(meta))
    assert lt.load_corpus(tmp_path).config == SMALL
    meta["config"]["elements"] = True  # a corpus with element facts is not one this version can build
    paths["entities"].write_text(json.dumps(meta))
    with pytest.raises(HiermemError, match="not a long-tail corpus folder"):
        lt.load_corpus(tmp_path)


def test_too_many_entities_is_a_clear_error():
    with pytest.raises(HiermemError, match="max_per_country"):
        build_corpus(dataclasses.replace(SMALL, max_per_country=1, n_entities=400, n_background=5))


def test_default_corpus_is_feasible():
    c = build_corpus()
    assert len(c.entities) == 2250 and len(c.probes) == 4500
    sizes = Counter(e["bucket"] for e in c.entities)
    assert sizes["unseen"] == 250 and sum(sizes.values()) == 2250
    assert Counter(d["kind"] for d in c.documents)["background"] == 1500
    text = " ".join(d["text"] for d in c.documents)
    grams = lt._ngrams([text], 3)
    assert not [e["name"] for e in c.entities if e["mentions"] == 0 and lt._tokens(e["name"]) in grams]
