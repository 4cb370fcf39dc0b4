"""Named model presets: the architecture numbers of each tower pair, as code.

A preset says which timm image tower to build (from config, never downloaded), how its
features reach the shared embedding, and the shape of the text transformer.
Any other timm model name works too: it gets CLIP's base text tower and a linear projection.

An objective may change a preset (its `adapt_preset`: DeCLIP adds the MLM mask token to the
vocabulary, CLIP-Lite swaps in its critic's towers); engine/objectives/method.py applies it.
"""
from dataclasses import dataclass, field

import timm

from engine.errors import UserError


@dataclass(frozen=True)
class ModelPreset:
    name: str
    image_tower: str                 # timm model name
    image_size: int
    embed_dim: int                   # shared image-text embedding width
    text_width: int
    text_layers: int
    text_heads: int
    image_kwargs: dict = field(default_factory=dict)  # passed to timm.create_model
    # "attention_pool": the tower's own head projects to embed_dim (CLIP's ModifiedResNet);
    # "linear": pooled features -> bias-free Linear(features, embed_dim) (CLIP's ViT `proj`);
    # "critic": CLIP-Lite's projection block (engine/models/heads.py), embed_dim wide.
    image_projection: str = "linear"
    # "clip": causal transformer pooled at the end-of-text token, with CLIP's linear projection;
    # "bert": bidirectional transformer pooled at the first ([CLS]) position, critic projection.
    text_tower: str = "clip"
    context_length: int = 77
    vocab_size: int = 49408          # CLIP BPE
    logit_scale_max: float | None = 100.0  # CLIP clamps exp(t) at 100; CLIP-Lite does not clamp


# CLIP's published shapes (Radford et al. 2021, table 19 / open_clip model configs).
_CLIP_TEXT_BASE = dict(text_width=512, text_layers=12, text_heads=8)

PRESETS = {
    # A few hundred thousand parameters: trains to >0.8 zero-shot on the built-in digits in
    # about a minute on two CPU cores. Every component of the real towers, only smaller.
    "debug": ModelPreset(
        name="debug", image_tower="resnet10t", image_size=32, embed_dim=64,
        text_width=64, text_layers=2, text_heads=2,
        image_kwargs=dict(channels=(16, 32, 64, 128), stem_width=8),
    ),
    # The debug size with CLIP's ViT layout (timm's CLIP ViT: class token, pre-norm, no
    # patch-embed bias, token pooling, final norm, GELU, LayerNorm eps 1e-5), so that a smoke
    # run exercises what open_clip's and Hugging Face's native CLIP towers hold
    # (launchers/export.py). 32 px digits in 4x4 patches of 8 px: 16 tokens and the class token.
    # timm's JAX-style init (Xavier linears, LeCun patch embedding): with timm's default the
    # class token comes out nearly the same for every image (mean cosine 0.99998 between digits),
    # and the smoke run reaches 0.40 zero-shot instead of 0.62 in its 110 steps.
    "vit-debug": ModelPreset(
        name="vit-debug", image_tower="vit_base_patch32_clip_224", image_size=32, embed_dim=64,
        text_width=64, text_layers=2, text_heads=2,
        image_kwargs=dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, weight_init="jax"),
    ),
    "rn50": ModelPreset(
        name="rn50", image_tower="resnet50_clip", image_size=224, embed_dim=1024,
        image_projection="attention_pool", **_CLIP_TEXT_BASE,
    ),
    "vit-b-32": ModelPreset(
        name="vit-b-32", image_tower="vit_base_patch32_clip_224", image_size=224, embed_dim=512,
        **_CLIP_TEXT_BASE,
    ),
    "vit-b-16": ModelPreset(
        name="vit-b-16", image_tower="vit_base_patch16_clip_224", image_size=224, embed_dim=512,
        **_CLIP_TEXT_BASE,
    ),
    # open_clip's ViT-L-14 and ViT-H-14 model configs (open_clip/model_configs/): wider text
    # towers than the base one, with 64-wide heads (768 / 12, 1024 / 16), and H's text tower 24
    # layers deep. timm's CLIP ViT-L/14 and ViT-H/14 hold the same image towers: 1024 wide, 24
    # layers, 16 heads (L); 1280 wide, 32 layers, 16 heads of 80 (H); 4x MLPs, 14 px patches.
    "vit-l-14": ModelPreset(
        name="vit-l-14", image_tower="vit_large_patch14_clip_224", image_size=224, embed_dim=768,
        text_width=768, text_layers=12, text_heads=12,
    ),
    "vit-h-14": ModelPreset(
        name="vit-h-14", image_tower="vit_huge_patch14_clip_224", image_size=224, embed_dim=1024,
        text_width=1024, text_layers=24, text_heads=16,
    ),
}


# The presets small enough to train on a CPU: they take the smoke-run recipes (engine/objectives/recipes.py)
# and CLIP-Lite's debug critic.
DEBUG_PRESETS = ("debug", "vit-debug")


def get_preset(name: str) -> ModelPreset:
    """A named preset, or any timm image tower by name with CLIP's base text tower."""
    if name in PRESETS:
        return PRESETS[name]
    if name in timm.list_models():
        size = timm.get_pretrained_cfg(name, allow_unregistered=True)
        input_size = getattr(size, "input_size", None) or (3, 224, 224)
        return ModelPreset(name=name, image_tower=name, image_size=int(input_size[-1]),
                           embed_dim=512, **_CLIP_TEXT_BASE)
    raise UserError(
        f"unknown --model {name!r}: use one of {', '.join(PRESETS)} "
        "or any timm image model name (python -c 'import timm; print(timm.list_models())')"
    )
