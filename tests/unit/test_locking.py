"""engine/models/locking.py: what --lock and --unlock-last leave to train, and the mode a locked tower keeps."""
import pytest
import torch

from engine.data.text import ClipTokenizer
from engine.models.locking import count_trainable, lock, unlock_problem
from engine.models.presets import get_preset
from engine.models.two_tower import TwoTower

TOKENIZER = ClipTokenizer()


def build(name: str) -> TwoTower:
    with torch.device("meta"):
        return TwoTower(get_preset(name), TOKENIZER.eot_id, TOKENIZER.sot_id)


def trained_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_a_whole_lock_freezes_the_tower_and_keeps_it_in_eval_mode():
    model = build("debug")   # a ResNet with batch norm: its statistics must stay
    lock(model, "image")
    assert not any(n.startswith("image.") for n in trained_names(model))
    assert {n.split(".")[0] for n in trained_names(model)} == {"text", "logit_scale"}
    model.train()
    assert not model.image.training and all(not m.training for m in model.image.modules())
    assert model.text.training
    assert count_trainable(model) == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("image."))


@pytest.mark.parametrize("which, last", [("image", 1), ("text", 1), ("image", 2)])
def test_unlock_last_trains_the_last_blocks_and_what_follows_them(which, last):
    model = build("vit-debug")
    lock(model, which, last)
    names = trained_names(model)
    tower = [n for n in names if n.startswith(f"{which}.")]
    if which == "image":
        blocks = {int(n.split(".")[3]) for n in tower if n.startswith("image.trunk.blocks.")}
        assert blocks == set(range(2 - last, 2))
        assert {"image.trunk.norm.weight", "image.proj.weight"} <= names
        assert "image.trunk.cls_token" not in names and "image.trunk.patch_embed.proj.weight" not in names
    else:
        layers = {int(n.split(".")[5]) for n in tower if ".encoder.layers." in n}
        assert layers == {1}
        assert "text.transformer.text_projection.weight" in names
        assert not any("embeddings" in n for n in tower)
    other = "text" if which == "image" else "image"
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(f"{other}."))
    assert getattr(model, which).training == model.training   # partly locked: its mode follows the model's


def test_unlock_problems_name_the_fix():
    assert "has none: lock it whole" in unlock_problem(build("debug"), "image", 1)
    assert "the text tower has 2 blocks" in unlock_problem(build("vit-debug"), "text", 3)
    assert unlock_problem(build("vit-debug"), "image", 2) is None
