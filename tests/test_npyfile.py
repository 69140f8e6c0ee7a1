import io

import numpy as np
import pytest

import hiermem.data.npyfile as npyfile
from hiermem.data.npyfile import CannotResume, NpyAppender, counting_sort, shuffled_arange


def npy_bytes(arr) -> bytes:
    f = io.BytesIO()
    np.save(f, arr)
    return f.getvalue()


@pytest.mark.parametrize("dtype", [np.uint16, np.int64, np.uint8])
def test_appended_file_is_what_np_save_writes(tmp_path, dtype, monkeypatch):
    monkeypatch.setattr(npyfile, "BUFFER_ITEMS", 7)  # several writes
    parts = [np.arange(n, dtype=dtype) for n in (0, 5, 1, 30, 2)]
    app = NpyAppender(tmp_path / "a.npy", dtype)
    for p in parts:
        app.append(p)
    app.finalize()
    whole = np.concatenate(parts)
    assert (tmp_path / "a.npy").read_bytes() == npy_bytes(whole)
    empty = NpyAppender(tmp_path / "e.npy", dtype)
    empty.finalize()
    assert (tmp_path / "e.npy").read_bytes() == npy_bytes(np.zeros(0, dtype))


def test_resume_truncates_to_the_durable_count(tmp_path):
    path = tmp_path / "a.npy"
    app = NpyAppender(path, np.int64)
    app.append(np.arange(10))
    app.flush()
    durable = app.count
    app.append(np.arange(100, 105))  # written after the last progress record: a crash loses it
    app.flush()
    app.close()
    again = NpyAppender(path, np.int64, durable)
    again.append([7, 8])
    again.finalize()
    assert np.load(path).tolist() == list(range(10)) + [7, 8]
    finished = NpyAppender(path, np.int64, 12)  # resuming a finalised file (crash after finalize) is a no-op
    finished.finalize()
    assert np.load(path).tolist() == list(range(10)) + [7, 8]
    with open(path, "r+b") as f:  # a header damaged by a finalize that was killed midway
        f.write(b"garbage")
    NpyAppender(path, np.int64, 12).finalize()
    assert np.load(path).tolist() == list(range(10)) + [7, 8]
    with pytest.raises(CannotResume, match="cannot resume at 13 items"):
        NpyAppender(path, np.int64, 13)
    with pytest.raises(CannotResume, match="no such file"):
        NpyAppender(tmp_path / "gone.npy", np.int64, 1)


def test_shuffled_arange_is_the_generators_permutation_and_leaves_no_file(tmp_path):
    for n, chunk in ((1, 4), (1000, 7), (1000, 1 << 16)):
        perm = shuffled_arange(n, np.random.default_rng(11), tmp_path / "sub" / "p.npy", chunk)
        np.testing.assert_array_equal(perm, np.random.default_rng(11).permutation(n))
        assert isinstance(perm, np.memmap) and list((tmp_path / "sub").iterdir()) == []


def test_shuffled_arange_has_no_name_while_it_shuffles(tmp_path):
    """A process killed mid-shuffle leaves no file: the map's file is unlinked before the shuffle starts."""
    path = tmp_path / "p.npy"

    class Watching:
        def shuffle(self, a):
            assert not path.exists()
            np.random.default_rng(5).shuffle(a)

    np.testing.assert_array_equal(shuffled_arange(500, Watching(), path, 64), np.random.default_rng(5).permutation(500))


def test_counting_sort_is_a_stable_sort_by_group(tmp_path):
    """Items grouped by group in the order they come in, from chunks of any size: np.argsort(kind="stable")."""
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 7, 1000)
    groups[groups == 4] = 5  # an empty group
    items = rng.permutation(1000) + 10

    def chunks():
        for a in range(0, 1000, 37):
            yield items[a : a + 37], groups[a : a + 37]

    order = counting_sort(chunks, np.bincount(groups, minlength=7), tmp_path / "order.npy")
    assert isinstance(order, np.memmap) and order.dtype == np.int64
    assert np.array_equal(order, items[np.argsort(groups, kind="stable")])
