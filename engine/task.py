"""Model + objective as the one nn.Module handed to deepspeed.initialize.

The training loop calls `task(batch)` and gets "loss" (the weighted sum it backpropagates),
each named term as "loss/<name>", and the temperature; it never knows which objective runs.
"""
import torch
from torch import nn

from engine.models.two_tower import TwoTower
from engine.objectives.clip import ClipObjective

OBJECTIVES = {"clip": ClipObjective}


class Task(nn.Module):
    def __init__(self, model: TwoTower, objective: nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        terms = self.objective(self.model, batch)
        total = sum(self.objective.weights[name] * value for name, value in terms.items())
        # The temperature is read here, inside the forward, because under ZeRO-3 parameters
        # are only materialised during it.
        return {"loss": total, **{f"loss/{name}": value for name, value in terms.items()},
                "logit_scale": self.model.scale().detach()}


def build_objective(method: str) -> nn.Module:
    return OBJECTIVES[method]()
