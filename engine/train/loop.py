"""The training loop. Knows nothing of which objective runs or how the plan was made."""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as torch_dist

from engine import dist
from engine.errors import EvaluationInterrupted
from engine.observe.bad_records import BadRecordTally
from engine.observe.charts import Charts
from engine.observe.metrics import MetricsWriter
from engine.observe.profile import StepProfiler
from engine.observe.progress import Progress
from engine.observe.throughput import StepTimer, memory_gb
from engine.train import checkpoint
from engine.train.faults import Drills, SkippedSteps, StopSignals
from engine.train.step import Step


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


@dataclass(frozen=True)
class LoopEnd:
    metrics: dict[str, float]  # the last evaluation's
    stopped_at: int | None     # the step a stop signal ended the run at (checkpointed), or None
    bad_records: BadRecordTally  # over the whole run, restarts included


def _mean_across_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """One all-reduce for all terms, on the tensors' own device (NCCL takes only GPU tensors),
    and one host sync for the lot."""
    stacked = torch.stack([v.float() for v in values.values()])
    if dist.world_size() > 1:
        torch_dist.all_reduce(stacked)
        stacked /= dist.world_size()
    return dict(zip(values, stacked.tolist()))


def _to(device: torch.device, batch: dict) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _micro_batches(batches, k: int, timer: StepTimer, device: torch.device):
    """The next `k` batches, on `device`, the wait for each timed."""
    for _ in range(k):
        with timer.waiting_for_data():
            batch = _to(device, next(batches))
        yield batch


def train(engine, loader, *, cadence: Cadence, train_step: Step, start_step: int, device: torch.device,
          checkpoint_dir: Path, evaluate: Callable[[Callable[[], bool] | None], dict[str, float]],
          writer: MetricsWriter, progress: Progress, stop: StopSignals | None = None,
          eval_pending: bool = False, drills: Drills = Drills(),
          bad_records: BadRecordTally | None = None, charts: Charts | None = None,
          profiler: StepProfiler | None = None) -> LoopEnd:
    """Run optimizer steps start_step .. cadence.stop_step - 1, or until a stop signal.

    `train_step`: how one optimizer step accumulates its micro-batches (engine/train/step.py).

    `evaluate(interrupted)` asks `interrupted()` between batches (engine/eval/evaluate.py).
    `eval_pending`: the checkpoint resumed from was written when a stop cut its evaluation
    short; that evaluation runs first. `bad_records`: the totals the resumed checkpoint carried.
    `charts`: what is shown beyond scalars (engine/observe/charts.py; default: the first batch's views).
    `profiler`: told of every step (--profile, engine/observe/profile.py)."""
    charts = charts or Charts(writer)
    batches = charts.watch_first(iter(loader), start_step + 1)
    bad_records = bad_records or BadRecordTally()
    timer = StepTimer()
    skipped = SkippedSteps(cadence.max_skipped_in_a_row)
    agreed = stop.agreed if stop is not None else None
    # Loss terms stay on the device between logs: reading a value (.item()) would make the
    # host wait for the GPU every micro-batch.
    interval: dict[str, torch.Tensor] = {}
    interval_steps = 0
    metrics: dict[str, float] = {}
    if eval_pending:
        try:
            metrics = _evaluate(evaluate, agreed, start_step, writer, progress, charts)
        except EvaluationInterrupted:
            return LoopEnd(metrics, stopped_at=start_step, bad_records=bad_records)  # still pending
    for step in range(start_step, cadence.stop_step):
        done = step + 1
        skipped_before = engine.skipped_steps
        engine.module.nonfinite_drill = drills.poison(done)
        step_losses = train_step(engine, _micro_batches(batches, cadence.grad_accum, timer, device))
        engine.module.nonfinite_drill = False
        was_skipped = engine.skipped_steps != skipped_before
        if was_skipped:
            progress.write(f"step {done}: non-finite loss or gradient, optimizer step skipped "
                           f"({skipped.in_a_row + 1} in a row)")
        else:  # a skipped step's losses are not finite: they stay out of the logged means
            for name, value in step_losses.items():
                interval[name] = interval[name] + value if name in interval else value
            interval_steps += 1
            charts.step_done(step_losses)
        skipped.record(was_skipped, done, cadence.nonfinite_advice)
        timer.step_done(samples=engine.train_batch_size())  # the global batch

        if done % cadence.log_every == 0 or done == cadence.stop_step:
            # Every rank skips the same steps (DeepSpeed agrees on overflow), so an interval of
            # skipped steps only is empty on every rank.
            logged = _mean_across_ranks({k: v / interval_steps for k, v in interval.items()}) if interval else {}
            bad_records.update(loader.bad_records, device)
            timing = timer.read_and_reset()
            logged.update(lr=engine.get_lr()[0], skipped_steps=engine.skipped_steps, **timing,
                          **charts.rates(timing["samples_per_s"]), **memory_gb(), **bad_records.metrics())
            writer.write(done, logged)
            charts.logged(done)
            if "loss" in logged:
                progress.show(loss=logged["loss"])
            interval.clear()
            interval_steps = 0
        progress.update()

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
                metrics = _evaluate(evaluate, agreed, done, writer, progress, charts)
            except EvaluationInterrupted:
                eval_cut = True
        stopping = stop_agreed or eval_cut
        if saving or stopping:
            bad_records.update(loader.bad_records, device)
            checkpoint.save(engine, checkpoint_dir, done,
                            {"loader": loader.state_dict(), "task": engine.module.rank_state(),
                             "bad_records": dict(bad_records.totals)},
                            eval_pending=eval_cut, before_complete=drills.in_checkpoint(done))
        if evaluating or saving:
            timer.pause_ended()
        if stopping:
            progress.write(f"step {done}: stopped by {' and '.join(sorted(stop.agreed_names))}"
                           + (", evaluation left for the resumed run" if eval_cut else ""))
            return LoopEnd(metrics, stopped_at=done, bad_records=bad_records)
        if profiler is not None:
            profiler.step()
    return LoopEnd(metrics, stopped_at=None, bad_records=bad_records)


def _evaluate(evaluate, interrupted, step: int, writer: MetricsWriter, progress: Progress,
              charts: Charts) -> dict[str, float]:
    metrics = evaluate(interrupted)
    writer.write(step, metrics)
    charts.evaluated(step)
    progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics
