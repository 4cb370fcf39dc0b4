"""Patch dropout: the plan's refusals and decisions, the tower in training and evaluation, the
unmasked tuning's steps, and an export that carries none of it."""
import json
import math

import pytest
import torch

from engine.data.text import ClipTokenizer
from engine.errors import UserError
from engine.export import hf, openclip
from engine.export.clip_layout import clip_towers
from engine.export.publish import export
from engine.models.presets import DEBUG_PRESETS, get_preset
from engine.models.towers import drops_patches, set_patch_dropout, with_patch_dropout
from engine.models.two_tower import TwoTower
from engine.objectives.method import lookup
from engine.plan.dials import Dials
from engine.plan.hardware import Hardware
from engine.plan.optimizer import OptimizerSupport
from engine.plan.patch_dropout import FLIP_UNMASKED_EPOCHS, rate_at
from engine.plan.resolve import resolve
from engine.plan.resume import check_resumable
from engine.train.unmasked_tuning import UnmaskedTuning

TOKENIZER = ClipTokenizer()
CPU = Hardware("cpu", "cpu", 8 * 2**30, None, True, world_size=1, local_world_size=1, nodes=1, cpus_per_node=2)
NO_FUSED = OptimizerSupport(apex_fused=False, deepspeed_fused=False, torch_fused=False)


def plan_for(model="vit-debug", **dials):
    """A CPU plan: the built-in digits' size for the debug presets, YFCC15M's for the others."""
    dials = Dials(model=model, **dials)
    dataset_size = 1_500 if model in DEBUG_PRESETS else 15_000_000
    return resolve(dials, CPU, lookup(dials.method, model), n_params=3_000_000, dataset_size=dataset_size,
                   optimizer_support=NO_FUSED, image_size=get_preset(model).image_size)


@pytest.mark.parametrize("model, dials, fix", [
    ("vit-debug", dict(patch_dropout=1.0), "must lie in [0, 1)"),
    ("vit-debug", dict(patch_dropout=-0.1), "must lie in [0, 1)"),
    ("debug", dict(patch_dropout=0.5), "vit-l-14, vit-h-14), or drop --patch-dropout"),
    ("rn50", dict(patch_dropout=0.5), "(resnet50_clip) has no patch tokens"),
    ("convnext_tiny", dict(patch_dropout=0.5), "has no patch tokens"),
    ("vit-debug", dict(unmasked_steps=5), "add --patch-dropout R (e.g. 0.5) or drop --unmasked-steps"),
    ("vit-debug", dict(patch_dropout=0.5, steps=20, unmasked_steps=20), "use --unmasked-steps 1 or fewer"),
    ("vit-debug", dict(patch_dropout=0.5, unmasked_steps=-1), "--unmasked-steps -1 must lie between 0"),
])
def test_bad_patch_dropout_is_refused_naming_the_fix(model, dials, fix):
    with pytest.raises(UserError) as refusal:
        plan_for(model, **dials)
    assert fix in str(refusal.value)


def test_off_by_default_and_shown_with_how_to_turn_it_on():
    plan = plan_for("debug")
    assert (plan.patch_dropout, plan.unmasked_steps) == (0.0, 0)
    assert "--patch-dropout R drops that share" in plan.table()


@pytest.mark.parametrize("steps, expected", [
    (110, 4),     # the smoke run: 0.32 epoch of 11 steps is 3.52 -> 4, under 5% (5.5)
    (40, 2),      # 5% of 40 caps it
    (10, 0),      # too short for a tuning step: masked to the end
    (2000, 4),    # a long run: 0.32 epoch
])
def test_default_tuning_is_flips_third_of_an_epoch_at_most_a_twentieth_of_the_run(steps, expected):
    plan = plan_for(patch_dropout=0.5, steps=steps, global_batch=128)   # 11 whole steps per epoch
    assert plan.patch_dropout == 0.5 and plan.unmasked_steps == expected
    assert expected == min(math.ceil(FLIP_UNMASKED_EPOCHS * 11), steps // 20)
    row = next(d for d in plan.decisions if d.name == "unmasked_steps")
    assert "table 1e" in row.reason
    assert (f"steps {steps - expected + 1:,}..{steps:,}" in row.reason) == (expected > 0)


def test_given_tuning_steps_win():
    plan = plan_for(patch_dropout=0.75, steps=20, unmasked_steps=3)
    assert plan.unmasked_steps == 3 and "steps 18..20 encode every patch token" in plan.table()


def test_rate_of_each_step():
    assert [rate_at(s, 0.5, 10, 3) for s in range(1, 11)] == [0.5] * 7 + [0.0] * 3
    assert [rate_at(s, 0.5, 10, 0) for s in range(1, 11)] == [0.5] * 10


def test_a_resume_may_change_the_rate_and_the_tuning(tmp_path):
    """The open_clip way (resume with --patch-dropout 0) and a longer tuning are accepted."""
    saved = plan_for(patch_dropout=0.5, steps=40)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step00000020")
    (tmp_path / "plan.json").write_text(json.dumps(saved.to_dict()))
    for now in (plan_for(patch_dropout=0.0, steps=40), plan_for(patch_dropout=0.5, steps=40, unmasked_steps=10)):
        assert check_resumable(tmp_path, now, lookup("clip", "vit-debug")) is not None


def test_only_towers_with_patch_tokens_drop_patches():
    assert [drops_patches(get_preset(n)) for n in ("vit-debug", "vit-b-16", "debug", "rn50")] == [
        True, True, False, False]


def _twins(rate: float):
    """vit-debug with and without patch dropout, with the same weights."""
    preset = get_preset("vit-debug")
    torch.manual_seed(0)
    plain = TwoTower(preset, TOKENIZER.eot_id, TOKENIZER.sot_id)
    dropping = TwoTower(with_patch_dropout(preset, rate), TOKENIZER.eot_id, TOKENIZER.sot_id)
    dropping.load_state_dict(plain.state_dict())   # strict: the same parameters and buffers
    return plain, dropping


def _tokens_into_blocks(model: TwoTower, images: torch.Tensor) -> int:
    seen = []
    handle = model.image.trunk.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[1]))
    try:
        model.image_outputs(images)
    finally:
        handle.remove()
    return seen[0]


