"""--profile N: a torch.profiler trace of N training steps, to see where a step's time goes.

The trace is Chrome's trace-event JSON (open it in https://ui.perfetto.dev or chrome://tracing),
one file per rank, under RUN/profile/, beside a table of the operators that took the most time.
The first two steps of the process are left out (allocator growth, kernel autotuning, lazy
initialisation): the trace shows steady-state steps. Every rank records its own steps, so a
straggler or a collective that waits shows on the rank where it happens.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from engine.files import write_atomic
from engine.observe.hooks import LoopHook
from engine.plan.resolve import PROFILE_SKIPPED_STEPS, PROFILE_WARMUP_STEPS, first_traced_step

TABLE_ROWS = 30


class StepProfiler(LoopHook):
    """A loop hook: told of every optimizer step; a run that stops before the last traced step
    writes nothing."""

    def __init__(self, run_dir: Path, steps: int, start_step: int, rank: int):
        first = first_traced_step(start_step)
        self.name = f"rank{rank}-steps{first}-{first + steps - 1}"
        self.folder = run_dir / "profile"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._profiler = profile(activities=activities,
                                 schedule=schedule(wait=PROFILE_SKIPPED_STEPS, warmup=PROFILE_WARMUP_STEPS,
                                                   active=steps, repeat=1),
                                 on_trace_ready=self._write, record_shapes=True)
        self._profiler.start()
        self.written: Path | None = None

    def step_done(self, step: int, losses: dict[str, torch.Tensor], skipped: bool) -> None:
        self._profiler.step()

    def closing(self) -> None:
        self._profiler.stop()

    def _write(self, profiler) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"{self.name}.json"
        write_atomic(trace, lambda path: profiler.export_chrome_trace(str(path)))
        by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        write_atomic(self.folder / f"{self.name}.txt",
                     profiler.key_averages().table(sort_by=by, row_limit=TABLE_ROWS) + "\n")
        self.written = trace
