"""FLIP's two phases in one run: patch dropout, then the last steps with every patch token.

The rate of each optimizer step is a function of the step alone (engine/plan/patch_dropout.py
`rate_at`), set before the step runs: a run resumed on either side of the boundary trains each
step exactly as an uninterrupted one (the masks are drawn from torch's RNG, which the checkpoint
carries). Evaluation needs nothing: the layer passes every token in eval mode.
"""
from typing import Iterator

from torch import nn

from engine.models.towers import set_patch_dropout
from engine.observe.hooks import LoopHook
from engine.plan.patch_dropout import rate_at


class UnmaskedTuning(LoopHook):
    """Sets `model`'s patch dropout before each step: `rate`, or 0 for the last `unmasked_steps`
    of `total_steps`; `announce`: print where the phase begins (rank 0)."""

    def __init__(self, model: nn.Module, rate: float, total_steps: int, unmasked_steps: int, announce: bool):
        self.model, self.rate, self.announce = model, rate, announce
        self.total_steps, self.unmasked_steps = total_steps, unmasked_steps
        self.current: float | None = None

    def batches(self, batches: Iterator[dict], first_step: int) -> Iterator[dict]:
        self._before(first_step)
        return batches

    def step_done(self, step: int, losses, skipped: bool) -> None:
        if step < self.total_steps:
            self._before(step + 1)

    def _before(self, step: int) -> None:
        rate = rate_at(step, self.rate, self.total_steps, self.unmasked_steps)
        if rate == self.current:
            return
        if not set_patch_dropout(self.model, rate):
            raise ValueError("the model has no patch dropout layer to set")  # the plan checked the tower
        if self.announce and rate == 0:  # the phase begins (or a resumed run starts inside it)
            print(f"step {step}: unmasked tuning, every patch token encoded to step {self.total_steps} "
                  f"(patch dropout {self.rate:g} before)", flush=True)
        self.current = rate
