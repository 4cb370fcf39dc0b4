"""--lock image on 2 ranks at ZeRO 0-3 (real DeepSpeed, gloo): after training, the locked tower's
weights equal --init's exactly, the text tower moved, no optimizer state exists for a locked
weight, and the plan counts only the trained parameters; bad combinations are refused by
prepare(), before any work (the launcher's exit 2 for a UserError is tested in test_bad_input)."""
import json

import pytest
import torch

from launching import check, launch

from engine.data.text import ClipTokenizer
from engine.eval.load_run import find_checkpoint, load_run
from engine.export import plain
from engine.models.presets import get_preset
from engine.models.two_tower import TwoTower
from engine.train import reshard

PRESET = get_preset("vit-debug")
SHORT = ["--model", "vit-debug", "--precision", "fp32", "--global-batch", "32", "--steps", "2",
         "--log-every", "1", "--eval-every", "2", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A clipzero --format safetensors folder of a randomly initialised vit-debug."""
    folder = tmp_path_factory.mktemp("init") / "vit-debug"
    folder.mkdir()
    tokenizer = ClipTokenizer(PRESET.context_length)
    torch.manual_seed(11)
    model = TwoTower(PRESET, tokenizer.eot_id, tokenizer.sot_id)
    plain.write(model, folder)
    (folder / plain.CARD_FILE).write_text(json.dumps({"architecture": plain.architecture(PRESET)}))
    return folder, {n: t.clone() for n, t in model.state_dict().items()}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_the_locked_tower_ends_as_it_began_and_has_no_optimizer_state(stage, source, cache_env, tmp_path):
    folder, weights = source
    out = tmp_path / "run"
    result = launch([*SHORT, "--zero-stage", str(stage), "--init", folder, "--lock", "image", "--out", out],
                    cache_env, ranks=2)
    check(result)
    plan = json.loads((out / "plan.json").read_text())
    image_params = sum(t.numel() for n, t in weights.items() if n.startswith("image."))
    assert plan["lock"] == "image" and plan["trainable_params"] == plan["n_params"] - image_params
    assert "trainable_params" in result.stdout and "fp32 master copy or optimizer states" in result.stdout

    trained = load_run(out).model.state_dict()
    for name, tensor in weights.items():
        if name.startswith("image."):
            assert torch.equal(trained[name], tensor), name
    assert any(not torch.equal(trained[n], t) for n, t in weights.items() if n.startswith("text."))
    if stage > 0:  # ZeRO's shards: the optimizer owns the text tower and the temperature only
        owned = reshard.read_full_state(find_checkpoint(out)[1])["params"]
        assert owned and not any(n.startswith("model.image.") for n in owned)
        assert any(n.startswith("model.text.") for n in owned)


@pytest.mark.parametrize("dials, message", [
    (dict(lock="image"), "--lock image keeps the image tower as --init gives it, and no --init"),
    (dict(unlock_last=1), "--unlock-last 1 needs --lock image|text"),
    (dict(init="{timm}", lock="text"), "--init provides only the image tower"),
    (dict(init="{clipzero}", lock="image", unlock_last=3), "--unlock-last 3: the image tower has 2 blocks"),
])
def test_bad_combinations_are_refused_before_any_work(dials, message, source, cache_env, tmp_path, monkeypatch):
    """prepare() is where every refusal happens, before a run directory or a process group exists."""
    from engine.errors import UserError
    from engine.plan.dials import Dials
    from engine.training_run import prepare

    monkeypatch.setenv("CLIPZERO_CACHE", cache_env["CLIPZERO_CACHE"])
    timm_file = tmp_path / "timm.pt"
    torch.save({n[len("image.trunk."):]: t for n, t in source[1].items() if n.startswith("image.trunk.")}, timm_file)
    if "init" in dials:
        dials["init"] = dials["init"].format(timm=timm_file, clipzero=source[0])
    with pytest.raises(UserError) as refused:
        prepare(Dials(model="vit-debug", precision="fp32", global_batch=32, steps=2, **dials), None)
    assert message in str(refused.value)
