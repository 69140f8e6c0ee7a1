"""User-facing errors: one line, naming the file/line/field at fault; the CLI exits with code 2."""

from pathlib import Path


class HiermemError(Exception):
    """Bad input or an incompatible artifact. The message is shown to the user as is (one line)."""

    exit_code = 2


def last_line(log, missing: str = "(no output)") -> str:
    """A child process's log's last non-blank line (`missing` when it printed none): what a one-line failure
    message quotes of the job that failed."""
    lines = [line for line in Path(log).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else missing


def check_format_version(path, fmt, version, expected: str, current: int, kind: str, what: str) -> int:
    """The version of an on-disk artifact whose metadata names `fmt` and `version`: a foreign format is refused
    ("not a <what>"), a version newer than `current` is refused with the advice to upgrade."""
    if fmt != expected or not isinstance(version, int):
        raise HiermemError(f"{path}: not a {what} (format {fmt!r})")
    if version > current:
        raise HiermemError(f"{path}: {kind} format version {version} is newer than this hiermem reads "
                           f"({current}); upgrade hiermem")
    return version
