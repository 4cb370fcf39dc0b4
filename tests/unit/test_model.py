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


def _framed(rows, context):
    out = torch.zeros(len(rows), context, dtype=torch.long)
    for i, ids in enumerate(rows):
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def test_declip_preset_adds_the_mask_token_to_the_vocabulary():
    from engine.data.mlm import MASK_ID, VOCAB_WITH_MASK
    from engine.objectives.method import lookup

    preset = lookup("declip", "debug").preset
    assert preset.vocab_size == VOCAB_WITH_MASK
    model = TwoTower(preset, EOT, SOT).eval()
    out = model.text_outputs(_framed([[SOT, MASK_ID, 320, EOT]], 77))
    assert out.token_states.shape == (1, 77, preset.text_width)
    # The pooled features are the token state at the end-of-text position.
    assert torch.equal(out.features[0], out.token_states[0, 3])


def test_clip_lite_towers_bert_cls_pooling_critic_projections_unclamped_scale():
    from engine.objectives.method import lookup

    preset = lookup("clip-lite", "debug", 3).preset
    assert (preset.text_tower, preset.image_projection, preset.text_layers) == ("bert", "critic", 3)
    assert lookup("clip-lite", "rn50").preset.image_tower == "resnet50"
    torch.manual_seed(0)
    model = TwoTower(preset, EOT, SOT).eval()
    assert len(model.text.transformer.encoder.layer) == 3
    base = _framed([[SOT, 320, 1125, EOT], [SOT, 539, EOT]], preset.context_length)
    padded = base.clone()
    padded[0, 4:], padded[1, 3:] = 777, 888  # after the end token: masked out of attention
    changed = base.clone()
    changed[0, 2] = 999                       # bidirectional: any real token changes [CLS]
    with torch.no_grad():
        a, b, c = (model.text_outputs(t) for t in (base, padded, changed))
        image = model.image_outputs(torch.randn(2, 3, 32, 32))
    assert torch.allclose(a.embedding, b.embedding, atol=1e-5)
    assert not torch.allclose(a.embedding[0], c.embedding[0], atol=1e-4)
    assert a.embedding.shape == image.embedding.shape == (2, preset.embed_dim)
    assert image.features.shape == (2, model.image.feature_dim)
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(math.exp(10.0), rel=1e-5)


def test_critic_projection_starts_as_a_noisy_identity():
    from engine.models.heads import CriticProjection

    block = CriticProjection(16, 32)
    w = block.shortcut.weight
    assert torch.equal(w[range(16), range(16)], torch.ones(16))
    off_diagonal = w.clone()
    off_diagonal[range(16), range(16)] = 0
    assert off_diagonal.abs().max() <= 0.01 and off_diagonal.abs().max() > 0


def test_warmup_can_start_from_a_given_lr_as_declip():
    kw = dict(lr=1e-3, min_lr=0.0, warmup_steps=2500, total_steps=10_000, start_lr=1e-4)
    assert lr_at(-1, **kw) == pytest.approx(1e-4)
    assert lr_at(1249, **kw) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(2499, **kw) == pytest.approx(1e-3)


def test_norm_buffers_follow_their_parameters_dtype():
    # DeepSpeed's bf16 mode casts parameters only; cuDNN's BatchNorm backward then fails on the
    # float32 running statistics (seen on an H100 with rn50). align_buffer_dtypes fixes them up.
    from engine.model_with_loss import align_buffer_dtypes

    model = TwoTower(get_preset("debug"), EOT, SOT)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    align_buffer_dtypes(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.running_mean.dtype == m.running_var.dtype == torch.bfloat16 for m in norms)
    assert all(m.num_batches_tracked.dtype == torch.long for m in norms)
