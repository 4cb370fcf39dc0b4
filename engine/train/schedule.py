"""Learning-rate schedule: linear warmup (from 0, or from `start_lr` as DeCLIP), then cosine
down to min_lr."""
import math

import torch


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          start_lr: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return start_lr + (lr - start_lr) * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float,
                  warmup_steps: int, total_steps: int,
                  start_lr: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose state DeepSpeed saves and restores with its checkpoints.

    The lambda returns a ratio to `lr`, which LambdaLR applies to each group's own initial
    LR: groups built with their own LRs (CLIP-Lite) follow the same curve, scaled.
    """
    def ratio(step: int) -> float:
        return lr_at(step, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
                     total_steps=total_steps, start_lr=start_lr) / lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, ratio)
