"""Model FLOPs: the counter beside analytic transformer counts on fresh random shapes, beside
open_clip's published profile for the real presets, and what TFLOP/s and MFU make of them."""
import random
import time

import pytest
import torch

from engine.data.text import ClipTokenizer
from engine.models.presets import ModelPreset, get_preset
from engine.models.two_tower import TwoTower, count_parameters
from engine.observe.flops import (TRAINING_PER_FORWARD, ModelFlops, count_model_flops, peak_tflops,
                                  views_encoded)
from engine.objectives.registry import objective_class


def _layers(layers: int, tokens: int, width: int) -> int:
    """A pre-norm transformer layer with a 4x MLP, per sequence: q, k, v and output projections
    (4 x 2 L d^2), the MLP (2 x 2 L d 4d), scores and weighted values (2 x 2 L^2 d)."""
    return layers * (24 * tokens * width ** 2 + 4 * tokens ** 2 * width)


def _shapes(rng: random.Random) -> dict:
    heads, head_dim = rng.randint(1, 4), rng.choice([8, 16])
    return dict(heads=heads, width=heads * head_dim, layers=rng.randint(1, 3), context=rng.randint(4, 40),
                embed=rng.choice([16, 24, 48]), patch=rng.choice([4, 8]), patches_per_side=rng.randint(2, 5),
                vit_heads=rng.randint(1, 3), vit_layers=rng.randint(1, 3))


def _preset(s: dict, text_tower: str) -> ModelPreset:
    vit_width = s["vit_heads"] * 16
    size = s["patch"] * s["patches_per_side"]
    return ModelPreset(
        name="random", image_tower="vit_base_patch16_clip_224", image_size=size, embed_dim=s["embed"],
        text_width=s["width"], text_layers=s["layers"], text_heads=s["heads"], context_length=s["context"],
        text_tower=text_tower, image_projection="linear",
        image_kwargs=dict(img_size=size, patch_size=s["patch"], embed_dim=vit_width, depth=s["vit_layers"],
                          num_heads=s["vit_heads"]))


def _count(preset: ModelPreset) -> ModelFlops:
    tokenizer = ClipTokenizer(preset.context_length)
    return count_model_flops(preset, tokenizer.eot_id, tokenizer.sot_id, views=(1, 1), device_name="cpu",
                             precision="fp32", world_size=1)


@pytest.mark.parametrize("text_tower", ["clip", "bert"])
def test_the_counter_equals_the_analytic_count_on_fresh_random_shapes(text_tower):
    rng = random.Random()  # fresh shapes every run; they are in the message when one fails
    for _ in range(2):
        s = _shapes(rng)
        flops = _count(_preset(s, text_tower))
        d, e, length = s["width"], s["embed"], s["context"]
        if text_tower == "clip":  # CLIP's causal tower, projected at the end-of-text token
            text = _layers(s["layers"], length, d) + 2 * d * e
        else:  # BERT (counted on the CPU: it reads its mask's values): + its pooler on [CLS];
            # CLIP-Lite's critic: Linear(d, e), Linear(e, e) and the shortcut Linear(d, e)
            text = _layers(s["layers"], length, d) + 2 * d * d + 2 * d * e + 2 * e * e + 2 * d * e
        vit_width, patches = s["vit_heads"] * 16, s["patches_per_side"] ** 2
        image = (2 * patches * 3 * s["patch"] ** 2 * vit_width          # patch embedding
                 + _layers(s["vit_layers"], patches + 1, vit_width)    # + the class token
                 + 2 * vit_width * e)                                  # bias-free projection
        assert (flops.text_forward, flops.image_forward) == (text, image), s


# open_clip's docs/model_profile.csv (github.com/mlfoundations/open_clip): GFLOPs of one image and
# one 77-token caption, counted by fvcore with one multiply-add as 2 FLOPs.
OPEN_CLIP_PROFILE = {"vit-b-16": (35.13, 5.96), "vit-b-32": (8.82, 5.96), "rn50": (12.22, 5.96),
                     "vit-l-14": (162.03, 13.3), "vit-h-14": (334.59, 47.09)}


@pytest.mark.parametrize("model", sorted(OPEN_CLIP_PROFILE))
def test_the_real_presets_match_open_clips_published_profile_and_count_quickly(model):
    started = time.perf_counter()
    flops = _count(get_preset(model))
    elapsed = time.perf_counter() - started
    image, text = OPEN_CLIP_PROFILE[model]
    assert flops.image_forward / 1e9 == pytest.approx(image, abs=0.006)
    assert flops.text_forward / 1e9 == pytest.approx(text, abs=0.006)
    assert elapsed < 15, f"counting {model} took {elapsed:.1f} s: it runs at every start, on every rank"


