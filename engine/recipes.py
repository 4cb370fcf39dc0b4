"""Paper recipes per method x model, as typed Python.

A recipe holds the hyperparameters a method's paper (or the reference trainer) used for a
tower pair; the planner turns it into a run on whatever hardware is present. Every number
carries its provenance in `Recipe.source`, which the plan table shows as the reason.

    from engine.recipes import get_recipe
    get_recipe("clip", "vit-b-32").lr    # 5e-4

DeCLIP's recipe is the paper's for `rn50` and `vit-b-32` (and is applied to other towers as
the best available guess); CLIP-Lite's is the paper's for `rn50`.
"""
from dataclasses import dataclass

from engine.errors import UserError
from engine.models.presets import DEBUG_PRESETS, get_preset


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
    queue_size: int = 0                # DeCLIP's nearest-neighbour queue


METHODS = ("clip", "declip", "clip-lite")

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
# A timm tower we have no measurement for gets a conservative value.
_MICRO_BATCH_80GB = {"debug": 1024, "vit-debug": 1024, "rn50": 256, "vit-b-32": 512, "vit-b-16": 256}
_MICRO_BATCH_80GB_UNMEASURED = 128

# The CPU smoke run: the built-in digits dataset (~1,500 pairs of 32x32 images) and the
# ~0.5M-parameter debug towers. Tuned so that a laptop sees zero-shot accuracy climb within
# a minute or two; these are the numbers to change when tuning that run.
_DEBUG_SMOKE_RUN = dict(global_batch=128, epochs=10, lr=3e-3, min_lr=0.0, warmup_steps=20,
                        weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, grad_clip=1.0,
                        crop_scale=(0.8, 1.0))
_DEBUG_SOURCE = "smoke-run recipe: debug towers, built-in digits, CPU"


# DeCLIP's YFCC15M configs (experiments/declip_experiments/yfcc15m/*/config.yaml in
# Sense-GVT/DeCLIP), the same for ResNet-50 and ViT-B/32: AdamW (0.9, 0.98), eps 1e-8, weight
# decay 0.1; LR warmed from 1e-4 to 1e-3 over 2,500 steps, then cosine to 0; 128 per GPU x 32
# GPUs; 32 epochs (the paper); MoCo-v2 crops; no gradient-norm clipping; NN queue of 65,536.
_DECLIP = dict(global_batch=4096, epochs=32, lr=1e-3, min_lr=0.0, warmup_steps=2500,
               warmup_start_lr=1e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-8,
               grad_clip=None, crop_scale=(0.2, 1.0), queue_size=65_536)
_DECLIP_SOURCE = "paper recipe (DeCLIP YFCC15M config)"
# CLIP-Lite's COCO recipe (the paper, section 4, and 4m4n5/CLIP-Lite's configs): global batch
# 1,024 (8 GPUs), SGD momentum 0.9, weight decay 1e-4, Lookahead; per-group LRs image tower
# 0.2, text tower and heads 1e-3; 10k warmup steps then cosine to 0; 250k iterations; gradient
# norm clipped at 10; crops of scale (0.2, 1).
_CLIP_LITE = dict(global_batch=1024, epochs=0.0, steps=250_000, lr=0.2, min_lr=0.0,
                  warmup_steps=10_000, weight_decay=1e-4, betas=(0.9, 0.999), eps=1e-8,
                  grad_clip=10.0, crop_scale=(0.2, 1.0), optimizer="sgd_lookahead",
                  momentum=0.9, group_lrs=(("image", 0.2), ("text", 1e-3), ("heads", 1e-3)))
_CLIP_LITE_SOURCE = "paper recipe (CLIP-Lite COCO)"
# The CPU smoke runs of DeCLIP and CLIP-Lite keep every component of their objectives and
# optimisers, at the smoke run's batch and length.
_DEBUG_DECLIP = dict(_DEBUG_SMOKE_RUN, crop_scale=(0.2, 1.0), queue_size=1024)
_DEBUG_CLIP_LITE = dict(_DEBUG_SMOKE_RUN, lr=0.2, weight_decay=1e-4, grad_clip=10.0,
                        crop_scale=(0.2, 1.0), optimizer="sgd_lookahead", momentum=0.9,
                        group_lrs=(("image", 0.2), ("text", 0.05), ("heads", 0.05)))


def get_recipe(method: str, model: str) -> Recipe:
    """The recipe for `method` on `model` (a preset name or any timm image tower)."""
    if method not in METHODS:
        raise UserError(f"unknown --method {method!r}: use one of {', '.join(METHODS)}")
    preset = get_preset(model)   # raises UserError naming the valid models
    micro_batch_80gb = _MICRO_BATCH_80GB.get(model, _MICRO_BATCH_80GB_UNMEASURED)
    common = dict(method=method, model=model, micro_batch_80gb=micro_batch_80gb)
    if model in DEBUG_PRESETS:
        numbers = {"clip": _DEBUG_SMOKE_RUN, "declip": _DEBUG_DECLIP,
                   "clip-lite": _DEBUG_CLIP_LITE}[method]
        return Recipe(**common, source=_DEBUG_SOURCE, **numbers)
    if method == "declip":
        return Recipe(**common, source=_DECLIP_SOURCE, **_DECLIP)
    if method == "clip-lite":
        return Recipe(**common, source=_CLIP_LITE_SOURCE, **_CLIP_LITE)
    is_vit = "vit" in preset.image_tower
    return Recipe(method=method, model=model, micro_batch_80gb=micro_batch_80gb,
                  source=_CLIP_SOURCE.format(family="ViT" if is_vit else "ResNet"),
                  **_CLIP_SCHEDULE, **(_VIT_ADAM if is_vit else _RESNET_ADAM))
