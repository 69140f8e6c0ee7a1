"""Knowledge probes: prompt -> gold answer, exact-match accuracy by group (``hiermem eval --probes``).

A probe file is JSONL, one object per line ending in "\n" (blank lines and a leading UTF-8 BOM skipped):

* ``prompt`` (str, required) and ``answer`` (str or number, required; numbers become strings);
* ``group`` (str, optional): the label the probe is reported under; otherwise ``frequency`` (int, optional:
  training mentions) gives a frequency bucket; otherwise the probe is in group "all";
* ``route_text`` (str, optional): text to route on instead of the prompt; any other field is kept.

Frequency buckets: a caller may pass its own ``group_of(frequency) -> label`` (the long-tail demo passes its
buckets). Otherwise the rule is ``frequency_bucket``: powers of two, "unseen" for 0 mentions, then "1",
"2-3", "4-7", "8-15", ... (bucket k holds the counts 2^k .. 2^(k+1)-1). It assumes nothing about the corpus,
and each bucket spans twice the counts of the one before, so a Zipf-like tail spreads over a few of them.

The model side is the caller's: ``evaluate_probes`` hands batches of probe records to a ``predict``
function that decodes (greedily, with whatever model, memory and router) and returns completions.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Callable

from hiermem.errors import HiermemError

# A gold answer counts as numeric if it is digits with optional thousands separators and decimals.
_NUMERIC_GOLD = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# The first number of a completion: properly grouped thousands first, else a plain digit run.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
# A sentence ends at a newline, or at . ! ? followed by whitespace or the end ("U.S." and "3.5" survive).
_SENTENCE_END = re.compile(r"\n|[.!?](?=\s|$)")
_STRIP = string.punctuation + string.whitespace


# ---------------------------------------------------------------------------------------------- loading
def load_probes(path: str | Path) -> list[dict]:
    """Read a probe file (see the module docstring); errors name the file and line."""
    path = Path(path)
    try:  # lines end at "\n" only, as in the corpus reader: JSON strings may hold U+2028 or U+0085 raw
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # -sig: a leading BOM is tolerated
    except (OSError, UnicodeDecodeError) as e:
        raise HiermemError(f"{path}: cannot read probe file ({e})") from None
    probes = []
    for no, line in enumerate(lines, 1):
        if line.strip():
            probes.append(_check_probe(line, f"{path}:{no}"))
    if not probes:
        raise HiermemError(f"{path}: no probes (empty file)")
    return probes


def _check_probe(line: str, where: str) -> dict:
    try:
        rec = json.loads(line)
    except ValueError as e:
        raise HiermemError(f"{where}: malformed JSON ({e})") from None
    except RecursionError:
        raise HiermemError(f"{where}: malformed JSON (nested too deeply)") from None
    if not isinstance(rec, dict):
        raise HiermemError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("prompt", "answer"):
        if key not in rec:
            raise HiermemError(f'{where}: missing required field "{key}"')
    if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
        raise HiermemError(f'{where}: "prompt" must be a non-empty string')
    ans = rec["answer"]
    if isinstance(ans, bool) or not isinstance(ans, (str, int, float)):
        raise HiermemError(f'{where}: "answer" must be a string or a number')
    if isinstance(ans, float) and not math.isfinite(ans):  # NaN, Infinity, 1e999
        raise HiermemError(f'{where}: "answer" must be a finite number (got {ans})')
    if isinstance(ans, float) and ans.is_integer():
        ans = int(ans)  # 11.0 -> "11", not "11.0"
    rec["answer"] = str(ans)
    if not rec["answer"].strip():
        raise HiermemError(f'{where}: "answer" is empty')
    for key, typ, name in (("group", str, "a string"), ("route_text", str, "a string"),
                           ("frequency", int, "an integer")):
        if key in rec and (not isinstance(rec[key], typ) or isinstance(rec[key], bool)):
            raise HiermemError(f'{where}: "{key}" must be {name}')
    for key in ("prompt", "answer", "group", "route_text"):  # \ud800 escapes: text the tokenizer cannot encode
        if key in rec and not rec[key].isascii():
            try:
                rec[key].encode("utf-8")
            except UnicodeEncodeError:
                raise HiermemError(f'{where}: "{key}" holds an unpaired surrogate') from None
    return rec


# ---------------------------------------------------------------------------------------------- scoring
def _is_numeric(answer: str) -> bool:
    return _NUMERIC_GOLD.fullmatch(answer.strip()) is not None


def _norm_text(text: str) -> str:
    return " ".join(text.split()).strip(_STRIP).lower()


def extract_answer(completion: str, answer: str) -> str:
    """The prediction that a completion makes for a probe whose gold answer is `answer`.

    * Numeric gold (digits, optional thousands separators and decimals, e.g. "150,000", "11"): the FIRST
      number in the completion with its thousands separators removed ("about 150,000 people" -> "150000");
      "" if the completion has no number.
    * Otherwise: the completion up to its first sentence end (a newline, or '.', '!', '?' followed by
      whitespace or the end of the text), with whitespace collapsed and surrounding punctuation stripped.
      A sentence end inside a leading copy of the gold answer does not count ("U.S. Virgin Islands").
    """
    if _is_numeric(answer):
        m = _NUMBER.search(completion)
        return m.group(0).replace(",", "") if m else ""
    text, _, m = _first_sentence_end(completion, answer)
    head = text[: m.start()] if m else text
    return " ".join(head.split()).strip(_STRIP)


def _first_sentence_end(completion: str, answer: str):
    """(text, skip, match): the completion without leading blanks, how much of it is a leading copy of the
    gold answer (dots inside it do not end the sentence: "U.S."), and the first sentence end after that."""
    text, gold = completion.lstrip(" \t"), answer.strip()
    skip = len(gold) if text.lower().startswith(gold.lower()) else 0
    return text, skip, _SENTENCE_END.search(text, skip)


def answer_complete(completion: str, answer: str) -> bool:
    """True once more text could not change ``extract_answer`` (decoding may stop there): a sentence has
    ended, or, for a numeric gold answer, a number has been followed by something that cannot extend it."""
    if _is_numeric(answer):
        m = _NUMBER.search(completion)
        if m and re.match(r"[^\d,.]|[,.][^\d]", completion[m.end():m.end() + 2]):
            return True
    text, skip, m = _first_sentence_end(completion, answer)
    if answer.strip().lower().startswith(text.lower()):  # may still grow into the gold answer ("U.S. Vir...")
        return False
    return m is not None and not text[skip:].endswith((".", "!", "?"))


def is_correct(completion: str, answer: str) -> bool:
    """Exact match of the completion's prediction (``extract_answer``) against the gold answer.

    Numbers must be equal as numbers ("1500000" == "1,500,000"; "15,000" != "150,000"). Text is compared
    case-insensitively, whitespace collapsed and surrounding punctuation stripped; it is correct if the
    prediction equals the gold answer or starts with it followed by a non-alphanumeric character ("France,
    in Europe" is right; "Frances" is wrong). An answer that only appears later in the sentence is wrong.
    """
    pred = extract_answer(completion, answer)
    if _is_numeric(answer):
        return pred != "" and Decimal(pred) == Decimal(answer.strip().replace(",", ""))
    pred, gold = _norm_text(pred), _norm_text(answer)
    if not gold or not pred.startswith(gold):
        return False
    return len(pred) == len(gold) or not pred[len(gold)].isalnum()


# ---------------------------------------------------------------------------------------------- evaluation
def frequency_bucket(frequency: int) -> str:
    """The default frequency bucket (powers of two): 0 -> "unseen", 1 -> "1", 2-3 -> "2-3", 4-7 -> "4-7", ..."""
    if frequency <= 0:
        return "unseen"
    lo = 1 << (int(frequency).bit_length() - 1)
    return "1" if lo == 1 else f"{lo}-{2 * lo - 1}"


def probe_group(probe: dict, group_of: Callable[[int], str] | None = None) -> str:
    """The probe's ``group``, else its ``frequency`` bucketed by `group_of` (default ``frequency_bucket``),
    else "all"."""
    if "group" in probe:
        return str(probe["group"])
    if "frequency" in probe:
        return (group_of or frequency_bucket)(int(probe["frequency"]))
    return "all"


def evaluate_probes(probes: list[dict], predict: Callable[[list[dict]], list[str]],
                    buckets: list[str] | None = None, batch_size: int = 64, progress: bool = True,
                    group_of: Callable[[int], str] | None = None) -> dict:
    """Score `predict` (probe records -> completions) on `probes`; accuracies are percentages.

    Each probe's group is ``probe_group(probe, group_of)``. Groups are reported in the order of `buckets`,
    then the other groups holding a probe with a ``frequency``, rarest first (by their smallest frequency),
    then the rest in order of first appearance; only labels with probes are listed.
    """
    from tqdm.auto import tqdm

    labels = [probe_group(p, group_of) for p in probes]
    rarest: dict[str, int] = {}  # group -> smallest frequency among its probes
    for p, g in zip(probes, labels):
        if "frequency" in p:
            rarest[g] = min(rarest.get(g, int(p["frequency"])), int(p["frequency"]))
    predictions = []
    with tqdm(total=len(probes), desc="probes", unit="probe", disable=not progress) as bar:
        for start in range(0, len(probes), batch_size):
            batch = probes[start:start + batch_size]
            completions = list(predict(batch))
            if len(completions) != len(batch):
                raise ValueError(f"predict returned {len(completions)} completions for {len(batch)} probes")
            for p, comp, g in zip(batch, completions, labels[start:start + batch_size]):
                predictions.append({"prompt": p["prompt"], "answer": str(p["answer"]), "completion": comp,
                                    "correct": is_correct(comp, str(p["answer"])), "group": g})
            bar.update(len(batch))
    per_group: dict[str, dict] = defaultdict(lambda: {"n": 0, "correct": 0})
    for pred in predictions:
        per_group[pred["group"]]["n"] += 1
        per_group[pred["group"]]["correct"] += int(pred["correct"])
    first = list(buckets or [])
    order = first + sorted((g for g in rarest if g not in first), key=rarest.__getitem__)
    groups = [g for g in order if g in per_group] + [g for g in per_group if g not in order]
    for g in groups:
        per_group[g]["accuracy"] = 100.0 * per_group[g]["correct"] / per_group[g]["n"]
    n_correct = sum(p["correct"] for p in predictions)
    return {"n": len(predictions), "accuracy": 100.0 * n_correct / max(len(predictions), 1),
            "groups": groups, "per_group": {g: per_group[g] for g in groups}, "predictions": predictions}


def format_table(results_by_model: dict[str, dict], buckets: list[str] | None = None) -> str:
    """A plain-text table: one row per model, one column per bucket (accuracy %, one decimal) + overall."""
    if buckets is None:
        buckets = []
        for res in results_by_model.values():
            buckets += [g for g in res["groups"] if g not in buckets]
    header = ["model"] + list(buckets) + ["all"]
    rows = [header]
    for name, res in results_by_model.items():
        cells = [f"{res['per_group'][b]['accuracy']:.1f}" if b in res["per_group"] else "-" for b in buckets]
        rows.append([name] + cells + [f"{res['accuracy']:.1f}"])
    widths = [max(len(r[j]) for r in rows) for j in range(len(header))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
