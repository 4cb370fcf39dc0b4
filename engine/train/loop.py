"""The training loop. Knows nothing of which objective runs or how the plan was made.

One optimizer step (engine/train/step.py: plain or GradCache accumulation) per iteration; then
the log line, the evaluation, the checkpoint and the stop, each at its cadence. Whatever watches
the run (metrics.jsonl and TensorBoard, the progress bar, charts, throughput, bad records, the
profiler, Weights & Biases) is a hook told of each event (engine/observe/hooks.py).
"""
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as torch_dist

from engine import dist
from engine.errors import EvaluationInterrupted
from engine.observe.hooks import LoopHooks
from engine.train import checkpoint
from engine.train.drills import Drills
from engine.train.nonfinite import SkippedSteps
from engine.train.stop_signals import StopSignals
from engine.train.step import Step

Evaluate = Callable[[Callable[[], bool] | None], dict[str, float]]


@dataclass(frozen=True)
class Cadence:
    """When to do what, in optimizer steps. `stop_step` may end this run before `total_steps`
    (the schedule still spans total_steps; a later run with the same --out goes on)."""
    total_steps: int
    stop_step: int
    grad_accum: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    max_skipped_in_a_row: int = 5  # non-finite steps in a row that stop the run
    nonfinite_advice: str = ""     # what the stop message suggests
    checkpoint_bytes: int = 0      # the plan's estimate of one, named when a full disk stops a save


@dataclass(frozen=True)
class LoopEnd:
    metrics: dict[str, float]  # the last evaluation's
    stopped_at: int | None     # the step a stop signal ended the run at (checkpointed), or None
    eval_pending: bool = False  # ... with that step's evaluation left for the resumed run


def train(engine, loader, *, cadence: Cadence, train_step: Step, start_step: int, checkpoint_dir: Path,
          evaluate: Evaluate, hooks: LoopHooks, stop: StopSignals | None = None,
          eval_pending: bool = False, drills: Drills = Drills()) -> LoopEnd:
    """Run optimizer steps start_step .. cadence.stop_step - 1, or until a stop signal.

    `train_step`: how one optimizer step accumulates its micro-batches (engine/train/step.py).
    `evaluate(interrupted)` asks `interrupted()` between batches (engine/eval/evaluate.py).
    `hooks`: told of every event, on every rank (engine/observe/hooks.py); the caller closes them.
    `eval_pending`: the checkpoint resumed from was written when a stop cut its evaluation
    short; that evaluation runs first."""
    batches = hooks.batches((_to(engine.device, batch) for batch in loader), start_step + 1)
    skipped = SkippedSteps(cadence.max_skipped_in_a_row)
    agreed = stop.agreed if stop is not None else None
    since_log = _LossesSinceLog()
    metrics: dict[str, float] = {}
    if eval_pending:
        try:
            metrics = _evaluate(evaluate, agreed, start_step, hooks)
        except EvaluationInterrupted:
            return LoopEnd(metrics, stopped_at=start_step, eval_pending=True)  # still pending
    for step in range(start_step, cadence.stop_step):
        done = step + 1
        skipped_before = engine.skipped_steps
        engine.module.nonfinite_drill = drills.poison(done)
        losses = train_step(engine, islice(batches, cadence.grad_accum))
        engine.module.nonfinite_drill = False
        was_skipped = engine.skipped_steps != skipped_before
        if not was_skipped:  # a skipped step's losses are not finite: they stay out of the logged means
            since_log.add(losses)
        hooks.step_done(done, losses, was_skipped)
        skipped.record(was_skipped, done, cadence.nonfinite_advice)

        if done % cadence.log_every == 0 or done == cadence.stop_step:
            values = {**since_log.mean_across_ranks(), "lr": engine.get_lr()[0],
                      "skipped_steps": engine.skipped_steps}
            hooks.logged(done, {**values, **hooks.scalars(done)})

        evaluating = done % cadence.eval_every == 0 or done == cadence.total_steps
        # No cadence checkpoint right after a skipped step: if the skips go on until the run
        # stops, the newest checkpoint is one from before them.
        saving = (done % cadence.checkpoint_every == 0 and not was_skipped) or done == cadence.stop_step
        # The stop flag is agreed at every step boundary but the last (which saves anyway).
        stop_agreed = done != cadence.stop_step and agreed is not None and agreed()
        if evaluating or saving or stop_agreed:
            dist.average_buffers(engine.module)
        eval_cut = evaluating and stop_agreed  # not started: the resumed run does it
        if evaluating and not stop_agreed:
            drills.wait_in_eval(done, stop)
            try:
                metrics = _evaluate(evaluate, agreed, done, hooks)
            except EvaluationInterrupted:
                eval_cut = True
        stopping = stop_agreed or eval_cut
        if saving or stopping:
            state = {"loader": loader.state_dict(), "task": engine.module.rank_state(), **hooks.rank_state()}
            uploads = checkpoint.save(engine, checkpoint_dir, done, state, eval_pending=eval_cut,
                                    before_complete=drills.in_checkpoint(done),
                                    expected_bytes=cadence.checkpoint_bytes)
            hooks.checkpointed(done, uploads)
        if stopping:
            return LoopEnd(metrics, stopped_at=done, eval_pending=eval_cut)
        if evaluating or saving:
            hooks.pause_ended()
    return LoopEnd(metrics, stopped_at=None)


def _evaluate(evaluate: Evaluate, interrupted, step: int, hooks: LoopHooks) -> dict[str, float]:
    metrics = evaluate(interrupted)
    hooks.evaluated(step, metrics)
    return metrics


def _to(device: torch.device, batch: dict) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class _LossesSinceLog:
    """The trained steps' losses since the last log line. They stay on the device until it:
    reading a value (.item()) would make the host wait for the GPU every step."""

    def __init__(self):
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for name, value in losses.items():
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._steps += 1

    def mean_across_ranks(self) -> dict[str, float]:
        """The mean per step, averaged over the ranks; empty when every step since the last log
        was skipped (every rank skips the same steps: DeepSpeed agrees on overflow)."""
        if not self._sums:
            return {}
        means = {name: total / self._steps for name, total in self._sums.items()}
        self._sums, self._steps = {}, 0
        # One all-reduce for all terms, on the tensors' own device (NCCL takes only GPU
        # tensors), and one host sync for the lot.
        stacked = torch.stack([v.float() for v in means.values()])
        if dist.world_size() > 1:
            torch_dist.all_reduce(stacked)
            stacked /= dist.world_size()
        return dict(zip(means, stacked.tolist()))
