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
    feature_cache = True

    def embed(self, model: TwoTower, batch: dict) -> dict[str, torch.Tensor]:
        """L2-normalised embeddings, in fp32 whatever the towers run in: logits reach |100|."""
        return {"image": model.encode_image(batch["image"]).float(),
                "text": model.encode_text(batch["text"]).float()}

    def loss_from_embeddings(self, local: dict[str, torch.Tensor], gathered: dict[str, torch.Tensor],
                             offset: int, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """`local` rows (this rank's) against `gathered` columns (every rank's); this rank's
        rows start at row `offset` of the gathered ones."""
        return {"clip": contrastive_loss_local(local["image"], local["text"], gathered["image"],
                                               gathered["text"], offset, scale)}

    def forward(self, model: TwoTower, batch: dict) -> dict[str, torch.Tensor]:
        local = self.embed(model, batch)
        gathered = {name: dist.all_gather_with_grad(x) for name, x in local.items()}
        offset = dist.rank() * local["image"].shape[0]
        return self.loss_from_embeddings(local, gathered, offset, model.scale().float())
