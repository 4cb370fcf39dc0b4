"""Activation checkpointing of the towers (engine/models/activation_checkpointing.py): with it, the
forward, every gradient and BatchNorm's running statistics are those without it, for each kind of
tower (timm ResNet and ViT trunks, CLIP's and BERT's text transformers); and the blocks really are
recomputed (fewer tensors kept for the backward)."""
import copy

import pytest
import torch

from engine.models.two_tower import TwoTower
from engine.objectives.method import lookup

SOT, EOT = 49406, 49407
# (method, preset): ResNet + CLIP text; ViT + CLIP text; CLIP-Lite's ResNet + BERT text (dropout 0.1).
TOWERS = (("clip", "debug"), ("clip", "vit-debug"), ("clip-lite", "debug"))


def _batch(preset, n=6):
    torch.manual_seed(1)
    images = torch.randn(n, 3, preset.image_size, preset.image_size)
    tokens = torch.randint(1, 4000, (n, 12))
    tokens[:, 0], tokens[:, 8] = SOT, EOT
    tokens[:, 9:] = 0
    return images, tokens


def _loss(model, images, tokens):
    image, text = model.image_outputs(images), model.text_outputs(tokens)
    # Every output, so that every parameter gets a gradient.
    return (image.embedding.square().mean() + text.embedding.square().mean()
            + image.features.mean() + text.features.mean() + text.token_states.square().mean())


def _saved_count(model, images, tokens) -> int:
    """Tensors kept for the backward by one forward."""
    saved = []
    torch.manual_seed(2)  # the same dropout on both sides: BatchNorm's statistics move alike
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _loss(model, images, tokens)
    return len(saved)


@pytest.mark.parametrize("method,name", TOWERS)
def test_checkpointed_towers_train_exactly_as_without(method, name):
    preset = lookup(method, name).preset
    torch.manual_seed(0)
    plain = TwoTower(preset, EOT, SOT).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpoint_activations(True)
    images, tokens = _batch(preset)
    assert _saved_count(checkpointed, images, tokens) < _saved_count(plain, images, tokens) / 2
    for step in range(2):  # the second step runs on the statistics the first left
        losses = []
        for model in (plain, checkpointed):
            torch.manual_seed(10 + step)  # the same dropout draws on both sides
            model.zero_grad()
            loss = _loss(model, images, tokens)
            loss.backward()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-7)
        for (n, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
            assert p.grad is not None or n.startswith("logit_scale"), n
            if p.grad is None:
                continue
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=n)
        for (n, b), c in zip(plain.named_buffers(), checkpointed.buffers()):
            torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=n)  # BatchNorm updated once, not twice


def test_checkpointing_can_be_turned_off_again():
    preset = lookup("clip", "vit-debug").preset
    model = TwoTower(preset, EOT, SOT, activation_checkpointing=True).train()
    images, tokens = _batch(preset)
    fewer = _saved_count(model, images, tokens)
    model.checkpoint_activations(False)
    assert _saved_count(model, images, tokens) > 2 * fewer
