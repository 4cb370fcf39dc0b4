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
from engine.train import checkpoint


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


def _mean_across_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """One all-reduce for all terms, on the tensors' own device (NCCL takes only GPU tensors),
    and one host sync for the lot."""
    stacked = torch.stack([v.float() for v in values.values()])
    if dist.world_size() > 1:
        torch_dist.all_reduce(stacked)
        stacked /= dist.world_size()
    return dict(zip(values, stacked.tolist()))


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
        for _ in range(cadence.grad_accum):
            with timer.waiting_for_data():
                batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
            losses = engine(batch)
            engine.backward(losses["loss"])  # DeepSpeed divides by grad_accum itself
            engine.step()                    # steps the optimizer at the accumulation boundary
            for name, value in losses.items():
                share = value.detach() / cadence.grad_accum
                interval[name] = interval[name] + share if name in interval else share
        interval_steps += 1
        timer.step_done(samples=batch["text"].shape[0] * cadence.grad_accum * dist.world_size())

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
