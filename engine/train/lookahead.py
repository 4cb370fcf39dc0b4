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
from collections import OrderedDict

import torch

SLOW = "lookahead_slow"
COUNT = "lookahead_count"


class Lookahead(torch.optim.Optimizer):
    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        if k < 1:
            raise ValueError(f"Lookahead k={k}: the slow weights need k >= 1 fast steps")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Lookahead alpha={alpha}: use 0 < alpha <= 1 (1 is the inner optimizer)")
        # Optimizer.__init__ is not called: it would give this wrapper param_groups and state of
        # its own. Only the rest of what it sets is set here (step hooks and their wrapper).
        self.optimizer = optimizer
        self.k, self.alpha = k, alpha
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._patch_step_function()

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        # ZeRO-1/2 assign a one-group list around each group's step.
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state) -> None:
        self.optimizer.state = state

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

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        """The inner optimizer's: its per-parameter state holds the slow weights and counts."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __getstate__(self) -> dict:
        # Optimizer's own pickles param_groups and state as attributes, which a copy would then
        # hold beside (and hidden by) the properties; the inner optimizer already carries them.
        return self.__dict__
