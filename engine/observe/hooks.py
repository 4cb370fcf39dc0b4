"""What the training loop tells its observers, and when.

A `LoopHook` overrides the events it needs; the others do nothing. The loop (engine/train/loop.py)
holds one `LoopHooks`, the run's hooks in a list, and tells it each event; the list tells every
hook in order. In the order of a run:

  batches(batches, first_step)      once, before the first step: the stream of micro-batches the
                                    steps draw from, for a hook to pass on (wrapped) or not
  step_done(step, losses, skipped)  after every optimizer step (`step`: the steps done, from 1);
                                    `skipped`: DeepSpeed skipped it (non-finite), its losses with it
  scalars(step) -> values           at a log step: what the hook adds to the log line, after the
                                    loss terms, lr and skipped_steps
  logged(step, values)              the log line, complete
  evaluated(step, metrics)          after each evaluation
  rank_state() -> state             before a checkpoint: what the hook carries in each rank's
                                    checkpoint (whoever builds the hook restores it)
  checkpointed(step, files)         after a checkpoint is complete on disk: `files`, the paths
                                    under the checkpoints folder this rank copies to the store
                                    of a run at a URL (engine/train/run_store.py)
  pause_ended()                     after an evaluation or a checkpoint, before the next step
  closing()                         the loop has ended, however it ended

Every rank tells every hook at the same points, so that a hook may run collectives (the bad
records' sum) or forwards that ZeRO-3 runs on all ranks (the charts' held-out probe); what is
written, only rank 0 writes. The observers are hooks themselves (progress.py, charts.py,
throughput.py, bad_records.py, profile.py, wandb_log.py); `MetricsLog` tells MetricsWriter
(metrics.jsonl and TensorBoard) the log lines and evaluations.
"""
from __future__ import annotations

from typing import Iterator

import torch

from engine.observe.metrics import MetricsWriter


class LoopHook:
    def batches(self, batches: Iterator[dict], first_step: int) -> Iterator[dict]:
        return batches

    def step_done(self, step: int, losses: dict[str, torch.Tensor], skipped: bool) -> None:
        pass

    def scalars(self, step: int) -> dict[str, float]:
        return {}

    def logged(self, step: int, values: dict[str, float]) -> None:
        pass

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def rank_state(self) -> dict:
        return {}

    def checkpointed(self, step: int, files: list[str]) -> None:
        pass

    def pause_ended(self) -> None:
        pass

    def closing(self) -> None:
        pass


class LoopHooks(LoopHook):
    """Several hooks told as one, in list order: the first wraps the batches innermost, and
    adds its scalars to the log line first."""

    def __init__(self, hooks: list[LoopHook]):
        self.hooks = list(hooks)

    def batches(self, batches: Iterator[dict], first_step: int) -> Iterator[dict]:
        for hook in self.hooks:
            batches = hook.batches(batches, first_step)
        return batches

    def step_done(self, step: int, losses: dict[str, torch.Tensor], skipped: bool) -> None:
        for hook in self.hooks:
            hook.step_done(step, losses, skipped)

    def scalars(self, step: int) -> dict[str, float]:
        values: dict[str, float] = {}
        for hook in self.hooks:
            values.update(hook.scalars(step))
        return values

    def logged(self, step: int, values: dict[str, float]) -> None:
        for hook in self.hooks:
            hook.logged(step, values)

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        for hook in self.hooks:
            hook.evaluated(step, metrics)

    def rank_state(self) -> dict:
        state: dict = {}
        for hook in self.hooks:
            state.update(hook.rank_state())
        return state

    def checkpointed(self, step: int, files: list[str]) -> None:
        for hook in self.hooks:
            hook.checkpointed(step, files)

    def pause_ended(self) -> None:
        for hook in self.hooks:
            hook.pause_ended()

    def closing(self) -> None:
        """Every hook is closed, even when one fails; the first failure is raised after."""
        failure = None
        for hook in self.hooks:
            try:
                hook.closing()
            except Exception as error:  # re-raised below, once every hook is closed
                failure = failure or error
        if failure is not None:
            raise failure


class MetricsLog(LoopHook):
    """Log lines and evaluations into metrics.jsonl and TensorBoard; the writer closed at the end."""

    def __init__(self, writer: MetricsWriter):
        self.writer = writer

    def logged(self, step: int, values: dict[str, float]) -> None:
        self.writer.write(step, values)

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        self.writer.write(step, metrics)

    def closing(self) -> None:
        self.writer.close()
