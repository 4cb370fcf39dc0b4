"""Recipes: the hyperparameters a method's paper (or reference trainer) used for a tower pair,
as typed Python. The planner turns a recipe into a run on whatever hardware is present. Every
number carries its provenance in `Recipe.source`, which the plan table shows as the reason.

    from engine.objectives.method import lookup
    lookup("clip", "vit-b-32").recipe.lr    # 5e-4

Each objective declares its own recipes (engine/objectives/<method>.py, `recipe()`); what is
shared lives here: CLIP's schedule per tower family (open_clip's numbers), the CPU smoke run,
and the micro-batch that fits a device (`with_device_fit`).
"""
from dataclasses import dataclass, replace

from engine.models.presets import ModelPreset


@dataclass(frozen=True)
class Recipe:
    method: str
    model: str
    global_batch: int
    epochs: float
    lr: float                          # peak learning rate at `global_batch`
    min_lr: float                      # end of the cosine decay
    warmup_steps: int
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    grad_clip: float | None            # max gradient norm; None = no clipping
    crop_scale: tuple[float, float]    # RandomResizedCrop area scale
    micro_batch_80gb: int              # per-device micro-batch that fits 80 GB in bf16
    source: str                        # where the numbers come from
    optimizer: str = "adamw"           # "adamw" or "sgd_lookahead" (CLIP-Lite)
    momentum: float | None = None      # SGD only
    # Per-parameter-group peak LRs at `global_batch` ("image", "text", "heads"); empty = `lr` for all.
    group_lrs: tuple[tuple[str, float], ...] = ()
    warmup_start_lr: float = 0.0       # LR of the first warmup step's ramp start
    steps: int | None = None           # a paper that trains for a number of iterations, not epochs
    # Defaults of the objective's own options in this recipe (DeCLIP's queue size), by name.
    options: tuple[tuple[str, object], ...] = ()


# open_clip's training defaults (open_clip/training/params.py and its README recipes).
# open_clip sets only a per-GPU batch; the global batch follows DeCLIP's YFCC15M
# comparison (128 per GPU x 32 GPUs), the setting the CLIP baseline numbers come from.
_CLIP_SCHEDULE = dict(global_batch=4096, epochs=32, lr=5e-4, min_lr=0.0, warmup_steps=10_000,
                      weight_decay=0.2, grad_clip=None, crop_scale=(0.9, 1.0))
# open_clip picks Adam's betas/eps by tower family: transformers are less stable with
# beta2 = 0.999, so ViT towers use CLIP's (0.9, 0.98) and eps 1e-6.
_VIT_ADAM = dict(betas=(0.9, 0.98), eps=1e-6)
_RESNET_ADAM = dict(betas=(0.9, 0.999), eps=1e-8)
_CLIP_SOURCE = ("open_clip defaults for {family} towers; global batch from DeCLIP's YFCC15M "
                "runs (open_clip sets only a per-GPU batch)")

# Per-device micro-batch that fits an 80 GB GPU in bf16 without activation checkpointing,
# from the towers' activation sizes at 224 px (ViT-B/16 has 4x the tokens of ViT-B/32).
# rn50 and vit-b-32 were measured on an H100 (benchmarks/results/step_gpu_*.json: 21 and 19.5 GB
# for CLIP, 37 and 39 GB for DeCLIP's two views). vit-l-14 and vit-h-14 are estimates, not yet
# measured: their towers keep 7.5x and 13x ViT-B/32's activations per sample (32 bytes per token
# and unit of width per layer, Korthikanti et al. 2022, scaled by the measured ViT-B/32 steps), so
# DeCLIP's two views of 128 (L) and 64 (H) samples take about 68 and 60 GB beside the model states
# (benchmarks/plans.py prints the estimate for each plan).
# A timm tower we have no measurement for gets a conservative value.
_MICRO_BATCH_80GB = {"debug": 1024, "vit-debug": 1024, "rn50": 256, "vit-b-32": 512, "vit-b-16": 256,
                     "vit-l-14": 128, "vit-h-14": 64}
_MICRO_BATCH_80GB_UNMEASURED = 128

# The CPU smoke run: the built-in digits dataset (~1,500 pairs of 32x32 images) and the
# ~0.5M-parameter debug towers. Tuned so that a laptop sees zero-shot accuracy climb within
# a minute or two; these are the numbers to change when tuning that run.
_DEBUG_SMOKE_RUN = dict(global_batch=128, epochs=10, lr=3e-3, min_lr=0.0, warmup_steps=20,
                        weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, grad_clip=1.0,
                        crop_scale=(0.8, 1.0))
SMOKE_SOURCE = "smoke-run recipe of the debug towers (tuned on the built-in digits, CPU)"


def clip_recipe(preset: ModelPreset, **changes) -> "Recipe":
    """open_clip's numbers for the preset's tower family (`changes` override any)."""
    is_vit = "vit" in preset.image_tower
    numbers = dict(_CLIP_SCHEDULE, **(_VIT_ADAM if is_vit else _RESNET_ADAM),
                   source=_CLIP_SOURCE.format(family="ViT" if is_vit else "ResNet"))
    return Recipe(method="", model=preset.name, micro_batch_80gb=0, **{**numbers, **changes})


def smoke_recipe(**changes) -> "Recipe":
    """The CPU smoke run's numbers (`changes` override any, e.g. an objective's crop scale)."""
    return Recipe(method="", model="", micro_batch_80gb=0, **{**_DEBUG_SMOKE_RUN, "source": SMOKE_SOURCE, **changes})


def with_device_fit(recipe: Recipe, method: str, model: str) -> Recipe:
    """`recipe` named for `method` and `model`, with the micro-batch that fits an 80 GB device."""
    return replace(recipe, method=method, model=model,
                   micro_batch_80gb=_MICRO_BATCH_80GB.get(model, _MICRO_BATCH_80GB_UNMEASURED))
