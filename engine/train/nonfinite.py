"""Steps whose loss or gradients are not finite: skipped where DeepSpeed does not skip them
(`SkipNonFinite`), counted wherever they are skipped (`SkippedSteps`), and the run stopped after
too many in a row (`NonFiniteSteps`).

DeepSpeed's ZeRO optimizers (stage 1 to 3) and its fp16 wrapper check the gradients for inf and
NaN and skip such a step; without ZeRO in fp32 it hands them to the client optimizer, and one
NaN gradient would reach every weight. This wrapper is the check for that case. It follows
DeepSpeed's own protocol: after `step()` the engine reads the optimizer's `overflow`, counts a
skipped step in `engine.skipped_steps` and leaves the LR scheduler where it was
(engine._take_model_step), as under ZeRO; the loop reports it (engine/train/loop.py).

Without ZeRO the gradients are already all-reduced when the step runs, so every rank sees the
same ones and takes the same decision without a collective.
"""
import torch

from engine.train.wrapped_optimizer import WrappedOptimizer


class SkipNonFinite(WrappedOptimizer):
    overflow = False

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        # One norm over every gradient (foreach kernels): inf or NaN anywhere makes it non-finite.
        self.overflow = bool(grads) and not torch.isfinite(torch.nn.utils.get_total_norm(grads)).item()
        if self.overflow:
            return None
        return self.optimizer.step(closure)


class NonFiniteSteps(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class SkippedSteps:
    """Counts the optimizer steps DeepSpeed skipped because a gradient was not finite (it
    skips them silently: no update, no LR step) and stops the run after `limit` in a row."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0

    def record(self, skipped: bool, step: int, advice: str) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.in_a_row >= self.limit:
            raise NonFiniteSteps(
                f"steps {step - self.in_a_row + 1}..{step} all had a non-finite loss or gradient "
                f"and were skipped ({self.limit} in a row): stopped without a new checkpoint, so "
                f"the last good one is kept. {advice}")
