import json
import random

import numpy as np
import pytest

import hiermem.data.shards as shards
from hiermem.data.readers import iter_records, list_shards
from hiermem.data.shards import DocIndex, IndexWriter, find_duplicate, shard_stat, write_shard_list
from hiermem.errors import HiermemError


def brute_force(ids):
    seen = {}
    for i, x in enumerate(ids):
        if x in seen:
            return seen[x], i
        seen[x] = i
    return None


def digests_of(ids, tmp_path, digest):
    path = tmp_path / "digest.npy"
    np.save(path, np.frombuffer(b"".join(digest(x.encode()) for x in ids), np.uint8))
    return path


@pytest.mark.parametrize("chunk,buckets", [(1 << 20, 256), (16, 4), (8, 1)])
def test_find_duplicate_is_exact_even_with_digest_collisions(tmp_path, monkeypatch, chunk, buckets):
    """Many buckets, many chunks per bucket, and a digest that collides all the time: the earliest repeated id
    is found, and a collision alone is never reported."""
    monkeypatch.setattr(shards, "DUP_CHUNK", chunk)
    monkeypatch.setattr(shards, "MAX_BUCKETS", buckets)
    weak = lambda b: (sum(b) % 5).to_bytes(8, "little")  # noqa: E731 - 5 digests for every id
    rng = random.Random(0)
    for trial in range(12):
        n = rng.randint(1, 150)
        ids = [f"id{i}" for i in range(n)]
        for _ in range(trial % 4):  # 0..3 planted repeats
            a, b = sorted(rng.sample(range(n), 2)) if n > 1 else (0, 0)
            ids[b] = ids[a]
        for digest in (weak, shards.id_digest):
            got = find_duplicate(digests_of(ids, tmp_path, digest), ids.__getitem__, tmp_path)
            assert got == brute_force(ids), (trial, digest)
    assert not (tmp_path / "dup").exists()  # bucket files removed


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def build_index(corpus, tmp_path):
    sh = list_shards(corpus)
    w = IndexWriter(tmp_path / "index", tmp_path / "work")
    counts = []
    for s, shard in enumerate(sh):
        before = w.counts()["docs"]
        for rec in iter_records(shard):
            w.add(s, rec)
        counts.append(w.flush()["docs"] - before)
    w.finalize()
    write_shard_list(tmp_path / "index", sh, [shard_stat(x.path) for x in sh], counts)
    return DocIndex(tmp_path / "index")


def test_index_reads_texts_and_ids_back_and_refuses_a_changed_shard(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(shards, "READ_CHUNK", 3)
    monkeypatch.setattr(shards, "FLUSH_DOCS", 2)
    root = tmp_path / "corpus"
    root.mkdir()
    write_jsonl(root / "a.jsonl", [f"a{i}" for i in range(7)])
    pq.write_table(pa.table({"text": [f"p{i}" for i in range(9)], "id": list(range(9))}), root / "b.parquet",
                   row_group_size=2)
    (root / "c.txt").write_text("x\ny\n\nz\n", encoding="utf-8")
    index = build_index(root, tmp_path)
    texts = [f"a{i}" for i in range(7)] + [f"p{i}" for i in range(9)] + ["x\ny", "z"]
    assert len(index) == len(texts)
    assert [t for b in index.iter_texts(4) for t in b] == texts
    assert [len(b) for b in index.iter_texts(4)] == [4, 4, 4, 4, 2]
    order = [17, 3, 8, 8, 0, 15, 16, 11]
    assert index.texts_at(order) == [texts[i] for i in order]
    assert [i for b in index.iter_ids(5) for i in b] == [f"a:{i}" for i in range(1, 8)] + [str(i) for i in range(9)] \
        + ["c.txt:1", "c.txt:4"]
    assert index.ids_at([16, 0]) == ["c.txt:1", "a:1"]
    (root / "c.txt").write_text("x\ny\n\nzz\n", encoding="utf-8")  # another size
    with pytest.raises(HiermemError, match=r"c.txt: changed since .* was prepared from it .*--force$"):
        index.texts_at([17])
    assert index.texts_at([0]) == ["a0"]  # the unchanged shards still read
    (root / "a.jsonl").unlink()
    with pytest.raises(HiermemError, match=r"a.jsonl: missing \(a corpus file"):
        list(index.iter_texts())
