"""Suite `fuzz`: property-based tests (hypothesis) of every input surface, with many examples.

The rule each property checks: an input ends in the right result or in a HiermemError whose message is one
line naming the file (and the line, for line-based formats) or the config key; from the command line, in
exit code 0, or 2 with one `error: ...` line (argparse's usage errors: its own `PROG: error:` last line).

Surfaces: corpus readers (.jsonl, .jsonl.gz / .jsonl.zst incl. truncated streams, .txt, .parquet incl. random
bytes, folders of shards), dot-list overrides, YAML config files, probe files, `hiermem.cli.main` over random
argv (heavy entry points stubbed after their argument checks), and `prepare` on odd-Unicode / random-byte
corpora. The generators label every line they write (its document, or the problem it carries), so the expected
outcome is known without parsing the file the way the code under test does.

The properties live here only: tests/test_fuzz.py runs each with EXAMPLES[surface] examples; `hiermem bench
--suite fuzz` runs them with SCALE (20) times as many and writes <out>/fuzz.json (inputs tried and failures per
surface). Hypothesis runs derandomized (same inputs every run) with no deadline and no example database.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import tempfile
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hiermem.errors import HiermemError

SCALE = 20
# examples per surface in tests/test_fuzz.py (the bench runs SCALE x these)
EXAMPLES = {"jsonl": 60, "compressed": 25, "txt": 50, "parquet": 25, "folder": 20, "overrides": 80, "yaml": 50,
            "probes": 50, "cli": 60, "prepare": 4}
INPUTS: Counter = Counter()  # inputs tried per surface (every example, shrinking included)

BOM = b"\xef\xbb\xbf"
# characters that break naive parsers: combining marks, RTL text and overrides, emoji, control characters,
# str.splitlines line breaks that are not "\n" (\x0b \x0c \x1c \x85 U+2028), a BOM mid-text, a NUL
ODD = ["e\u0301", "\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627", "\u202e", "\U0001f600",
       "\U0001f469\u200d\U0001f467", "\x00", "\x07", "\x1b[31m", "\x0b", "\x0c", "\x1c", "\x85", "\u2028",
       "\ufeff", "\t", " ", "\r", "\\", '"', "\ud7ff", "\U0010fffd"]


def _st():
    from hypothesis import strategies as st

    return st


def _text(max_size: int = 24):
    st = _st()
    char = st.characters(codec="utf-8")  # any code point but surrogates
    return st.lists(st.one_of(st.text(char, max_size=6), st.sampled_from(ODD),
                              st.sampled_from(["word", "the cat", "  ", "x" * 3])), max_size=max_size // 4 + 1
                    ).map("".join)


def _first_line_only(msg: str) -> None:
    assert msg and "\n" not in msg and "\r" not in msg, f"not one line: {msg!r}"


def _expect_error(fn: Callable, prefix: str, fragments: tuple[str, ...] = ()) -> str:
    """fn() raises a one-line HiermemError starting with prefix and holding one of fragments (if given)."""
    try:
        got = fn()
    except HiermemError as e:
        msg = str(e)
        _first_line_only(msg)
        assert msg.startswith(prefix), f"{msg!r} does not start with {prefix!r}"
        assert not fragments or any(f in msg for f in fragments), f"{msg!r} names none of {fragments}"
        return msg
    raise AssertionError(f"expected an error starting {prefix!r} ({fragments}), got {got!r}")


# ------------------------------------------------------------------------------ corpus: labelled lines


@dataclass(frozen=True)
class Line:
    """One generated line: its bytes (no line ending), and either the document it holds (id None: the
    default id; text "" or blank: skipped), nothing (a blank line), or the problem it carries."""
    raw: bytes
    doc: tuple | None = None  # (id or None, text)
    problem: tuple[str, ...] = ()  # message fragments, one of which the error must hold


def _jsonl_line():
    st = _st()
    ids = st.one_of(st.none(), st.sampled_from(["a", "b", "1", "ü", "x y", "n\nl", 'q"\\']), st.integers(-3, 3))

    def record(draw_id, text, ascii_only, extra):
        obj = {"text": text, **extra}
        if draw_id is not None or extra.get("_null_id"):
            obj["id"] = draw_id
        obj.pop("_null_id", None)
        return Line(json.dumps(obj, ensure_ascii=ascii_only).encode(), doc=(draw_id, text))

    valid = st.builds(record, ids, _text(), st.booleans(),
                      st.sampled_from([{}, {"meta": [1, {"k": None}]}, {"_null_id": True}, {"text2": 3}]))
    long_line = st.integers(1, 3).map(lambda k: Line(json.dumps({"text": "long " * (20000 * k)}).encode(),
                                                     doc=(None, "long " * (20000 * k))))
    blank = st.sampled_from([b"", b"  ", b"\t", b" \r"]).map(lambda b: Line(b))
    bad_json = st.sampled_from([b"{", b'{"text": "a"', b"not json", b'{"text": "a\x00"}', b"{'text': 'a'}",
                                b'{"text": "a"} x', b" \xef\xbb\xbf{\"text\": \"a BOM after a blank\"}",
                                b'{"text": "a", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}",
                                b'{"text": "a", "id": ' + b"9" * 5000 + b"}"]
                               ).map(lambda b: Line(b, problem=("malformed JSON",)))
    not_object = st.sampled_from([b"[1, 2]", b'"text"', b"3", b"null", b"true"]).map(
        lambda b: Line(b, problem=("expected a JSON object",)))
    no_text = st.sampled_from([b"{}", b'{"id": "q"}', b'{"Text": "a"}']).map(
        lambda b: Line(b, problem=('missing field "text"',)))
    bad_text = st.sampled_from([b'{"text": 3}', b'{"text": null}', b'{"text": ["a"]}', b'{"text": true}',
                                b'{"text": NaN}']).map(lambda b: Line(b, problem=('field "text" must be a string',)))
    bad_id = st.sampled_from([b'{"text": "a", "id": 1.5}', b'{"text": "a", "id": true}', b'{"text": "a", "id": []}',
                              b'{"text": "a", "id": {}}']).map(
        lambda b: Line(b, problem=('field "id" must be a string or an integer',)))
    surrogate = st.sampled_from([b'{"text": "a\\ud800b"}', b'{"text": "ok", "id": "\\udfff"}']).map(
        lambda b: Line(b, problem=("unpaired surrogate",)))
    bad_utf8 = st.sampled_from([b'{"text": "\xff"}', b'{"text": "\xc3("}', b'\xed\xa0\x80', b'{"text": "a"}\x80']).map(
        lambda b: Line(b, problem=("invalid UTF-8",)))
    return st.one_of(valid, valid, valid, blank, long_line, bad_json, not_object, no_text, bad_text, bad_id,
                     surrogate, bad_utf8)


def _jsonl_file():
    st = _st()
    return st.tuples(st.lists(_jsonl_line(), max_size=8), st.sampled_from([b"\n", b"\r\n"]), st.booleans(),
                     st.booleans())


def _build_jsonl(lines: list[Line], ending: bytes, bom: bool, final_newline: bool) -> bytes:
    data = ending.join(ln.raw for ln in lines) + (ending if lines and final_newline else b"")
    return (BOM if bom else b"") + data


def _expected_jsonl(lines: list[Line], path: Path, name: str, first_line: int = 1, seen: dict | None = None):
    """('docs', [(id, text)]) or ('error', prefix, fragments), from the labels alone."""
    seen = {} if seen is None else seen
    docs = []
    for n, ln in enumerate(lines, first_line):
        if ln.problem:
            return "error", f"{path}:{n}: ", ln.problem
        if ln.doc is None:
            continue
        doc_id, text = ln.doc
        if not text.strip():
            continue
        doc_id = f"{name}:{n}" if doc_id is None else str(doc_id)
        if doc_id in seen:
            return "error", f"{path}:{n}: ", (f"duplicate id {json.dumps(doc_id, ensure_ascii=False)} "
                                              f"(first seen at {seen[doc_id]})",)
        seen[doc_id] = f"{path}:{n}"
        docs.append((doc_id, text))
    return "docs", docs


def _check_read(path: Path, expected) -> None:
    from hiermem.data.readers import read_documents

    if expected[0] == "error":
        _expect_error(lambda: read_documents(path), expected[1], expected[2])
        return
    if not expected[1]:
        _expect_error(lambda: read_documents(path), f"{path}: no documents (empty corpus)")
        return
    got = [(d.id, d.text) for d in read_documents(path)]
    assert got == expected[1], f"read {got!r}, expected {expected[1]!r}"


def prop_jsonl(tmp: Path, spec) -> None:
    lines, ending, bom, final = spec
    path = tmp / "corpus.jsonl"
    path.write_bytes(_build_jsonl(lines, ending, bom, final))
    _check_read(path, _expected_jsonl(lines, path, "corpus"))


def _compressed_case():
    st = _st()
    return st.tuples(_jsonl_file(), st.sampled_from(["jsonl.gz", "jsonl.zst"]),
                     st.one_of(st.none(), st.floats(0.0, 0.999)), st.booleans(), st.binary(max_size=64))


def prop_compressed(tmp: Path, spec) -> None:
    """The .jsonl rules through gzip/zstd; a stream cut anywhere is an error; random bytes are an error."""
    (lines, ending, bom, final), fmt, cut, random_bytes, junk = spec
    data = _build_jsonl(lines, ending, bom, final)
    if fmt == "jsonl.gz":
        blob = gzip.compress(data, mtime=0)
    else:
        import zstandard

        blob = zstandard.ZstdCompressor().compress(data)
    path = tmp / f"corpus.{fmt}"
    expected = _expected_jsonl(lines, path, "corpus")
    if random_bytes and junk:
        path.write_bytes(junk)
        _expect_error(lambda: _read_all(path), f"{path}: ")
    elif cut is not None and int(len(blob) * cut) > 0:
        path.write_bytes(blob[: int(len(blob) * cut)])
        # a line error may come first, from the lines before the cut; never a silently shorter corpus
        frags = ("corrupt or truncated",) + (expected[2] if expected[0] == "error" else ())
        _expect_error(lambda: _read_all(path), f"{path}", frags)
    else:
        path.write_bytes(blob)
        _check_read(path, expected)


def _read_all(path: Path):
    from hiermem.data.readers import read_documents

    return read_documents(path)


# .txt: lines of odd text; documents are the runs of non-blank lines (str.splitlines over the whole file)


def _txt_case():
    st = _st()
    line = st.one_of(_text(40), st.sampled_from(["", " ", "\t", "para", "second line"]))
    return st.tuples(st.lists(line, max_size=10), st.sampled_from(["\n", "\r\n", "\r"]), st.booleans(),
                     st.one_of(st.none(), st.tuples(st.integers(0, 10 ** 6), st.sampled_from([b"\xff", b"\xc3(",
                                                                                                 b"\x80", b"\xed\xa0\x80"]))))


def prop_txt(tmp: Path, spec) -> None:
    lines, ending, bom, bad = spec
    data = (BOM if bom else b"") + ending.join(lines).encode("utf-8")
    if bad is not None:  # invalid bytes spliced in at a character boundary
        text = data.decode("utf-8")
        at = len(text[: bad[0] % (len(text) + 1)].encode("utf-8"))
        data = data[:at] + bad[1] + data[at:]
    path = tmp / "notes.txt"
    path.write_bytes(data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        # the reference: the file's str.splitlines lines, with the undecodable bytes escaped in place
        head = data.decode("utf-8", errors="surrogateescape")
        head = head[1:] if head.startswith("\ufeff") else head
        line = next(i for i, s in enumerate(head.splitlines(), 1) if re.search("[\udc80-\udcff]", s))
        _expect_error(lambda: _read_all(path), f"{path}:{line}: invalid UTF-8 at byte {e.start}")
        return
    text = text[1:] if text.startswith("\ufeff") else text
    docs, block, first = [], [], 0
    for n, s in enumerate(text.splitlines() + [""], 1):
        if s.strip():
            first = first if block else n
            block.append(s)
        elif block:
            docs.append((f"notes.txt:{first}", "\n".join(block)))
            block = []
    _check_read(path, ("docs", docs))


# .parquet: typed columns (text may be ill-typed or null, id of any type), or random bytes


def _parquet_case():
    st = _st()
    text_col = st.one_of(st.tuples(st.just("string"), st.lists(st.one_of(st.none(), _text()), max_size=6)),
                         st.tuples(st.just("int64"), st.lists(st.integers(-5, 5), min_size=1, max_size=4)),
                         st.tuples(st.just("binary"), st.lists(st.binary(max_size=4), min_size=1, max_size=4)))
    id_type = st.sampled_from([None, None, "string", "int64", "float64", "bool"])
    return st.tuples(text_col, id_type, st.booleans(), st.one_of(st.none(), st.binary(max_size=80)),
                     st.booleans())


def prop_parquet(tmp: Path, spec) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (text_type, texts), id_type, has_text, junk, magic = spec
    path = tmp / "corpus.parquet"
    if junk is not None:  # random bytes with a .parquet name (sometimes with parquet's magic at both ends)
        path.write_bytes(b"PAR1" + junk + b"PAR1" if magic else junk)
        _expect_error(lambda: _read_all(path), f"{path}: ")
        return
    n = len(texts)
    ids = {None: None, "string": [str(i % 3) for i in range(n)], "int64": [i // 2 for i in range(n)],
           "float64": [i + 0.5 for i in range(n)], "bool": [i % 2 == 0 for i in range(n)]}[id_type]
    table = {("text" if has_text else "body"): pa.array(texts, type=getattr(pa, text_type)())}
    if ids is not None:
        table["id"] = pa.array(ids, type={"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(),
                                          "bool": pa.bool_()}[id_type])
    pq.write_table(pa.table(table), path)
    if not has_text:
        _expect_error(lambda: _read_all(path), f'{path}: missing column "text"')
        return
    seen, docs = {}, []
    for row, text in enumerate(texts, 1):
        where = f"{path}:row {row}"
        if id_type in ("float64", "bool"):
            return _check_read(path, ("error", f"{where}: ", ('field "id" must be a string or an integer',)))
        if not isinstance(text, str):
            return _check_read(path, ("error", f"{where}: ", ('field "text" must be a string',)))
        if not text.strip():
            continue
        doc_id = f"corpus:{row}" if ids is None else str(ids[row - 1])
        if doc_id in seen:
            dup = f"duplicate id {json.dumps(doc_id, ensure_ascii=False)} (first seen at {seen[doc_id]})"
            return _check_read(path, ("error", f"{where}: ", (dup,)))
        seen[doc_id] = where
        docs.append((doc_id, text))
    _check_read(path, ("docs", docs))


# a folder: shards in sorted relative-path order, hidden files and other extensions ignored


def _folder_case():
    st = _st()
    valid = _jsonl_line().filter(lambda ln: not ln.problem)
    shard = st.tuples(st.sampled_from(["a", "b/c", "b/d", "z0", "\u00e9t\u00e9", "x.y"]), st.lists(valid, max_size=4))
    return st.tuples(st.lists(shard, max_size=4, unique_by=lambda s: s[0]), st.binary(max_size=20))


def prop_folder(tmp: Path, spec) -> None:
    shards, junk = spec
    root = tmp / "corpus"
    root.mkdir()
    for rel, lines in shards:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / f"{rel}.jsonl").write_bytes(_build_jsonl(lines, b"\n", False, True))
    (root / ".hidden.jsonl").write_bytes(junk)  # hidden and unsupported files are not shards
    (root / "notes.md").write_bytes(junk)
    seen: dict = {}
    docs: list = []
    expected: tuple = ("docs", docs)
    for rel, lines in sorted(shards, key=lambda s: f"{s[0]}.jsonl"):
        got = _expected_jsonl(lines, root / f"{rel}.jsonl", rel, seen=seen)
        if got[0] == "error":
            expected = got
            break
        docs += got[1]
    _check_read(root, expected)


# ------------------------------------------------------------------------------ config: overrides, YAML


def _config_value():
    st = _st()
    return st.one_of(st.sampled_from(["1", "0", "-1", "3e-4", "nan", "inf", "-inf", "1e999", "true", "null", "~", "''",
                                      "[1,2]", "[1,[2]]", "[a]", "[]", "{a: 1}", "{}", "[", "{", "]", "${foo}",
                                      "${name}", "${oc.env:NO_SUCH_VAR_HIERMEM}", "'x", "!!binary aGk=", "2020-01-01",
                                      "99999999999999999999999", "a\x00b", "\x00", "[" * 1200, "sdpa", "leaf",
                                      "scratch", "cpu", "fp32"]),
                     st.integers(-10 ** 20, 10 ** 20).map(str), _text(12))


def _config_key():
    from hiermem import config as C

    st = _st()
    known = sorted(C.fields())
    return st.one_of(st.sampled_from(known), st.sampled_from(known).map(lambda k: k + ".x"),
                     st.sampled_from(["model", "memory", "train", "", ".", "a.b", "model..n_layers", "+name", "~name",
                                      "memory.ranks[0]", "model.n_layers.x", "NAME"]), _text(8))


def prop_overrides(tmp: Path, items) -> None:
    from hiermem import config as C

    try:
        cfg = C.load_config("tiny", items)
    except HiermemError as e:
        msg = str(e)
        _first_line_only(msg)
        assert msg.startswith(("config", "override")), msg
        return
    assert isinstance(cfg, C.Config)
    for item in items:  # an integer set on an int field is taken as given (the last override wins)
        key, value = item.split("=", 1)
        if key in C.fields() and C.fields()[key].type == "int" and re.fullmatch(r"-?[0-9]+", value):
            last = [i for i in items if i.split("=", 1)[0] == key][-1]
            if last == item:
                assert C._get(cfg, key) == int(value), (key, value, C._get(cfg, key))


def _overrides_case():
    st = _st()
    item = st.one_of(st.tuples(_config_key(), _config_value()).map(lambda kv: f"{kv[0]}={kv[1]}"), _text(8))
    return st.lists(item, max_size=4)


def _yaml_case():
    st = _st()
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 20, 10 ** 20), st.floats(allow_nan=True),
                       _text(8), st.sampled_from(["sdpa", "anchor", "wordllama"]))
    keys = st.one_of(st.sampled_from(["name", "model", "memory", "train", "data", "routing", "n_layers", "ranks",
                                      "lr", "d_model", "corpus", "mode", "depth", "seed"]), _text(6))
    tree = st.recursive(scalar, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                       st.dictionaries(keys, kids, max_size=3)), max_leaves=8)
    raw = st.sampled_from(["key: [unclosed", "a: b: c", "- 1\n- 2", "'str'", "42", "\t\tbad: indent", ":", "{a: 1",
                           "name: !!python/object:os.system ls", "? [1, 2]\n: 3", "[" * 3000, "name: x\0",
                           "\ufeffname: bom"])
    return st.one_of(st.dictionaries(keys, tree, max_size=4).map(lambda d: ("dump", d)), raw.map(lambda r: ("raw", r)),
                     st.binary(max_size=40).map(lambda b: ("bytes", b)))


def prop_yaml(tmp: Path, case) -> None:
    import yaml

    from hiermem import config as C

    kind, value = case
    path = tmp / "preset.yaml"
    if kind == "dump":
        path.write_text(yaml.safe_dump(value, allow_unicode=True), encoding="utf-8")
    elif kind == "raw":
        path.write_text(value, encoding="utf-8")
    else:
        path.write_bytes(value)
    try:
        cfg = C.load_config(str(path))
    except HiermemError as e:
        msg = str(e)
        _first_line_only(msg)
        # a file-level problem names the file; a rule on one field names the field (config: key ...)
        assert str(path) in msg or msg.startswith("config: "), msg
        return
    assert isinstance(cfg, C.Config)


# ------------------------------------------------------------------------------ probe files


def _probe_line():
    st = _st()
    answer = st.one_of(_text(8).filter(lambda s: s.strip()), st.integers(-10 ** 6, 10 ** 6),
                       st.floats(allow_nan=False, allow_infinity=False))
    extra = st.sampled_from([{}, {"group": "g"}, {"frequency": 3}, {"route_text": "r"}, {"other": [1]}])

    def valid(prompt, ans, more, ascii_only):
        obj = {"prompt": prompt, "answer": ans, **more}
        return Line(json.dumps(obj, ensure_ascii=ascii_only).encode(), doc=(prompt, ans))

    good = st.builds(valid, _text(16).filter(lambda s: s.strip()), answer, extra, st.booleans())
    bad = st.sampled_from([
        (b"{", "malformed JSON"), (b"[1]", "expected a JSON object"), (b'{"answer": "a"}', 'missing required field'),
        (b'{"prompt": "p"}', 'missing required field "answer"'), (b'{"prompt": "", "answer": "a"}', '"prompt" must'),
        (b'{"prompt": 3, "answer": "a"}', '"prompt" must'), (b'{"prompt": "p", "answer": true}', '"answer" must'),
        (b'{"prompt": "p", "answer": " "}', '"answer" is empty'), (b'{"prompt": "p", "answer": NaN}', "finite"),
        (b'{"prompt": "p", "answer": 1e999}', "finite"), (b'{"prompt": "p", "answer": "a", "frequency": 1.5}',
                                                          '"frequency" must'),
        (b'{"prompt": "p", "answer": "a", "group": 1}', '"group" must'), (b'{"prompt": "\\ud800", "answer": "a"}',
                                                                          "unpaired surrogate"),
        (b'{"prompt": "p", "answer": "a", "x": ' + b"[" * 3000 + b"]" * 3000 + b"}", "malformed JSON"),
    ]).map(lambda b: Line(b[0], problem=(b[1],)))
    blank = st.sampled_from([b"", b"  "]).map(Line)
    return st.one_of(good, good, good, bad, blank)


def prop_probes(tmp: Path, spec) -> None:
    from hiermem.eval.probes import load_probes

    lines, ending, bom, final = spec
    path = tmp / "probes.jsonl"
    path.write_bytes(_build_jsonl(lines, ending, bom, final))
    expected = []
    for n, ln in enumerate(lines, 1):
        if ln.problem:
            _expect_error(lambda: load_probes(path), f"{path}:{n}: ", ln.problem)
            return
        if ln.doc is not None:
            expected.append(ln.doc)
    if not expected:
        _expect_error(lambda: load_probes(path), f"{path}: no probes")
        return
    got = load_probes(path)
    want = [(p, str(int(a)) if isinstance(a, float) and a.is_integer() else str(a)) for p, a in expected]
    assert [(p["prompt"], p["answer"]) for p in got] == want


def _probes_case():
    st = _st()
    return st.tuples(st.lists(_probe_line(), max_size=6), st.sampled_from([b"\n", b"\r\n"]), st.booleans(),
                     st.booleans())


# ------------------------------------------------------------------------------ the command line


def _cli():
    """hiermem.cli, the one layer above the benches: imported by name at run time (not as a dependency of this
    module) since this surface drives the command line from above; `hiermem bench` has it loaded already."""
    import importlib

    return importlib.import_module("hiermem.cli")


def _cli_commands() -> dict[str, list[str]]:
    """Each real subcommand and its option strings, read from the parser itself."""
    import argparse

    sub = next(a for a in _cli().build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sorted(s for a in p._actions for s in a.option_strings) for name, p in sub.choices.items()}


def _cli_case():
    st = _st()
    commands = _cli_commands()
    values = st.sampled_from(["1", "0", "-3", "x", "", "tiny", "small", "nope", "missing_run", ".", "cpu", "cuda",
                              "knn", "centroid", "fetched", "none", "train", "data", "no/such.jsonl", "a,b", "1e9", "a\nb",
                              "data.corpus=no\nsuch.jsonl", "-c", "x\r",
                              "--", "-", "nan"])
    tokens = st.one_of(values, _overrides_case().map(lambda items: items[0] if items else "name=x"), _text(6))

    def argv(name, picks):
        return [name] + [t for pair in picks for t in pair]

    pairs = lambda opts: st.lists(st.tuples(st.sampled_from(opts + ["--bogus", "-z"]), tokens).map(
        lambda p: p if p[0] != "--help" else (p[0],)), max_size=4)
    per_command = [st.lists(st.tuples(tokens, tokens), max_size=1).flatmap(
        lambda head, n=name, o=opts: pairs(o).map(lambda p: argv(n, [*head, *p]))) for name, opts in commands.items()]
    junk = st.lists(st.one_of(values, _text(6), st.sampled_from(sorted(commands))), max_size=4)
    return st.one_of(*per_command, junk)


def _guarded_parser(real_build_parser):
    """The real parser, each subcommand's func swapped for its argument checks only (no training, no server,
    no download, no bench): stage commands load and validate the config; commands on a run open the run
    (missing in the fuzz's empty folder); params, eval, generate run as they are; bench runs with run_suite
    stubbed; demo and corpus (the experiments, which the library does not import) and any command this list
    does not know yet are parsed but not run."""
    import argparse

    from hiermem import config as C

    def stage(args):
        cfg = C.load_config(args.config, args.overrides)
        if args.command == "train":
            C.check_training(cfg)

    def on_run(args):
        from hiermem.eval.evaluate import open_run

        open_run(args.run, getattr(args, "overrides", ()), router=getattr(args, "router", None),
                 device=getattr(args, "device", None))

    guarded = {"prepare": stage, "cluster": stage, "train": stage, "serve": on_run, "lm-eval": on_run,
               "export": on_run}
    real = {"params", "eval", "generate", "bench"}  # safe in _cli_sandbox

    def build():
        ap = real_build_parser()
        sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
        for name, p in sub.choices.items():
            if name not in real:
                p.set_defaults(func=guarded.get(name, lambda args: None))
        return ap

    return build


@contextlib.contextmanager
def _patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def _cli_sandbox(tmp: Path):
    import hiermem.bench as bench

    cli = _cli()
    cwd = os.getcwd()
    os.chdir(tmp)  # an empty folder: no run, data or corpus the argv could name exists
    try:
        with contextlib.ExitStack() as stack:
            for obj, name, value in [(cli, "build_parser", _guarded_parser(cli.build_parser)),
                                     (bench, "run_suite", lambda *a, **k: {})]:
                stack.enter_context(_patched(obj, name, value))
            yield
    finally:
        os.chdir(cwd)


def prop_cli(tmp: Path, argv: list[str]) -> None:
    main = _cli().main
    out, err = io.StringIO(), io.StringIO()
    with _cli_sandbox(tmp), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code, exited = main(list(argv)), False
        except SystemExit as e:  # argparse: --help (0) or a usage error (2)
            code, exited = e.code, True
    lines = err.getvalue().strip().splitlines()
    assert code in (0, 2), f"exit code {code}: {err.getvalue()[-2000:]}"
    if code == 0:
        assert "Traceback" not in err.getvalue(), err.getvalue()
    elif exited:
        assert lines and re.match(r"hiermem( [\w-]+)?: error: ", lines[-1]), err.getvalue()
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()


# ------------------------------------------------------------------------------ prepare on odd corpora


def _prepare_case():
    st = _st()
    docs = st.lists(_text(60).filter(lambda s: s.strip()), min_size=1, max_size=6)
    return st.one_of(docs.map(lambda d: ("jsonl", d)), st.binary(min_size=1, max_size=300).map(lambda b: ("txt", b)))


def prop_prepare(tmp: Path, case) -> None:
    from hiermem.config import load_config
    from hiermem.data.prepare import prepare
    from hiermem.data.readers import read_documents

    kind, value = case
    corpus = tmp / f"corpus.{kind}"
    if kind == "jsonl":
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in value), encoding="utf-8")
    else:
        corpus.write_bytes(value)
    cfg = load_config("tiny", [f"data.corpus={corpus}", f"data.dir={tmp / 'data'}", "data.vocab_size=300",
                               "data.val_fraction=0.2"])
    try:
        data = prepare(cfg)
    except HiermemError as e:
        _first_line_only(str(e))
        assert str(corpus) in str(e), str(e)
        return
    docs = read_documents(corpus)
    assert data.n_docs == len(docs) and data.texts() == [d.text for d in docs]
    tok = data.tokenizer()
    for d in docs:
        assert tok.decode(tok.encode(d.text)) == d.text  # byte-level BPE: every string round-trips


# ------------------------------------------------------------------------------ running the properties


PROPERTIES: dict[str, tuple[Callable, Callable]] = {
    "jsonl": (prop_jsonl, _jsonl_file), "compressed": (prop_compressed, _compressed_case), "txt": (prop_txt, _txt_case),
    "parquet": (prop_parquet, _parquet_case), "folder": (prop_folder, _folder_case),
    "overrides": (prop_overrides, _overrides_case), "yaml": (prop_yaml, _yaml_case),
    "probes": (prop_probes, _probes_case), "cli": (prop_cli, _cli_case), "prepare": (prop_prepare, _prepare_case),
}


def run_property(surface: str, max_examples: int | None = None) -> int:
    """Run one surface's property (EXAMPLES[surface] examples unless given); returns the inputs tried. A
    failure raises hypothesis' error (with the shrunk falsifying example in its notes)."""
    from hypothesis import HealthCheck, given, settings

    check, strategy = PROPERTIES[surface]

    @settings(max_examples=max_examples or EXAMPLES[surface], derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                     HealthCheck.large_base_example], print_blob=False)
    @given(strategy())
    def prop(value):
        INPUTS[surface] += 1
        with tempfile.TemporaryDirectory(prefix="hiermem-fuzz-") as tmp:
            check(Path(tmp), value)

    before = INPUTS[surface]
    prop()
    return INPUTS[surface] - before


