"""Lookahead (Zhang et al. 2019, "k steps forward, 1 step back") around any torch optimizer,
usable as a DeepSpeed client optimizer under ZeRO stages 0 to 3.

Every k steps of the inner ("fast") optimizer the slow weights move a fraction alpha of the
way to the fast ones, and the fast weights restart from there:

    slow += alpha * (fast - slow);  fast = slow

Shaped by what DeepSpeed does to a client optimizer:
- ZeRO (and DeepSpeed's fp16/bf16 wrappers) replace each group's parameters with flat fp32
  partitions after the optimizer is built, so a parameter's slow copy is made at its first
  step, from whatever tensor the group holds then (at that point it equals the initial weights).
- ZeRO-1/2 step one group at a time (swapping in a one-group `param_groups` list) and ZeRO-3
  one sub-group at a time, so the k-step count is kept per parameter, not per `step()` call.
- `param_groups` and `state` ARE the inner optimizer's, and the slow copy and count live in
  its per-parameter state, so its state_dict carries them in whatever layout DeepSpeed
  checkpoints it: a run resumed mid-cycle continues exactly.
"""
import torch

from engine.train.wrapped_optimizer import WrappedOptimizer

SLOW = "lookahead_slow"
COUNT = "lookahead_count"


class Lookahead(WrappedOptimizer):
    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        if k < 1:
            raise ValueError(f"Lookahead k={k}: the slow weights need k >= 1 fast steps")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Lookahead alpha={alpha}: use 0 < alpha <= 1 (1 is the inner optimizer)")
        super().__init__(optimizer)
        self.k, self.alpha = k, alpha

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        with torch.no_grad():
            for p in params:
                state = self.state[p]
                if SLOW not in state:
                    state[SLOW] = p.detach().clone()
                    state[COUNT] = 0
        loss = self.optimizer.step(closure)
        with torch.no_grad():
            for p in params:
                state = self.state[p]
                state[COUNT] += 1
                if state[COUNT] % self.k == 0:
                    slow = state[SLOW]
                    slow.add_(p - slow, alpha=self.alpha)
                    p.copy_(slow)
        return loss
