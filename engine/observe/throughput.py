"""Step timing and memory: wall time per step, and the part of it spent waiting for data."""
import resource
import time
from contextlib import contextmanager

import torch


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
