"""Rendering plans as DeepSpeed configs, checked by DeepSpeed's own parser; --ds overrides."""
import copy

import pytest
from deepspeed.runtime import config as deepspeed_config

from engine.plan.deepspeed_config import apply_overrides, render
from engine.errors import UserError
from engine.plan.dials import Dials
from tests.unit.test_plan import A100_40GB_X4, CPU_ONLY, H100_X8, V100_X1, plan_for

PLANS = {
    "h100x8-bf16-stage1": lambda: plan_for(H100_X8),
    "h100x8-stage2-clip": lambda: plan_for(H100_X8, zero_stage=2, global_batch=2048),
    "v100-fp16": lambda: plan_for(V100_X1),
    "v100-offload": lambda: plan_for(V100_X1, n_params=1_500_000_000),
    "a100x4-stage3": lambda: plan_for(A100_40GB_X4, n_params=5_000_000_000),
    "cpu-fp32": lambda: plan_for(CPU_ONLY),
    "h100x8-clip-lite-sgd": lambda: plan_for(H100_X8, Dials(method="clip-lite", model="rn50")),
}


@pytest.fixture(params=sorted(PLANS))
def plan(request):
    return PLANS[request.param]()


def parse_as_deepspeed(config, world_size, monkeypatch):
    """DeepSpeed's own DeepSpeedConfig, told the plan's world size (there is no process group
    here), so that it checks the batch arithmetic too."""
    monkeypatch.setattr(deepspeed_config.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(deepspeed_config.dist, "get_world_size", lambda *a, **k: world_size)
    return deepspeed_config.DeepSpeedConfig(copy.deepcopy(config))


def test_render_follows_the_plan(plan):
    config = render(plan)
    assert config["train_batch_size"] == plan.global_batch
    assert config["train_micro_batch_size_per_gpu"] == plan.micro_batch
    assert config["gradient_accumulation_steps"] == plan.grad_accum
    assert config["zero_optimization"]["stage"] == plan.zero_stage
    assert ("offload_optimizer" in config["zero_optimization"]) == plan.offload_optimizer
    assert config["gradient_clipping"] == (plan.grad_clip or 0.0)
    assert ("bf16" in config) == (plan.precision == "bf16")
    assert ("fp16" in config) == (plan.precision == "fp16")
    assert config["steps_per_print"] > plan.total_steps
    assert config["wall_clock_breakdown"] is False
    assert "optimizer" not in config and "scheduler" not in config
    # DeepSpeed's ZeRO refuses SGD + Lookahead (a client optimizer it has not tested) unless told.
    sgd_under_zero = plan.optimizer == "sgd_lookahead" and plan.zero_stage >= 1
    assert config.get("zero_allow_untested_optimizer", False) == sgd_under_zero


def test_render_passes_deepspeeds_own_validation(plan, monkeypatch):
    parsed = parse_as_deepspeed(render(plan), plan.world_size, monkeypatch)
    assert parsed.train_batch_size == plan.global_batch
    assert parsed.train_micro_batch_size_per_gpu == plan.micro_batch
    assert parsed.gradient_accumulation_steps == plan.grad_accum
    assert parsed.zero_optimization_stage == plan.zero_stage
    assert parsed.bfloat16_config.enabled == (plan.precision == "bf16")
    assert parsed.float16_config.enabled == (plan.precision == "fp16")
    offload = parsed.zero_config.offload_optimizer
    assert (offload is not None and offload.device == "cpu") == plan.offload_optimizer
    assert parsed.gradient_clipping == (plan.grad_clip or 0.0)
    assert parsed.optimizer_name is None and parsed.scheduler_name is None


def test_fp16_uses_dynamic_loss_scaling(monkeypatch):
    plan = plan_for(V100_X1)
    fp16 = parse_as_deepspeed(render(plan), plan.world_size, monkeypatch).float16_config
    assert fp16.enabled and fp16.loss_scale == 0
    assert fp16.loss_scale_window > 0 and fp16.hysteresis >= 1 and fp16.min_loss_scale >= 1
    assert 8 <= fp16.initial_scale_power <= 32


def test_a_run_without_clipping_disables_deepspeeds_default_clipping(monkeypatch):
    plan = plan_for(H100_X8)
    assert plan.grad_clip is None
    assert parse_as_deepspeed(render(plan), plan.world_size, monkeypatch).gradient_clipping == 0


@pytest.mark.parametrize("override, value", [
    ("zero_optimization.reduce_bucket_size=50000000", 50_000_000),
    ("gradient_clipping=0.5", 0.5),
    ("zero_optimization.stage3_max_live_parameters=1000", 1000),
    ("checkpoint.tag_validation=Fail", "Fail"),
    ("tensorboard.enabled=true", True),
])
def test_valid_override_passes_through(override, value, monkeypatch):
    plan = plan_for(H100_X8)
    original = render(plan)
    before = copy.deepcopy(original)
    result = apply_overrides(original, [override], world_size=plan.world_size)
    node = result
    for key in override.partition("=")[0].split("."):
        node = node[key]
    assert node == value
    assert original == before                                    # a new dict, input untouched
    assert result["zero_optimization"]["stage"] == plan.zero_stage
    parse_as_deepspeed(result, plan.world_size, monkeypatch)


def test_a_json_object_value_merges_into_the_section():
    plan = plan_for(H100_X8)
    result = apply_overrides(render(plan), ['zero_optimization={"overlap_comm": false}'],
                             world_size=plan.world_size)
    assert result["zero_optimization"] == {**render(plan)["zero_optimization"], "overlap_comm": False}


def test_batch_keys_that_agree_with_the_plan_pass():
    plan = plan_for(H100_X8)
    same = [f"train_batch_size={plan.global_batch}", f"gradient_accumulation_steps={plan.grad_accum}"]
    assert apply_overrides(render(plan), same, world_size=plan.world_size) == render(plan)


@pytest.mark.parametrize("override, fix", [
    ("gradient_cliping=1.0", "gradient_clipping"),
    ("zero_optimization.reduce_bucket_sise=5", "zero_optimization.reduce_bucket_size"),
    ("zero_optimization.offload_optimizer.pin_memroy=true", "pin_memory"),
    ("bf16.check_overflow=false", "bf16.check_grad_overflow"),
    ("tensorboard.enbled=true", "tensorboard.enabled"),
])
def test_unknown_keys_fail_with_close_matches(override, fix):
    plan = plan_for(H100_X8, offload=True)
    with pytest.raises(UserError, match="no key") as error:
        apply_overrides(render(plan), [override], world_size=plan.world_size)
    assert fix in str(error.value)


@pytest.mark.parametrize("override, fix", [
    ("optimizer.type=Adam", "--optimizer"),
    ('optimizer={"type": "AdamW", "params": {"lr": 0.001}}', "--lr"),
    ("scheduler.type=WarmupLR", "--warmup-steps"),
    ("train_batch_size=1000", "--global-batch"),
    ("train_micro_batch_size_per_gpu=7", "--micro-batch"),
    ("gradient_accumulation_steps=0", "--global-batch"),
    ("train_batch_size=abc", "--global-batch"),
    ("zero_optimization.stage=3", "--zero-stage 3"),
    ("zero_optimization.offload_optimizer.device=cpu", "--offload"),
    ("zero_optimization.offload_param.device=cpu", "--zero-stage 3"),
    ("fp16.enabled=true", "--precision"),
    ("bf16.enabled=false", "--precision"),
    ("gradient_clipping=abc", "expected a float"),
    ("wall_clock_breakdown=3", "expected a bool"),
    ("gradient_clipping.max=1", "not a section"),
    ("zero_optimization.stage.value=1", "not a section"),
    ("zero_optimization=3", "zero_optimization.KEY=VALUE"),
    ("zero_optimization.reduce_bucket_size=abc", "reduce_bucket_size"),
    ("zero_optimization.reduce_bucket_size=-5", "reduce_bucket_size"),
    ("amp.enabled=true", "bf16"),
    ("gradient_clipping", "key.path=value"),
    (".stage=1", "key.path=value"),
])
def test_bad_overrides_fail_naming_the_fix(override, fix):
    plan = plan_for(H100_X8)
    with pytest.raises(UserError) as error:
        apply_overrides(render(plan), [override], world_size=plan.world_size)
    assert fix in str(error.value)


def test_consistent_but_different_batch_keys_fail_because_the_loader_follows_the_plan():
    plan = plan_for(H100_X8)
    half = plan.micro_batch // 2
    overrides = [f"train_micro_batch_size_per_gpu={half}",
                 f"gradient_accumulation_steps={plan.grad_accum * 2}"]
    with pytest.raises(UserError, match="--micro-batch"):
        apply_overrides(render(plan), overrides, world_size=plan.world_size)


def test_batch_arithmetic_is_checked_against_the_given_world_size():
    plan = plan_for(H100_X8)
    with pytest.raises(UserError, match="x 4 ranks"):
        apply_overrides(render(plan), [], world_size=plan.world_size // 2)


def test_offload_param_is_accepted_with_stage_3(monkeypatch):
    plan = plan_for(A100_40GB_X4, n_params=5_000_000_000)
    assert plan.zero_stage == 3
    result = apply_overrides(render(plan), ["zero_optimization.offload_param.device=cpu"],
                             world_size=plan.world_size)
    parsed = parse_as_deepspeed(result, plan.world_size, monkeypatch)
    assert parsed.zero_config.offload_param.device == "cpu"
