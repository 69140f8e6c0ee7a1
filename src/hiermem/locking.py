"""One writer per directory: `hiermem train` on a run dir, `prepare` and `cluster` on a data dir.

The lock is flock() on <dir>/.lock, which the OS drops when its process dies however it dies (kill -9
included), so a lock left behind by a killed process is simply taken over; the file holds the holder's pid,
host, command and start time for the refusal message. Its descriptor is opened O_CLOEXEC (and Python's fds
are not inheritable): the spawned tokenizer workers and the demo's job subprocesses never hold it, so a
lock never outlives the process that took it. Releasing empties the file, so a finished directory's bytes
do not depend on who wrote it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
import weakref
from pathlib import Path

from hiermem.errors import HiermemError

LOCK = ".lock"


def _holder(command: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "argv": " ".join(sys.argv), "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _read(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 1 << 16, 0)
        info = json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


class DirLock:
    """An exclusive, non-blocking lock on a directory (see the module docstring); release() is idempotent."""

    def __init__(self, dir: str | os.PathLike, command: str):
        self.dir, self.command = Path(dir), command
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "DirLock":
        if self._fd is not None:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read(fd) or {}
            os.close(fd)
            raise HiermemError(
                f"{self.dir}: in use by another hiermem {info.get('command', '?')} (pid {info.get('pid', '?')} on "
                f"{info.get('host', '?')}, started {info.get('started', '?')}: {info.get('argv', '?')}); wait for "
                "it to finish or stop it") from None
        stale = _read(fd)
        if stale is not None:  # the last holder died without releasing (kill -9, power cut)
            print(f"note: {self.dir}: taking over the lock of {stale.get('command', '?')} (pid {stale.get('pid')} on "
                  f"{stale.get('host')}, started {stale.get('started')}), which is no longer running", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder(self.command)) + "\n").encode(), 0)
        self._fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        self._finalizer.detach()
        try:
            os.ftruncate(fd, 0)  # (still holding it) the next holder finds no stale holder to report
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
