"""User-facing errors: one line, naming the file/line/field at fault; the CLI exits with code 2."""


class HiermemError(Exception):
    """Bad input or an incompatible artifact. The message is shown to the user as is (one line)."""

    exit_code = 2
