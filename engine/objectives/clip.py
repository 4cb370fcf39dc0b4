"""CLIP's objective: symmetric InfoNCE over the global batch (Radford et al. 2021).

Each rank contrasts its own rows against the columns gathered from every rank, with
gradients flowing back through the gather ("local loss with gather-with-grad").
"""
import torch

from engine import dist
from engine.models.two_tower import TwoTower
from engine.objectives.base import Objective, unit_rows
from kernels import contrastive_loss_local


class ClipObjective(Objective):
    """No heads, no state: the two towers' embeddings and the shared temperature suffice."""

    weights = {"clip": 1.0}

    def embed(self, model: TwoTower, batch: dict):
        """L2-normalised embeddings as the kernels take them (base.unit_rows: bf16 from bf16 towers);
        the kernels compute the logits (up to |100|), their log-sum-exps and the gradients in fp32
        from them. No term needs the batch alone."""
        return {"image": unit_rows(model.encode_image(batch["image"], normalize=False)),
                "text": unit_rows(model.encode_text(batch["text"], normalize=False))}, {}

    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor],
                             scale: torch.Tensor) -> dict[str, torch.Tensor]:
        image, text = embeddings["image"], embeddings["text"]
        offset = dist.rank() * image.shape[0]  # this rank's rows among the gathered ones
        return {"clip": contrastive_loss_local(image, text, dist.all_gather_with_grad(image),
                                               dist.all_gather_with_grad(text), offset, scale)}
