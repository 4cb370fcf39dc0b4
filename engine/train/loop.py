"""The training loop. Knows nothing of which objective runs or how the plan was made."""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as torch_dist

from engine import dist
from engine.observe.metrics import MetricsWriter
from engine.observe.progress import Progress
from engine.observe.throughput import StepTimer, memory_gb
from engine.train import checkpoint, gradcache


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
    feature_cache: bool = False  # accumulate with cached embeddings (engine/train/gradcache.py)


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


def _accumulate(engine, batches, grad_accum: int, timer: StepTimer,
                device: torch.device) -> dict[str, torch.Tensor]:
    """Plain accumulation: each micro-batch's loss on its own; returns their mean."""
    step_losses: dict[str, torch.Tensor] = {}
    for _ in range(grad_accum):
        with timer.waiting_for_data():
            batch = _to(device, next(batches))
        losses = engine(batch)
        engine.backward(losses["loss"])  # DeepSpeed divides by grad_accum itself
        engine.step()                    # steps the optimizer at the accumulation boundary
        for name, value in losses.items():
            share = value.detach() / grad_accum
            step_losses[name] = step_losses[name] + share if name in step_losses else share
    return step_losses


def train(engine, loader, *, cadence: Cadence, start_step: int, device: torch.device,
          checkpoint_dir: Path, evaluate: Callable[[], dict[str, float]],
          writer: MetricsWriter, progress: Progress) -> dict[str, float]:
    """Run optimizer steps start_step .. cadence.stop_step - 1; return the last eval metrics."""
    batches = iter(loader)
    timer = StepTimer()
    # Loss terms stay on the device between logs: reading a value (.item()) would make the
    # host wait for the GPU every micro-batch.
    interval: dict[str, torch.Tensor] = {}
    interval_steps = 0
    metrics: dict[str, float] = {}
    for step in range(start_step, cadence.stop_step):
        done = step + 1
        if cadence.feature_cache:
            with timer.waiting_for_data():
                micro_batches = [_to(device, next(batches)) for _ in range(cadence.grad_accum)]
            step_losses = gradcache.accumulate_step(engine, micro_batches)
        else:
            step_losses = _accumulate(engine, batches, cadence.grad_accum, timer, device)
        for name, value in step_losses.items():
            interval[name] = interval[name] + value if name in interval else value
        interval_steps += 1
        timer.step_done(samples=engine.train_batch_size())  # the global batch

        if done % cadence.log_every == 0 or done == cadence.stop_step:
            logged = _mean_across_ranks({k: v / interval_steps for k, v in interval.items()})
            logged.update(lr=engine.get_lr()[0], **timer.read_and_reset(), **memory_gb())
            writer.write(done, logged)
            progress.show(loss=logged["loss"])
            interval.clear()
            interval_steps = 0
        progress.update()

        evaluating = done % cadence.eval_every == 0 or done == cadence.total_steps
        saving = done % cadence.checkpoint_every == 0 or done == cadence.stop_step
        if evaluating or saving:
            dist.average_buffers(engine.module)
        if evaluating:
            metrics = evaluate()
            writer.write(done, metrics)
            progress.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if saving:
            checkpoint.save(engine, checkpoint_dir, done,
                            {"loader": loader.state_dict(), "task": engine.module.rank_state()})
    return metrics
