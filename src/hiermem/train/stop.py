"""Stopping `hiermem train` cleanly on SIGINT (Ctrl-C) and SIGTERM.

The first signal only sets a flag. The loop (train/loop.py) sees it at the next step boundary (under torchrun at
the next logging step, where the ranks agree on it in one small all-reduce, so that every rank stops at the same
step), writes a checkpoint and raises Stopped: exit code 130 for SIGINT, 143 for SIGTERM, as shells expect.
A second signal, or that checkpoint taking longer than train.stop_timeout_s, ends the process at once
(os._exit): the checkpoint being written is abandoned half-way, which is safe, since a checkpoint is committed
only by the atomic rename of its state.json (train/checkpoint.py); the previous one stays the valid one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable

from hiermem.errors import HiermemError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_code(signum: int) -> int:
    """What a shell reports for a process ended by this signal: 128 + its number."""
    return 128 + signum


class Stopped(HiermemError):
    """Training stopped by a signal, its checkpoint written: a clean stop, not an error (no "error:" prefix)."""

    prefix = ""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped at step {step} by {signal_name(signum)}; resume with --resume")
        self.exit_code = exit_code(signum)


def exit_now(message: str, code: int) -> None:
    """End the process at once: no cleanup, no checkpoint (safe at any instant, see the module docstring)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(code)


class StopSignals:
    """SIGINT and SIGTERM handlers for the duration of a `with` block (installed from the main thread only;
    elsewhere the block runs without them). `signum` is the first signal received, or None. A second one
    calls exit_now with abandon(name of the signal)."""

    def __init__(self, abandon: Callable[[str], str]):
        self.signum: int | None = None
        self._abandon = abandon
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            exit_now(self._abandon(signal_name(signum)), exit_code(signum))
        self.signum = signum


@contextlib.contextmanager
def deadline(seconds: float, message: Callable[[], str], code: int):
    """Call exit_now(message(), code) from a timer thread if the block is still running after `seconds`."""
    timer = threading.Timer(seconds, lambda: exit_now(message(), code))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


__all__ = ["SIGNALS", "StopSignals", "Stopped", "deadline", "exit_code", "exit_now", "signal_name"]
