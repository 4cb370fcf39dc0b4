"""What every objective declares: the data it needs, its loss weights, its per-rank state, and
its loss split in two so that gradient accumulation can keep the global batch.

An objective is an nn.Module that owns its heads and state and maps (model, batch) to named
fp32 loss terms, in two parts:

  embed(model, batch) -> (embeddings, batch_terms)
      this rank's per-sample embeddings (the inputs of every term that compares samples with
      each other), and the terms that need only this batch (SimSiam, MLM, a prior), with
      their graphs;
  loss_from_embeddings(embeddings, scale) -> cross_terms
      the terms that compare samples, from this rank's rows of the whole step's embeddings;
      it gathers other ranks' rows itself, with gradients.

`forward` is the two in sequence. engine/train/gradcache.py calls them separately: cross terms
once on every micro-batch's cached embeddings (the whole global batch), batch terms once per
micro-batch, averaged, as plain accumulation would.

The class attributes tell the loader what each sample must carry; the defaults are CLIP's
(one cropped view, the caption as it is).
"""
from abc import ABC, abstractmethod

import torch
from torch import nn

from engine.models.two_tower import TwoTower


class Objective(nn.Module, ABC):
    image_views = 1              # 2: a second augmented view under "image2"
    augment = "crop"             # the augmentation family (engine/data/augment.py)
    text_aug = False             # an EDA copy of the caption under "text_aug"
    mlm = False                  # "text" MLM-masked, targets under "mlm_labels"
    strip_punctuation = False    # captions lower-cased and stripped of punctuation
    weights: dict[str, float]    # term name -> weight in the total loss

    @abstractmethod
    def embed(self, model: TwoTower, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(embeddings, batch terms) of this rank's batch."""

    @abstractmethod
    def loss_from_embeddings(self, embeddings: dict[str, torch.Tensor],
                             scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cross terms of this rank's rows of a whole step."""

    def forward(self, model: TwoTower, batch: dict) -> dict[str, torch.Tensor]:
        embeddings, batch_terms = self.embed(model, batch)
        terms = {**self.loss_from_embeddings(embeddings, model.scale().float()), **batch_terms}
        return {name: terms[name] for name in self.weights}  # in the weights' order

    def rank_state(self) -> dict:
        """State kept per rank outside parameters and buffers, saved with each checkpoint."""
        return {}

    def load_rank_state(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no per-rank state, got {sorted(state)}")

