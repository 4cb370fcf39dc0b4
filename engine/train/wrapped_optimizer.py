"""An optimizer around another that shares the inner one's parameter groups and state.

DeepSpeed and ZeRO rewrite a client optimizer's `param_groups` (flat fp32 partitions, one group
at a time) and checkpoint its `state_dict()`; a wrapper that kept groups or state of its own
would fall out of step with them. Here both ARE the inner optimizer's, so a wrapper adds only
what its `step` does (engine/train/lookahead.py, engine/train/nonfinite.py).
"""
from collections import OrderedDict

import torch


class WrappedOptimizer(torch.optim.Optimizer):
    def __init__(self, optimizer: torch.optim.Optimizer):
        # Optimizer.__init__ is not called: it would give this wrapper param_groups and state of
        # its own. Only the rest of what it sets is set here (step hooks and their wrapper).
        self.optimizer = optimizer
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
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __getstate__(self) -> dict:
        # Optimizer's own pickles param_groups and state as attributes, which a copy would then
        # hold beside (and hidden by) the properties; the inner optimizer already carries them.
        return self.__dict__
