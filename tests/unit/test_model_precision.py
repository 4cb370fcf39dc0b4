"""What a bf16 model computes in fp32 (engine/plan/precision.py): torch's LayerNorm normalises a
bf16 input in fp32 already (so the towers keep torch's norms), the temperature is an fp32 value,
and a bf16 model embeds close to its fp32 self."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.data.text import ClipTokenizer
from engine.models.presets import get_preset
from engine.models.two_tower import TwoTower

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _model(name):
    preset = get_preset(name)
    tokenizer = ClipTokenizer(preset.context_length)
    torch.manual_seed(0)
    return TwoTower(preset, tokenizer.eot_id, tokenizer.sot_id)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_normalises_a_bf16_layernorm_in_fp32(device):
    """The claim behind the plan's fp32_parts row: a bf16 LayerNorm is the fp32 computation on
    the same bf16 input and weights, rounded once to bf16 (open_clip's LayerNormFp32 would add
    casts and an fp32 copy of every norm's input for nothing). A kernel that reduced in bf16
    would miss by far more than the rare last-bit tie allowed here."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(2)
    norm = nn.LayerNorm(768).to(device)
    with torch.no_grad():
        norm.weight.normal_(1, 0.5), norm.bias.normal_(0, 0.5)
    x = (torch.randn(256, 768, device=device) * 30 + 200).bfloat16()   # a large mean: bf16 sums would fail
    low = copy.deepcopy(norm).bfloat16()
    computed = low(x)
    exact = F.layer_norm(x.float(), (768,), low.weight.float(), low.bias.float())
    differ = computed != exact.bfloat16()
    assert differ.float().mean() < 1e-3
    # Where they differ, both are neighbours of the fp32 value (the bf16 step there is 2^(e-8)),
    # or, near 0 where w * x_hat and b cancel, fp32 rounding of those O(1) terms apart.
    step = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 8).clamp(min=1e-5)
    assert ((computed.float() - exact).abs()[differ] <= step[differ]).all()


def test_the_temperature_is_an_fp32_value_in_a_bf16_model():
    model = _model("debug").bfloat16()
    scale = model.scale()
    assert scale.dtype == torch.float32
    assert scale.item() == torch.exp(model.logit_scale.log_scale.float()).item()


def test_a_bf16_model_embeds_close_to_its_fp32_self():
    model = _model("vit-debug")
    low = copy.deepcopy(model).bfloat16()
    size = model.image.trunk.patch_embed.img_size
    images = torch.randn(4, 3, *size)
    tokens = torch.zeros(4, 77, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 49406, torch.randint(300, 4000, (4, 5)), 49407
    for full, half in ((model.encode_image(images), low.encode_image(images)),
                       (model.encode_text(tokens), low.encode_text(tokens))):
        assert half.dtype == torch.bfloat16
        cosine = F.cosine_similarity(full, half.float(), dim=-1)
        assert (cosine > 0.99).all(), cosine


def test_towers_under_autocast_compute_in_bf16_and_hand_fp32_to_what_follows():
    """bf16 without ZeRO (engine/plan/precision.py): fp32 weights, the towers' matrix products in
    bf16, their outputs (embeddings, features, token states) back in fp32 for the heads and the
    loss, and fp32 gradients that match an fp32 model's to bf16's precision."""
    model = _model("vit-debug")
    mixed = copy.deepcopy(model)
    mixed.autocast_dtype = torch.bfloat16
    size = model.image.trunk.patch_embed.img_size
    torch.manual_seed(1)
    images = torch.randn(8, 3, *size)
    tokens = torch.zeros(8, 77, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 49406, torch.randint(300, 4000, (8, 5)), 49407
    seen = []
    hook = mixed.image.trunk.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    outputs = {"image": (model.image_outputs(images), mixed.image_outputs(images)),
               "text": (model.text_outputs(tokens), mixed.text_outputs(tokens))}
    hook.remove()
    assert seen == [torch.bfloat16]                       # inside the tower: bf16
    for name, (full, low) in outputs.items():
        for a, b in zip(full, low):
            if a is None:
                continue
            assert b.dtype == torch.float32, name          # out of it: fp32
            cosine = F.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1)
            assert (cosine > 0.99).all() and not torch.equal(a, b), name
    for net in (model, mixed):
        (net.encode_image(images) * net.encode_text(tokens)).sum().backward()
    for (name, p), q in zip(model.named_parameters(), mixed.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        assert q.dtype == torch.float32 and (q.grad is None or q.grad.dtype == torch.float32), name
    # All gradients as one vector: some (the attention keys' bias) are zero but for rounding.
    full, low = (torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
                 for net in (model, mixed))
    assert F.cosine_similarity(full, low, dim=0) > 0.99
