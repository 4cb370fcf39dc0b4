"""engine/plan/start.py and the model states of a locked run: the plan rows of --init/--lock, and
ZeRO's accounting with optimizer states for the trained parameters only."""
import pytest

from engine.errors import UserError
from engine.objectives.method import lookup
from engine.plan.dials import Dials
from engine.plan.memory import _model_state_bytes
from engine.plan.resolve import resolve
from engine.plan.start import StartFacts
from tests.unit.test_plan import ALL_FUSED, H100_X8, VIT_B32_PARAMS, states_per_device


def plan(start: StartFacts, **dials):
    dials = Dials(model="vit-b-32", global_batch=4096, **dials)
    return resolve(dials, H100_X8, lookup(dials.method, dials.model), n_params=VIT_B32_PARAMS,
                   dataset_size=15_000_000, optimizer_support=ALL_FUSED, image_size=224, start=start)


def test_a_locked_tower_keeps_weights_only_in_the_model_states():
    trainable = VIT_B32_PARAMS // 3
    locked = plan(StartFacts("clipzero weights", ("image", "text"), trainable), init="run", lock="image")
    free = plan(StartFacts("clipzero weights", ("image", "text")), init="run")
    assert (locked.lock, locked.trainable_params, free.trainable_params) == ("image", trainable, VIT_B32_PARAMS)
    for stage in (1, 2, 3):
        full = states_per_device(VIT_B32_PARAMS, "bf16", stage, False, 8)
        weights_only = _model_state_bytes(VIT_B32_PARAMS, "bf16", stage, False, 8, trainable=0)
        with_lock = _model_state_bytes(VIT_B32_PARAMS, "bf16", stage, False, 8, trainable)
        assert weights_only == VIT_B32_PARAMS * 2 / (8 if stage == 3 else 1)
        assert with_lock == pytest.approx(weights_only + (full - weights_only) * trainable / VIT_B32_PARAMS)
    assert "fp32 master copy or optimizer states" in locked.table() and "\nlock " not in free.table()


@pytest.mark.parametrize("start, dials, message", [
    (StartFacts(), dict(lock="image"), "and no --init"),
    (StartFacts("timm weights", ("image",), 1), dict(init="w.pt", lock="text"), "--init provides only the image tower"),
    (StartFacts(), dict(unlock_last=2), "--unlock-last 2 needs --lock"),
])
def test_refusals_name_the_fix(start, dials, message):
    with pytest.raises(UserError, match=message):
        plan(start, **dials)