def run(out: str = "runs/bench", quick: bool = False, scale: int | None = None) -> dict:
    """Every surface with SCALE x the test's examples (--quick: 2x); prints a table, writes <out>/fuzz.json."""
    from hiermem.io_utils import atomic_write_text

    scale = scale or (2 if quick else SCALE)
    res = {"suite": "fuzz", "scale": scale, "surfaces": {}}
    print(f"hiermem bench --suite fuzz: {len(PROPERTIES)} surfaces, {scale}x the test's examples", flush=True)
    print(f"{'surface':<12}{'examples':>10}{'inputs':>10}  result")
    for surface in PROPERTIES:
        n = EXAMPLES[surface] * scale
        before = INPUTS[surface]
        failure = None
        try:
            run_property(surface, n)
        except Exception as e:  # a property that failed: its shrunk example and message go to the report
            notes = "\n".join(getattr(e, "__notes__", []))
            failure = f"{type(e).__name__}: {str(e)[:2000]}\n{notes}\n{traceback.format_exc(limit=-3)}"
        tried = INPUTS[surface] - before
        res["surfaces"][surface] = {"examples": n, "inputs": tried, "failure": failure}
        print(f"{surface:<12}{n:>10}{tried:>10}  {'ok' if failure is None else 'FAILED'}", flush=True)
        if failure:
            print(failure)
    res["inputs"] = sum(s["inputs"] for s in res["surfaces"].values())
    res["failures"] = sum(s["failure"] is not None for s in res["surfaces"].values())
    print(f"{res['inputs']} inputs tried, {res['failures']} surface(s) failed")
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / "fuzz.json", json.dumps(res, indent=2) + "\n")
    return res
