"""Step timing and memory: wall time per step, the part of it spent waiting for data, what the
model's FLOPs make of it, and the peak memory; `Throughput` puts them in every log line."""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from typing import Iterator

import torch

from engine.observe.flops import ModelFlops
from engine.observe.hooks import LoopHook


class StepTimer:
    def __init__(self):
        self._last = time.perf_counter()
        self._wall = self._data_wait = 0.0
        self._samples = self._steps = 0

    @contextmanager
    def waiting_for_data(self):
        start = time.perf_counter()
        yield
        self._data_wait += time.perf_counter() - start

    def step_done(self, samples: int) -> None:
        now = time.perf_counter()
        self._wall += now - self._last
        self._last = now
        self._samples += samples
        self._steps += 1

    def pause_ended(self) -> None:
        """Time since the last step (an evaluation, a checkpoint) is not step time: start afresh."""
        self._last = time.perf_counter()

    def read_and_reset(self) -> dict[str, float]:
        steps = max(1, self._steps)
        out = {"samples_per_s": self._samples / self._wall if self._wall else 0.0,
               "time/step_s": self._wall / steps, "time/data_wait_s": self._data_wait / steps}
        self._wall = self._data_wait = 0.0
        self._samples = self._steps = 0
        return out


def memory_gb() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"memory/max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30}
    # Linux reports ru_maxrss in KiB: the peak resident memory of this rank's process.
    return {"memory/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class Throughput(LoopHook):
    """samples/s, time/step_s and time/data_wait_s over the steps since the last log, model
    TFLOP/s and MFU at that rate (engine/observe/flops.py), and the peak memory."""

    def __init__(self, samples_per_step: int, flops: ModelFlops | None = None):
        """`samples_per_step`: the global batch, all ranks."""
        self.timer = StepTimer()
        self._samples_per_step, self._flops = samples_per_step, flops

    def batches(self, batches: Iterator[dict], first_step: int) -> Iterator[dict]:
        while True:
            with self.timer.waiting_for_data():
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    def step_done(self, step: int, losses: dict[str, torch.Tensor], skipped: bool) -> None:
        self.timer.step_done(samples=self._samples_per_step)

    def scalars(self, step: int) -> dict[str, float]:
        timing = self.timer.read_and_reset()
        rates = self._flops.rates(timing["samples_per_s"]) if self._flops is not None else {}
        return {**timing, **rates, **memory_gb()}

    def pause_ended(self) -> None:
        self.timer.pause_ended()
