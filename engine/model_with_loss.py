"""Model + objective as the one nn.Module handed to deepspeed.initialize.

The training loop calls `task(batch)` and gets "loss" (the weighted sum it backpropagates),
each named term as "loss/<name>", and the temperature; it never knows which objective runs.
`task(batch, embed_only=True)` stops that forward after the objective's `embed`, for the
GradCache accumulation of engine/train/step.py.
`rank_state()` / `load_rank_state()` carry what an objective keeps per rank outside its
parameters (DeCLIP's queue) through checkpoints.
"""
import torch
from deepspeed.runtime.zero.partition_parameters import register_external_parameter
from torch import nn

from engine.models.two_tower import TwoTower


class ModelWithLoss(nn.Module):
    def __init__(self, model: TwoTower, objective: nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective
        # A fault drill (engine/train/drills.py): while set, every loss is NaN, as after an
        # overflow, so that the step's gradients are not finite.
        self.nonfinite_drill = False

    def forward(self, batch: dict, embed_only: bool = False):
        """Named losses; with `embed_only`, the objective's first half instead (embeddings,
        batch terms, temperature), for engine/train/step.py. Both go through the DeepSpeed
        engine's forward, so that ZeRO-3 materialises the parameters."""
        if embed_only:
            embeddings, batch_terms = self.objective.embed(self.model, batch)
            return embeddings, batch_terms, self.model.scale().float()
        terms = self.objective(self.model, batch)
        # The temperature is read here, inside the forward, because under ZeRO-3 parameters
        # are only materialised during it.
        return self.named(terms, self.model.scale())

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective's weighted sum of `terms` (any subset of its terms; 0 for none)."""
        total = sum(self.objective.weights[name] * value for name, value in terms.items())
        return total * float("nan") if self.nonfinite_drill else total

    def named(self, terms: dict[str, torch.Tensor], scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the loop logs and backpropagates: "loss" (the weighted sum), "loss/<term>" in
        the weights' order, and the temperature."""
        ordered = {name: terms[name] for name in self.objective.weights}
        return {"loss": self.weighted(ordered), **{f"loss/{name}": v for name, v in ordered.items()},
                "logit_scale": scale.detach()}

    def rank_state(self) -> dict:
        return self.objective.rank_state()

    def load_rank_state(self, state: dict) -> None:
        self.objective.load_rank_state(state)


def align_buffer_dtypes(module: nn.Module) -> None:
    """Give each module's floating buffers its parameters' dtype.

    DeepSpeed's bf16/fp16 modes cast parameters but leave BatchNorm's running statistics in
    float32, and cuDNN's batch-norm backward refuses that mix on the GPU ("Expected
    running_mean to have type BFloat16"). Call after deepspeed.initialize.
    """
    for sub in module.modules():
        params = [p for p in sub.parameters(recurse=False) if p.is_floating_point()]
        if not params:
            continue
        for name, buffer in sub.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != params[0].dtype:
                setattr(sub, name, buffer.to(params[0].dtype))


def register_zero3_external_parameters(module: nn.Module) -> None:
    """Under ZeRO-3, a parameter is gathered only around its own module's forward. CLIP's text
    embeddings (transformers' CLIPTextEmbeddings) read `position_embedding.weight.shape` in
    their own forward, before calling the child that owns it: once ZeRO-3 has released that
    weight (it releases every parameter after its module's forward while its trace of module
    order is incomplete, as after a resume or on an evaluation's new order), the read sees an
    empty partition and fails. Registering the weight with the parent makes ZeRO-3 gather it
    for the parent's forward. Call after deepspeed.initialize, at ZeRO stage 3 only."""
    for sub in module.modules():
        child = getattr(sub, "position_embedding", None)
        if isinstance(child, nn.Embedding):
            register_external_parameter(sub, child.weight)

