"""Peak memory as the scale benchmarks define it: anonymous resident memory (RssAnon; file-backed pages of
memory-mapped files are reclaimable and do not count), summed over a process and its descendants, sampled on a
thread."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def proc_status() -> dict[str, int]:
    """This process's memory counters from /proc/self/status, in bytes ({} where there is none)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return kids


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants alive now."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += _children(p)
    return tree


def rss_anon(pid: int) -> int:
    """RssAnon of one process in bytes (0 once it is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples the summed RssAnon of a process tree (default: this process's) every `interval` seconds on a
    thread, from entering to leaving the `with` block (a last sample then); peak holds the largest."""

    def __init__(self, pid: int | None = None, interval: float = 0.05):
        self.pid, self.interval = pid or os.getpid(), interval
        self.peak = self.samples = self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        pids = process_tree(self.pid)
        self.peak = max(self.peak, sum(rss_anon(p) for p in pids))
        self.samples += 1
        self.max_procs = max(self.max_procs, len(pids))

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


__all__ = ["RssSampler", "proc_status", "process_tree", "rss_anon"]
