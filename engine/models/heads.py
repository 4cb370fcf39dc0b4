"""Projection heads that belong to the model's shared embedding space (not to one loss).

CLIP-Lite's critic projects each tower's features through a block of its own before the dot
product; those projections are what zero-shot evaluation and retrieval compare, so they are
part of the model, unlike the heads an objective uses only for its loss (SimSiam, MLM,
prior discriminators), which live in the objective's file.
"""
import torch
from torch import nn


class CriticProjection(nn.Module):
    """CLIP-Lite's projection block (Shrivastava et al. 2023; reference `MILinearBlock`):

        LayerNorm( Linear(w, w)(ReLU(BN(Linear(in, w, bias=False)(h)))) + shortcut(h) )

    The shortcut Linear(in, w) starts as a noisy identity: uniform(-0.01, 0.01) with 1.0 on the
    diagonal, so at initialisation the block passes the tower's features through almost as
    they are (the first min(in, w) of them) and the non-linear branch learns a correction.
    """

    def __init__(self, in_features: int, width: int):
        super().__init__()
        self.nonlinear = nn.Sequential(
            nn.Linear(in_features, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(),
            nn.Linear(width, width))
        self.shortcut = nn.Linear(in_features, width)
        self.norm = nn.LayerNorm(width)
        with torch.no_grad():
            self.shortcut.weight.uniform_(-0.01, 0.01)
            diagonal = min(in_features, width)
            self.shortcut.weight[range(diagonal), range(diagonal)] = 1.0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.nonlinear(features) + self.shortcut(features))
