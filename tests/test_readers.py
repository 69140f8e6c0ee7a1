import json
import re

import pytest

from hiermem.data import readers
from hiermem.data.readers import Document, read_documents
from hiermem.errors import HiermemError


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, table: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(table), path)
    return path


def raises(msg_regex):
    return pytest.raises(HiermemError, match=msg_regex)


# --- formats -------------------------------------------------------------------------------------------


def test_jsonl_ids_blank_lines_and_empty_texts(tmp_path):
    p = write_jsonl(
        tmp_path / "corpus.jsonl",
        [{"text": "héllo"}, "", {"text": "b", "id": 7}, {"text": "  \n"}, {"text": "c", "id": "x"}],
    )
    assert read_documents(p) == [Document("corpus:1", "héllo"), Document("7", "b"), Document("x", "c")]


def test_txt_blocks_and_single_doc(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("first line\nsecond line\n\n \n\nthird\r\n\nfourth\n", encoding="utf-8")
    assert read_documents(p) == [
        Document("notes.txt:1", "first line\nsecond line"),
        Document("notes.txt:6", "third"),
        Document("notes.txt:8", "fourth"),
    ]
    one = tmp_path / "one.txt"
    one.write_text("a single\ndocument", encoding="utf-8")
    assert read_documents(one) == [Document("one.txt:1", "a single\ndocument")]


def test_parquet_with_and_without_id(tmp_path):
    p = write_parquet(tmp_path / "corpus.parquet", {"text": ["a", "", "c"]})
    assert read_documents(p) == [Document("corpus:1", "a"), Document("corpus:3", "c")]
    q = write_parquet(tmp_path / "ided.parquet", {"text": ["a", "b"], "id": [10, 11]})
    assert [d.id for d in read_documents(q)] == ["10", "11"]


def test_folder_recursive_sorted_mixed(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bee", encoding="utf-8")
    (root / "a.txt").write_text("one\n\ntwo", encoding="utf-8")
    (root / "sub" / "c.txt").write_text("sea", encoding="utf-8")
    write_jsonl(root / "sub" / "d.jsonl", [{"text": "dee"}])
    write_parquet(root / "e.parquet", {"text": ["eee"]})
    (root / "README.md").write_text("ignored", encoding="utf-8")
    (root / ".hidden.txt").write_text("ignored", encoding="utf-8")
    docs = read_documents(root)
    assert [(d.id, d.text) for d in docs] == [
        ("a.txt:1", "one"),
        ("a.txt:3", "two"),
        ("b.txt:1", "bee"),
        ("e:1", "eee"),
        ("sub/c.txt:1", "sea"),
        ("sub/d:1", "dee"),
    ]


# --- errors --------------------------------------------------------------------------------------------


def test_malformed_json_names_line(tmp_path):
    p = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "a"}, '{"text": "b" "id": 1}'])
    with raises(rf"^{re.escape(str(p))}:2: malformed JSON \(Expecting ',' delimiter\)$"):
        read_documents(p)


def test_missing_and_wrong_type_text(tmp_path):
    p = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "a"}, {"text": "b"}, {"body": "c"}])
    with raises(rf'^{re.escape(str(p))}:3: missing field "text"$'):
        read_documents(p)
    p = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "a"}, "", "", {"text": 5}])
    with raises(rf'^{re.escape(str(p))}:4: field "text" must be a string$'):
        read_documents(p)
    p = write_jsonl(tmp_path / "corpus.jsonl", ["[1, 2]"])
    with raises(r"corpus.jsonl:1: expected a JSON object, got list"):
        read_documents(p)
    p = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "a", "id": [1]}])
    with raises(r'corpus.jsonl:1: field "id" must be a string or an integer'):
        read_documents(p)


def test_invalid_utf8(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes(b"good text\n\nbad \xff here")
    with raises(rf"^{re.escape(str(p))}: invalid UTF-8 at byte 15$"):
        read_documents(p)
    j = tmp_path / "corpus.jsonl"
    j.write_bytes(b'{"text": "ok"}\n{"text": "\xc3("}\n')
    with raises(rf"^{re.escape(str(j))}:2: invalid UTF-8 at byte 25$"):
        read_documents(j)


def test_missing_path_and_unsupported_type(tmp_path):
    with raises(rf"^{re.escape(str(tmp_path / 'x'))}: no such file or directory$"):
        read_documents(tmp_path / "x")
    csv = tmp_path / "x.csv"
    csv.write_text("text\na\n")
    with raises(r'x.csv: unsupported file type ".csv" \(expected .jsonl, .txt, .parquet or a folder\)'):
        read_documents(csv)


def test_empty_corpus(tmp_path):
    p = write_jsonl(tmp_path / "corpus.jsonl", [{"text": " "}, "", {"text": ""}])
    with raises(rf"^{re.escape(str(p))}: no documents \(empty corpus\)$"):
        read_documents(p)
    (tmp_path / "empty").mkdir()
    with raises(r"empty: no documents \(empty corpus\)"):
        read_documents(tmp_path / "empty")


def test_parquet_errors(tmp_path):
    p = write_parquet(tmp_path / "corpus.parquet", {"body": ["a"]})
    with raises(rf'^{re.escape(str(p))}: missing column "text"$'):
        read_documents(p)
    p = write_parquet(tmp_path / "nulls.parquet", {"text": ["a", None]})
    with raises(r'nulls.parquet:row 2: field "text" must be a string'):
        read_documents(p)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with raises(r"bad.parquet: not a valid parquet file"):
        read_documents(bad)


def test_unreadable_file(tmp_path, monkeypatch):
    p = write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}])

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    # Tests may run as root, where chmod 000 does not block reads: simulate the OS refusal instead.
    monkeypatch.setattr(readers, "open", denied, raising=False)
    with raises(rf"^{re.escape(str(p))}: cannot read \(Permission denied\)$"):
        read_documents(p)


def test_duplicate_ids(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "id": "k"}, {"text": "b", "id": "k"}])
    with raises(r'c.jsonl:2: duplicate id "k" \(first seen at .*c.jsonl:1\)'):
        read_documents(p)


def test_errors_are_one_line(tmp_path):
    p = write_jsonl(tmp_path / "corpus.jsonl", ['{"text": "a\n'])
    with pytest.raises(HiermemError) as e:
        read_documents(p)
    assert "\n" not in str(e.value) and "corpus.jsonl:1" in str(e.value)