@pytest.mark.parametrize("model, open_clip_name", [("vit-l-14", "ViT-L-14"), ("vit-h-14", "ViT-H-14")])
def test_the_large_presets_have_open_clips_parameters_and_flops_exactly(model, open_clip_name):
    """open_clip's own model, built from its config on the meta device (no weights allocated),
    counted the same way as ours: every parameter and every FLOP of each tower equal, and the
    attention heads (which change neither count) the same in both towers."""
    open_clip = pytest.importorskip("open_clip")
    from benchmarks.vs_openclip import TextOnly, counted_flops

    preset = get_preset(model)
    tokenizer = ClipTokenizer(preset.context_length)
    with torch.device("meta"):
        theirs = open_clip.CLIP(**open_clip.get_model_config(open_clip_name))
        ours_model = TwoTower(preset, tokenizer.eot_id, tokenizer.sot_id)
    assert ours_model.image.trunk.blocks[0].attn.num_heads == theirs.visual.transformer.resblocks[0].attn.num_heads
    assert ours_model.text.transformer.config.num_attention_heads == theirs.transformer.resblocks[0].attn.num_heads
    assert count_parameters(preset, tokenizer.eot_id, tokenizer.sot_id) == sum(p.numel() for p in theirs.parameters())
    ours = _count(preset)
    image = torch.zeros(1, 3, preset.image_size, preset.image_size, device="meta")
    tokens = torch.full((1, preset.context_length), tokenizer.eot_id, device="meta")
    assert ours.image_forward == counted_flops(theirs.visual, image)
    assert ours.text_forward == counted_flops(TextOnly(theirs), tokens)


@pytest.mark.parametrize("method, views", [("clip", (1, 1)), ("declip", (2, 2)), ("clip-lite", (1, 1))])
def test_each_objective_encodes_the_views_it_declares(method, views):
    assert views_encoded(objective_class(method)) == views


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA A100-SXM4-80GB", "bf16", 312), ("NVIDIA A100 80GB PCIe", "bf16", 312),
    ("NVIDIA H100 80GB HBM3", "bf16", 989), ("NVIDIA H100 PCIe", "bf16", 756), ("NVIDIA H100 NVL", "bf16", 835),
    ("NVIDIA H200", "bf16", 989), ("NVIDIA H200 NVL", "bf16", 835),
    ("Tesla V100-SXM2-32GB", "fp16", 125), ("Tesla V100-PCIE-16GB", "fp16", 112),
    ("Tesla V100S-PCIE-32GB", "fp16", 130),
    ("NVIDIA L4", "bf16", 121), ("NVIDIA L40S", "bf16", 362), ("NVIDIA L40", "bf16", 181),
    ("NVIDIA A10", "bf16", 125), ("Tesla T4", "fp16", 65),
    ("NVIDIA A10G", "bf16", None),        # a name that starts like a listed one is not that one
    ("NVIDIA GeForce RTX 4090", "bf16", None), ("cpu", "fp32", None),
    ("NVIDIA A100-SXM4-80GB", "fp32", None),  # the table holds tensor-core bf16/fp16 rates only
])
def test_peak_by_device_name(name, precision, peak):
    assert peak_tflops(name, precision) == peak


def test_tflops_and_mfu_from_samples_per_second():
    flops = ModelFlops(image_forward=30 * 10**9, text_forward=6 * 10**9, image_views=2, text_views=2,
                       peak_tflops=312.0, world_size=8, device_name="NVIDIA A100-SXM4-80GB", precision="bf16")
    assert flops.training_per_sample == TRAINING_PER_FORWARD * 72 * 10**9
    rates = flops.rates(samples_per_s=2000)
    assert rates["tflops_per_s"] == pytest.approx(216 * 2000 / 1000)
    assert rates["mfu"] == pytest.approx(432 / (312 * 8))
    assert "MFU against NVIDIA A100-SXM4-80GB's 312 TFLOP/s bf16" in flops.describe()


def test_the_cpu_logs_tflops_without_mfu_and_says_why():
    flops = ModelFlops(image_forward=10**9, text_forward=10**9, image_views=1, text_views=1,
                       peak_tflops=None, world_size=2, device_name="cpu", precision="fp32")
    assert set(flops.rates(100.0)) == {"tflops_per_s"}
    assert "MFU not (no peak known for cpu)" in flops.describe()
