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
    with raises(rf"^{re.escape(str(p))}:3: invalid UTF-8 at byte 15$"):
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
    with raises(r'x.csv: unsupported file type ".csv" \(expected .jsonl, .jsonl.gz, .jsonl.zst, .txt, .parquet or a '
                r'folder\)$'):
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


# --- compressed shards, streaming, positions ----------------------------------------------------------


def gz_bytes(data: bytes, members: int = 2) -> bytes:
    import gzip

    cut = len(data) // members
    return b"".join(gzip.compress(data[i * cut : (i + 1) * cut if i < members - 1 else len(data)])
                    for i in range(members))


def zst_bytes(data: bytes, frames: int = 2) -> bytes:
    import zstandard

    cut = len(data) // frames
    return b"".join(zstandard.ZstdCompressor().compress(data[i * cut : (i + 1) * cut if i < frames - 1 else len(data)])
                    for i in range(frames))


ROWS = [{"text": "héllo"}, "", {"text": "b", "id": 7}, {"text": "  \n"}, {"text": "c\nd"}, {"text": "e"}]


@pytest.mark.parametrize("suffix,pack", [(".jsonl.gz", gz_bytes), (".jsonl.zst", zst_bytes)])
def test_compressed_jsonl_reads_like_jsonl(tmp_path, suffix, pack):
    """Several gzip members / zstd frames are one stream; ids and names as for the .jsonl."""
    plain = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    packed = tmp_path / f"other{suffix}"
    packed.write_bytes(pack(plain.read_bytes()))
    docs = read_documents(packed)
    assert [d.text for d in docs] == [d.text for d in read_documents(plain)]
    assert [d.id for d in docs] == ["other:1", "7", "other:5", "other:6"]


@pytest.mark.parametrize("suffix,pack", [(".jsonl.gz", gz_bytes), (".jsonl.zst", zst_bytes)])
def test_compressed_errors_name_the_decompressed_line(tmp_path, suffix, pack):
    raw = b'{"text": "ok"}\n\n{"text": "b" "id": 1}\n'
    p = tmp_path / f"c{suffix}"
    p.write_bytes(pack(raw))
    with raises(rf"^{re.escape(str(p))}:3: malformed JSON \(Expecting ',' delimiter\)$"):
        read_documents(p)
    p.write_bytes(pack(b'{"text": "ok"}\n{"text": "\xc3("}\n'))
    with raises(rf"^{re.escape(str(p))}:2: invalid UTF-8 at byte 25$"):  # offset in the decompressed stream
        read_documents(p)
    whole = pack(b"".join(b'{"text": "document %d"}\n' % i for i in range(2000)), 1)
    p.write_bytes(whole[: len(whole) // 2])  # cut inside the stream: an error, not a shorter corpus
    cut = rf"^{re.escape(str(p))}: corrupt or truncated (gzip|zstd) data( after line \d+)? \("
    with pytest.raises(HiermemError, match=cut) as e:
        read_documents(p)
    assert "\n" not in str(e.value)
    p.write_bytes(b"this is not compressed at all\n")
    with raises(rf"^{re.escape(str(p))}: corrupt or truncated "):
        read_documents(p)


def test_folder_with_compressed_shards(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.jsonl.gz").write_bytes(gz_bytes(b'{"text": "bee"}\n', 1))
    (root / "sub" / "a.jsonl.zst").write_bytes(zst_bytes(b'{"text": "ay"}\n', 1))
    write_jsonl(root / "a.jsonl", [{"text": "first"}])
    (root / "c.gz").write_bytes(gz_bytes(b'{"text": "ignored: not .jsonl.gz"}\n', 1))
    assert [(d.id, d.text) for d in read_documents(root)] == [("a:1", "first"), ("b:1", "bee"), ("sub/a:1", "ay")]
    assert [(s.name, s.fmt) for s in readers.list_shards(root)] == [
        ("a", "jsonl"), ("b", "jsonl.gz"), ("sub/a", "jsonl.zst")]
    (root / "b.jsonl").write_text('{"text": "same default id as b.jsonl.gz"}\n')
    with raises(r'b.jsonl.gz:1: duplicate id "b:1" \(first seen at .*b.jsonl:1\)'):
        read_documents(root)


def _old_txt_documents(raw: bytes, name: str) -> list[tuple[str, str]]:
    """The reader before streaming (the whole file through str.splitlines): the reference for the rules."""
    text = raw[3:].decode() if raw.startswith(b"\xef\xbb\xbf") else raw.decode()
    out, block, first = [], [], 0
    for lineno, line in enumerate(text.splitlines() + [""], start=1):
        if line.strip():
            if not block:
                first = lineno
            block.append(line)
        elif block:
            out.append((f"{name}:{first}", "\n".join(block)))
            block = []
    return out


def test_txt_streamed_by_line_keeps_the_whole_file_rules(tmp_path):
    import random

    rng = random.Random(0)
    pieces = ["word", "é東", " ", "\t", "\n", "\r\n", "\r", "\x0c", "\x1c", "\u2028", "\x85", "\n\n", " \n"]
    for trial in range(30):
        raw = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60))).encode()
        if trial % 5 == 0:
            raw = b"\xef\xbb\xbf" + raw
        p = tmp_path / "t.txt"
        p.write_bytes(raw)
        got = [(r.doc.id, r.doc.text) for r in readers.iter_records(readers.list_shards(p)[0])]
        assert got == _old_txt_documents(raw, "t.txt"), repr(raw)


def test_positions_read_every_document_back(tmp_path):
    """iter_records' (offset, length) read back, with read_raw + decode_raw, the document's text: every
    format, a BOM, blank lines and a multi-line .txt block."""
    base = write_jsonl(tmp_path / "a.jsonl", ROWS)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + base.read_bytes())
    (tmp_path / "a.jsonl.gz").write_bytes(gz_bytes(base.read_bytes()))
    (tmp_path / "a.jsonl.zst").write_bytes(zst_bytes(base.read_bytes()))
    (tmp_path / "n.txt").write_bytes("\xef\xbb\xbfone\r\ntwo\n\n  \nthree é\rfour\n\nfive".encode())
    write_parquet(tmp_path / "p.parquet", {"text": ["a", "", "c", "d"]})
    for shard in readers.list_shards(tmp_path):
        recs = list(readers.iter_records(shard))
        assert recs
        raws = readers.read_raw(shard, [(r.offset, r.length) for r in recs])
        assert [readers.decode_raw(shard.fmt, x) for x in raws] == [r.doc.text for r in recs], shard
        some = recs[1::2]  # skipping documents (seeks forward; decompresses through for .gz/.zst)
        raws = readers.read_raw(shard, [(r.offset, r.length) for r in some])
        assert [readers.decode_raw(shard.fmt, x) for x in raws] == [r.doc.text for r in some], shard