def test_training_drops_patch_tokens_and_keeps_the_class_token():
    plain, dropping = _twins(0.5)
    images = torch.randn(4, 3, 32, 32)
    plain.train(), dropping.train()
    assert _tokens_into_blocks(plain, images) == 16 + 1           # 4x4 patches of 8 px, the class token
    assert _tokens_into_blocks(dropping, images) == 8 + 1
    cls_seen = []
    handle = dropping.image.trunk.blocks[0].register_forward_pre_hook(lambda _, a: cls_seen.append(a[0][:, 0]))
    dropping.image_outputs(images)
    handle.remove()
    trunk = dropping.image.trunk
    expected_cls = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(images)))[:, 0]
    assert torch.equal(cls_seen[0], expected_cls)                # the class token is never dropped
    assert set_patch_dropout(dropping, 0.0) == 1                  # the unmasked tuning's steps
    assert _tokens_into_blocks(dropping, images) == 17
    with torch.no_grad():   # and the whole-image forward equals the plain tower's in training too
        assert torch.equal(dropping.encode_image(images), plain.encode_image(images))


def test_evaluation_encodes_whole_images_exactly_as_without_patch_dropout():
    plain, dropping = _twins(0.5)
    images = torch.randn(6, 3, 32, 32)
    plain.eval(), dropping.eval()
    assert _tokens_into_blocks(dropping, images) == 17
    with torch.no_grad():
        assert torch.equal(dropping.encode_image(images), plain.encode_image(images))
    dropping.train()   # and in training it does drop: the embeddings differ
    with torch.no_grad():
        assert not torch.allclose(dropping.encode_image(images), plain.encode_image(images))


def test_export_carries_no_patch_dropout(tmp_path):
    """The tensors of both libraries' layouts equal those of the tower built without it, and the
    exported open_clip model, loaded back by open_clip, embeds whole images (within 1e-5)."""
    plain, dropping = _twins(0.5)
    for fmt, layout in (("open_clip", openclip), ("hf", hf)):
        ours, theirs = layout.state_dict(clip_towers(dropping, fmt)), layout.state_dict(clip_towers(plain, fmt))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    result = export(dropping.eval(), get_preset("vit-debug"), "open_clip", tmp_path / "oc")
    assert result.agreement.ok


def test_the_hook_sets_each_step_before_it_runs_and_a_resume_starts_in_the_right_phase(capsys):
    _, dropping = _twins(0.5)
    layer = dropping.image.trunk.patch_drop
    hook = UnmaskedTuning(dropping, 0.5, total_steps=10, unmasked_steps=3, announce=True)
    hook.batches(iter(()), first_step=1)
    rates = [layer.prob]
    for step in range(1, 10):
        hook.step_done(step, {}, skipped=False)   # then step + 1 runs
        rates.append(layer.prob)
    assert rates == [0.5] * 7 + [0.0] * 3
    assert capsys.readouterr().out.count("step 8: unmasked tuning") == 1
    resumed = UnmaskedTuning(_twins(0.5)[1], 0.5, total_steps=10, unmasked_steps=3, announce=False)
    resumed.batches(iter(()), first_step=9)   # a checkpoint at step 8, inside the phase
    assert resumed.model.image.trunk.patch_drop.prob == 0.0
