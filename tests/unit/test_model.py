"""Towers, temperature, weight-decay groups and the LR schedule."""
import math

import pytest
import torch

from engine.models.presets import PRESETS, get_preset
from engine.models.two_tower import TwoTower, count_parameters
from engine.errors import UserError
from engine.train.optim import param_groups
from engine.train.schedule import lr_at

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TwoTower(get_preset("debug"), EOT, SOT).eval()


def _tokens(rows):
    out = torch.zeros(len(rows), 77, dtype=torch.long)
    for i, ids in enumerate(rows):
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def test_text_is_pooled_at_end_of_text_and_ignores_padding(model):
    base = _tokens([[SOT, 320, 1125, 539, EOT]])
    padded = base.clone()
    padded[0, 5:] = 1234  # anything after the end-of-text token
    changed_before = base.clone()
    changed_before[0, 2] = 999
    with torch.no_grad():
        a, b, c = (model.encode_text(t) for t in (base, padded, changed_before))
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-3)


def test_embeddings_are_unit_length_with_the_preset_width(model):
    with torch.no_grad():
        image = model.encode_image(torch.randn(3, 3, 32, 32))
        text = model.encode_text(_tokens([[SOT, 320, EOT]] * 3))
    width = get_preset("debug").embed_dim
    assert image.shape == text.shape == (3, width)
    assert torch.allclose(image.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_logit_scale_starts_at_one_over_007_and_is_clamped_at_100(model):
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(10.0)
    assert model.scale().item() == 100.0
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(math.log(1 / 0.07))


def test_no_weight_decay_on_vectors_scalars_and_the_temperature(model):
    decay, no_decay = param_groups(model, weight_decay=0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim < 2 for p in no_decay["params"])
    assert any(p is model.logit_scale.log_scale for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_clip_sized_presets_have_clips_parameter_counts():
    # CLIP (Radford et al. 2021): RN50 ~102M, ViT-B/32 ~151M, ViT-B/16 ~150M parameters.
    millions = {n: count_parameters(PRESETS[n], EOT, SOT) / 1e6 for n in ("rn50", "vit-b-32", "vit-b-16")}
    assert millions["rn50"] == pytest.approx(102, abs=2)
    assert millions["vit-b-32"] == pytest.approx(151, abs=2)
    assert millions["vit-b-16"] == pytest.approx(150, abs=2)


def test_any_timm_model_is_a_preset_and_unknown_names_say_what_to_use():
    assert get_preset("resnet18").image_tower == "resnet18"
    with pytest.raises(UserError, match="--model"):
        get_preset("resnet-9000")


def test_schedule_warms_up_linearly_then_cosine_to_min():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # half-way through the cosine
    assert lr_at(110, **kw) == pytest.approx(0.1)
    values = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
