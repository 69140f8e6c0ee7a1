import json

import pytest

from hiermem.io_utils import (AtomicDir, atomic_dir, atomic_open, atomic_path, atomic_write_json,
                              atomic_write_text, atomic_write_with)


class Boom(RuntimeError):
    pass


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_writes_publish_the_content_and_leave_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    atomic_write_json(tmp_path / "sub" / "b.json", {"x": [1, 2], "a": None})
    atomic_write_with(tmp_path / "c.bin", lambda p: p.write_bytes(b"\x00\x01"))
    with atomic_open(tmp_path / "d.txt", "w", encoding="utf-8") as f:
        f.write("one\ntwo\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((tmp_path / "sub" / "b.json").read_text()) == {"x": [1, 2], "a": None}
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "d.txt").read_text() == "one\ntwo\n"
    assert listing(tmp_path) == ["a.txt", "c.bin", "d.txt", "sub"]
    assert listing(tmp_path / "sub") == ["b.json"]


def test_overwrite_replaces_the_whole_file(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "a long first version\n" * 10)
    atomic_write_text(path, "short\n")
    assert path.read_text() == "short\n"
    assert listing(tmp_path) == ["f.txt"]


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_old_file_survives_an_exception_mid_write(tmp_path, error):
    path = tmp_path / "keep.txt"
    atomic_write_text(path, "old content\n")
    with pytest.raises(error):
        with atomic_open(path, "w") as f:
            f.write("half of the new")
            f.flush()
            raise error()
    assert path.read_text() == "old content\n"
    assert listing(tmp_path) == ["keep.txt"]

    def failing_writer(tmp):
        tmp.write_bytes(b"partial")
        raise Boom()

    with pytest.raises(Boom):
        atomic_write_with(path, failing_writer)
    assert path.read_text() == "old content\n"
    assert listing(tmp_path) == ["keep.txt"]


def test_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(Boom):
        with atomic_path(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"xx")
            raise Boom()
    assert listing(tmp_path) == []


def _fill(folder, files):
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def test_atomic_dir_creates_and_replaces_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        assert tmp != final and not final.exists()
        _fill(tmp, {"a.txt": "1", "nested/b.txt": "2"})
    assert (final / "a.txt").read_text() == "1" and (final / "nested" / "b.txt").read_text() == "2"

    with AtomicDir(final) as tmp:
        _fill(tmp, {"c.txt": "3"})
        # the old folder stays complete until the new one is
        assert (final / "a.txt").read_text() == "1"
    assert listing(final) == ["c.txt"]  # replaced as a whole: old files do not linger
    assert listing(tmp_path) == ["out"]


def test_atomic_dir_failure_keeps_the_old_folder_and_leaves_no_temp(tmp_path):
    final = tmp_path / "out"
    with AtomicDir(final) as tmp:
        _fill(tmp, {"a.txt": "old"})
    with pytest.raises(Boom):
        with AtomicDir(final) as tmp:
            _fill(tmp, {"a.txt": "new", "b.txt": "new"})
            raise Boom()
    assert listing(final) == ["a.txt"] and (final / "a.txt").read_text() == "old"
    assert listing(tmp_path) == ["out"]


def test_atomic_dir_failure_without_old_folder_leaves_nothing(tmp_path):
    with pytest.raises(Boom):
        with AtomicDir(tmp_path / "fresh") as tmp:
            _fill(tmp, {"x.txt": "x"})
            raise Boom()
    assert listing(tmp_path) == []


def test_atomic_dir_clears_a_stale_temp_folder(tmp_path):
    final = tmp_path / "out"
    d = AtomicDir(final)
    d.tmp.mkdir()
    (d.tmp / "stale.txt").write_text("from a crashed run")
    with d as tmp:
        assert listing(tmp) == []
        _fill(tmp, {"fresh.txt": "ok"})
    assert listing(final) == ["fresh.txt"]
    assert listing(tmp_path) == ["out"]
