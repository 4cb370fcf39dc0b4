"""What every objective declares: the data it needs, its loss weights, its per-rank state, and
its loss split in two so that gradient accumulation can keep the global batch.

An objective is an nn.Module that owns its heads and state and maps (model, batch) to named
fp32 loss terms, in two parts:

  embed(model, batch) -> (embeddings, batch_terms)
      this rank's per-sample embeddings (the inputs of every term that compares samples with
      each other), in the dtype the loss kernels take (unit_rows below: bf16 for bf16 towers),
      and the terms that need only this batch (SimSiam, MLM, a prior), with their graphs;
  loss_from_embeddings(embeddings, scale) -> cross_terms
      the terms that compare samples, from this rank's rows of the whole step's embeddings;
      it gathers other ranks' rows itself, with gradients.

`forward` is the two in sequence. engine/train/step.py calls them separately: cross terms
once on the embeddings GradCache keeps of every micro-batch (the whole global batch), batch terms once per
micro-batch, averaged, as plain accumulation would.

The class attributes tell the loader what each sample must carry; the defaults are CLIP's
(one cropped view, the caption as it is). The rest of what the engine knows about a method is
declared here too, and read by the launcher, the planner and the optimizer, none of which
names a method:

  options           dials of its own: --flag, allowed values, default, help, plan row
  min_micro_batch   heads with batch statistics need more than one sample
  recipe()          its paper's numbers for a tower pair, and its CPU smoke run
  adapt_preset()    how it changes the towers (an extra token, another text tower)
  lr_groups         parameter groups with their own learning rates, by name prefix
  from_plan()       the objective built with the options the plan resolved

A method is registered by name in engine/objectives/registry.py, or given as
`--method package.module:Class` from the user's own package; engine/objectives/method.py
gathers all of it for a run in one lookup.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.presets import ModelPreset
from engine.models.two_tower import TwoTower
from engine.objectives import recipes
from kernels.row_blocks import work_dtype


@dataclass(frozen=True)
class OptionContext:
    """What an option's default may depend on."""
    recipe: recipes.Recipe         # its `options` hold per-recipe defaults
    dataset_size: int
    wordnet: str | None            # where WordNet was found, if anywhere


@dataclass(frozen=True)
class Option:
    """A dial an objective has and others do not: `--<name with dashes>` on the command line
    (unless `dial` is False: a decision only, shown in the plan), a plan row `name`."""
    name: str
    help: str
    default: object = None            # the value when not given (the recipe's `options` win)
    choices: tuple | None = None      # allowed values; None: any value `kind` parses
    kind: Callable = str              # parses the command line's text (int, float, str)
    reason: str = ""                  # the plan's reason for the default
    dial: bool = True
    # (given or None, context) -> (value, reason): where the default depends on the run
    decide: Callable[[object, OptionContext], tuple[object, str]] | None = None


def loss_input_dtype(tower_dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss kernels are fed for towers of `tower_dtype`: bf16 as it is (every kernel
    path accumulates it in fp32 inside); fp16 as fp32, as the plan's loss_input_dtype row says
    (engine/plan/precision.py: fp16's range is too narrow); fp32 and fp64 as they are."""
    return tower_dtype if tower_dtype == torch.bfloat16 else work_dtype(tower_dtype)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x's rows L2-normalised, in loss_input_dtype(x.dtype): bf16 rows stay bf16 (DeepSpeed's
    bf16 mode), fp32 rows are F.normalize's alone. The norm is taken in fp32 and the unit rows
    rounded once: normalised in bf16, the norm would itself be rounded to 8 bits and scale the
    whole row off unit length, which the logits (up to |100|) magnify."""
    return F.normalize(x.to(work_dtype(x.dtype)), dim=-1).to(loss_input_dtype(x.dtype))


class Objective(nn.Module, ABC):
    image_views = 1              # 2: a second augmented view under "image2"
    augment = "crop"             # the augmentation family (engine/data/augment.py)
    text_aug = False             # an EDA copy of the caption under "text_aug"
    mlm = False                  # "text" MLM-masked, targets under "mlm_labels"
    strip_punctuation = False    # captions lower-cased and stripped of punctuation
    weights: dict[str, float]    # term name -> weight in the total loss
    options: tuple[Option, ...] = ()
    min_micro_batch = 1
    # (group, parameter-name prefixes within model_with_loss.ModelWithLoss) for per-group LRs,
    # when the recipe gives `group_lrs`; every parameter must fall in one group.
    lr_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()

    # The paper's numbers as Recipe fields (None: CLIP's, open_clip's numbers for the tower
    # family), and what the CPU smoke run changes of CLIP's smoke run.
    paper_recipe: dict | None = None
    smoke_changes: dict = {}

    @classmethod
    def recipe(cls, model: str, preset: ModelPreset, smoke: bool):
        """The recipe (engine/objectives/recipes.py) for `model`; `smoke`: a preset small enough for a
        CPU. Override where the paper's numbers depend on the towers."""
        if smoke:
            return recipes.smoke_recipe(**cls.smoke_changes)
        if cls.paper_recipe is None:
            return recipes.clip_recipe(preset)
        return recipes.Recipe(method="", model=model, micro_batch_80gb=0, **cls.paper_recipe)

    @classmethod
    def adapt_preset(cls, preset: ModelPreset) -> ModelPreset:
        """The towers this objective trains (default: the preset as it is)."""
        return preset

    @classmethod
    def from_plan(cls, model: TwoTower, options: dict, seed: int) -> "Objective":
        """Built with the options the plan resolved (each declared option by name)."""
        return cls(**options) if options else cls()

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

