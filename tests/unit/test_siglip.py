"""SigLIP's objective as declared in its one file: the paper's initial temperature and bias,
its loss equal to the formula on the towers' normalised embeddings with gradients to the
towers, the temperature and the bias, and its recipes."""
import math

import pytest
import torch
import torch.nn.functional as F

from engine.objectives.method import lookup
from engine.models.two_tower import TwoTower
from engine.objectives.registry import objective_class
from engine.objectives.siglip import SiglipObjective

SOT, EOT = 49406, 49407


def _model_and_batch(n=6, seed=0):
    torch.manual_seed(seed)
    model = TwoTower(lookup("siglip", "debug").preset, EOT, SOT)
    text = torch.zeros(n, 77, dtype=torch.long)
    text[:, 0], text[:, 1:4], text[:, 4] = SOT, torch.randint(1, 49000, (n, 3)), EOT
    return model, {"image": torch.randn(n, 3, 32, 32), "text": text}


def test_temperature_and_bias_start_where_the_paper_puts_them():
    model, _ = _model_and_batch()
    objective = SiglipObjective(model)
    assert model.scale().item() == pytest.approx(10.0) and objective.bias.item() == -10.0
    with torch.no_grad():
        model.logit_scale.log_scale.fill_(math.log(500.0))
    assert model.scale().item() == pytest.approx(500.0)   # unclamped, unlike CLIP's 100


def test_loss_is_the_formula_with_gradients_everywhere():
    model, batch = _model_and_batch()
    objective = SiglipObjective(model)
    with torch.no_grad():
        objective.bias.fill_(-2.0)   # away from the init, so that negatives weigh in
    terms = objective(model, batch)
    x = F.normalize(model.image_outputs(batch["image"]).embedding.float(), dim=-1)
    y = F.normalize(model.text_outputs(batch["text"]).embedding.float(), dim=-1)
    logits = model.scale() * x @ y.T + objective.bias
    labels = 2 * torch.eye(len(x)) - 1
    expected = -F.logsigmoid(labels * logits).sum() / len(x)
    assert terms["siglip"].item() == pytest.approx(expected.item(), rel=1e-5)
    terms["siglip"].backward()
    assert objective.bias.grad is not None and objective.bias.grad.abs().item() > 0
    assert model.logit_scale.log_scale.grad.abs().item() > 0
    assert all(p.grad is not None for p in model.image.parameters() if p.requires_grad)


def test_starting_loss_is_the_positives_near_ten():
    """At t = 10, b = -10 each row's positive costs about log(1 + e^(10 - 10 cos)) and each of
    the n - 1 negatives about e^(10 cos - 10): the loss starts a little under 10 + n e^-10."""
    model, batch = _model_and_batch(n=16)
    with torch.no_grad():
        loss = SiglipObjective(model)(model, batch)["siglip"].item()
    assert 0.69 < loss < 10.01


def test_recipes_and_registry():
    assert objective_class("siglip") is SiglipObjective
    paper = lookup("siglip", "vit-b-32").recipe
    assert (paper.global_batch, paper.lr, paper.weight_decay, paper.betas) == (32_768, 1e-3, 1e-4, (0.9, 0.95))
    smoke, clip_smoke = lookup("siglip", "debug").recipe, lookup("clip", "debug").recipe
    assert (smoke.lr, smoke.global_batch, smoke.epochs) == (clip_smoke.lr, clip_smoke.global_batch, clip_smoke.epochs)
