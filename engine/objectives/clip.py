"""CLIP's objective: symmetric InfoNCE over the global batch (Radford et al. 2021).

Each rank contrasts its own rows against the columns gathered from every rank, with
gradients flowing back through the gather ("local loss with gather-with-grad").
"""
import torch

from engine import dist
from engine.models.two_tower import TwoTower
from engine.objectives.base import Objective
from kernels import contrastive_loss_local


class ClipObjective(Objective):
    """No heads, no state: the two towers' embeddings and the shared temperature suffice."""

    weights = {"clip": 1.0}

    def forward(self, model: TwoTower, batch: dict) -> dict[str, torch.Tensor]:
        image = model.encode_image(batch["image"])
        text = model.encode_text(batch["text"])
        # The loss is computed in fp32 whatever the towers run in: logits reach |100|.
        image, text = image.float(), text.float()
        image_all, text_all = dist.all_gather_with_grad(image), dist.all_gather_with_grad(text)
        offset = dist.rank() * image.shape[0]
        clip = contrastive_loss_local(image, text, image_all, text_all, offset, model.scale().float())
        return {"clip": clip}
