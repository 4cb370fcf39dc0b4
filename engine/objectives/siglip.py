"""SigLIP's objective (Zhai, Mustafa, Kolesnikov, Beyer, ICCV 2023, "Sigmoid Loss for Language
Image Pre-Training", arXiv:2303.15343): every image-text pair of the global batch is its own
binary classification,

    loss = -(1/N) sum_i sum_j log sigmoid(l_ij (t <x_i, y_j> + b)),   l_ij = 1 if i == j else -1

with a learnt temperature t = exp(t') and a learnt bias b, initialised to t' = log 10 and
b = -10 (the paper, section 3.2): nearly all N^2 pairs are negatives, and a bias that starts
every logit near -10 keeps the first steps from spending themselves on that imbalance. No
softmax couples the pairs, so each rank scores its own images against every rank's texts
(gathered with gradients), each pair exactly once (kernels/siglip).

The temperature is the model's own (engine/models/two_tower.LogitScale), re-initialised here
and unclamped (the paper does not clamp it); the bias is this objective's parameter.

The recipe: the paper's batch of 32k (section 4: larger batches gain little), AdamW at a peak
LR of 1e-3 with weight decay 1e-4, and beta2 = 0.95, which the paper found to stabilise
large-batch training; the schedule's length and warmup are CLIP's (open_clip's), since the
paper counts examples seen rather than epochs. The CPU smoke run is CLIP's.
"""
import math

import torch
from torch import nn

from engine import dist
from engine.objectives import recipes
from engine.models.presets import ModelPreset
from engine.models.two_tower import TwoTower
from engine.objectives.base import Objective, unit_rows
from kernels import siglip_loss_local

TEMPERATURE_INIT = math.log(10.0)
BIAS_INIT = -10.0


class SiglipObjective(Objective):
    weights = {"siglip": 1.0}

    def __init__(self, model: TwoTower):
        super().__init__()
        with torch.no_grad():
            model.logit_scale.log_scale.fill_(TEMPERATURE_INIT)
        model.logit_scale.max_scale = None
        # Shape [1], not 0-dim: DeepSpeed's initial broadcast reinterprets each parameter's bytes.
        self.bias = nn.Parameter(torch.full((1,), BIAS_INIT))

    @classmethod
    def recipe(cls, model: str, preset: ModelPreset, smoke: bool):
        """The paper's numbers over CLIP's for the tower family; the smoke run is CLIP's."""
        if smoke:
            return recipes.smoke_recipe()
        return recipes.clip_recipe(preset, global_batch=32_768, lr=1e-3, weight_decay=1e-4, betas=(0.9, 0.95),
                                   source="SigLIP paper (batch 32k, AdamW 1e-3, weight decay 1e-4, beta2 0.95); "
                                          "schedule length and warmup from open_clip")

    @classmethod
    def from_plan(cls, model: TwoTower, options: dict, seed: int) -> "SiglipObjective":
        return cls(model)

    def embed(self, model: TwoTower, batch: dict):
        """L2-normalised embeddings as the kernels take them (base.unit_rows: bf16 from bf16 towers);
        the kernels compute the logits (they reach |t| + |b|) and their sums in fp32 from them.
        No term needs the batch alone."""
        return {"image": unit_rows(model.encode_image(batch["image"], normalize=False)),
                "text": unit_rows(model.encode_text(batch["text"], normalize=False))}, {}

    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor],
                             scale: torch.Tensor) -> dict[str, torch.Tensor]:
        image, text = embeddings["image"], embeddings["text"]
        offset = dist.rank() * image.shape[0]  # this rank's texts among the gathered ones
        return {"siglip": siglip_loss_local(image, dist.all_gather_with_grad(text), offset,
                                            scale, self.bias.float()[0])}
