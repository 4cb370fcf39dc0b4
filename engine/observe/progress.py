"""Progress bar with ETA on rank 0, the latest logged loss beside it, and the lines the loop has
to say between (a skipped step, an evaluation's numbers); silent elsewhere."""
import sys

import torch
from tqdm import tqdm

from engine.observe.hooks import LoopHook


class Progress(LoopHook):
    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         file=sys.stdout, disable=not enabled, mininterval=1.0)
        self._skipped_in_a_row = 0

    def step_done(self, step: int, losses: dict[str, torch.Tensor], skipped: bool) -> None:
        self._skipped_in_a_row = self._skipped_in_a_row + 1 if skipped else 0
        if skipped:
            self.write(f"step {step}: non-finite loss or gradient, optimizer step skipped "
                       f"({self._skipped_in_a_row} in a row)")
        self._bar.update(1)

    def logged(self, step: int, values: dict[str, float]) -> None:
        if "loss" in values:  # the mean since the previous log
            self._bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        self.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def closing(self) -> None:
        self._bar.close()

    def write(self, line: str) -> None:
        if self.enabled:  # tqdm.write prints even when the bar is disabled
            self._bar.write(line)
