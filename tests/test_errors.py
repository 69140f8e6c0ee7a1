"""hiermem/errors.py: the one-line helpers."""

from hiermem.errors import last_line


def test_last_line_is_the_logs_last_non_blank_line(tmp_path):
    log = tmp_path / "job.log"
    log.write_bytes(b"step 1\nTraceback ...\nerror: data.dir: no such folder\n\n   \n")
    assert last_line(log) == "error: data.dir: no such folder"
    log.write_bytes(b"bad byte \xff here\n")  # a child's output need not be UTF-8
    assert last_line(log) == "bad byte \ufffd here"
    log.write_text("\n\n")
    assert last_line(log) == "(no output)" and last_line(log, "no output") == "no output"
