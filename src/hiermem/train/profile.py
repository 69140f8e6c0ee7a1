"""train.profile_steps=[start, end): torch.profiler over the optimizer steps start+1 .. end (as metrics.jsonl
numbers them), written as <run>/profile.txt, the operators by total device time (by CPU time on a CPU). Where a
step's time goes is what MFU alone cannot say; a window that compilation already left (e.g. [5, 10) of a
compiled run) costs the timed windows nothing if it lies in the first logging window, which benchmarks skip."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from hiermem.io_utils import atomic_write_text

ROWS = 40  # operators in the table


class StepProfiler:
    def __init__(self, steps: list[int], path: Path, device: torch.device):
        self.start, self.end = steps
        self.path, self.cuda = path, device.type == "cuda"
        self._prof = None

    def before(self, step: int) -> None:
        """Called with the number of steps done, before the next one."""
        if step == self.start and self._prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._prof = profile(activities=activities, record_shapes=False)
            self._prof.__enter__()

    def after(self, step: int, last: bool = False) -> None:
        """Called with the number of steps done, after a step; at `end` (or at the run's `last` step, when it
        ends or stops sooner) the table is written."""
        if self._prof is None or (step < self.end and not last):
            return
        self.end = min(self.end, step)
        if self.cuda:
            torch.cuda.synchronize()
        self._prof.__exit__(None, None, None)
        key = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table = self._prof.key_averages().table(sort_by=key, row_limit=ROWS)
        atomic_write_text(self.path, f"steps {self.start + 1}..{self.end}, sorted by {key}\n{table}\n")
        self._prof = None


__all__ = ["StepProfiler"]
