"""The precision the plan picks on a CPU (native bf16 units and the model's size), what a bf16 run
keeps in fp32 (plan rows and the DeepSpeed config), and the refusals that name their fix."""
import dataclasses

import pytest

from engine.errors import UserError
from engine.plan.deepspeed_config import render
from engine.plan.hardware import native_cpu_bf16
from engine.plan.precision import CPU_BF16_MIN_PARAMS, towers_autocast
from test_plan import CPU_ONLY, H100_X8, V100_X1, plan_for

AMX_CPU = dataclasses.replace(CPU_ONLY, cpu_bf16="AMX")
ZEN4_CPU = dataclasses.replace(CPU_ONLY, cpu_bf16="AVX512-BF16")


def reason(plan, name):
    return next(d.reason for d in plan.decisions if d.name == name)


def test_native_bf16_units_are_read_from_the_cpu_flags():
    assert native_cpu_bf16({"avx512f", "amx_bf16", "avx512_bf16", "amx_tile"}) == "AMX"
    assert native_cpu_bf16({"avx512f", "avx512_bf16"}) == "AVX512-BF16"
    assert native_cpu_bf16({"avx2", "avx512f", "avx512bw"}) is None   # AVX-512 alone emulates bf16


@pytest.mark.parametrize("hw", [AMX_CPU, ZEN4_CPU], ids=["amx", "avx512-bf16"])
def test_a_cpu_with_native_bf16_trains_a_large_model_in_bf16_and_a_small_one_in_fp32(hw):
    large = plan_for(hw, n_params=CPU_BF16_MIN_PARAMS)
    assert large.precision == "bf16" and hw.cpu_bf16 in reason(large, "precision")
    small = plan_for(hw, n_params=CPU_BF16_MIN_PARAMS - 1)
    assert small.precision == "fp32" and "--precision bf16" in reason(small, "precision")


def test_a_cpu_without_native_bf16_trains_in_fp32_and_bf16_given_is_taken_with_a_warning():
    plan = plan_for(CPU_ONLY, n_params=150_000_000)
    assert plan.precision == "fp32" and "emulated" in reason(plan, "precision")
    given = plan_for(CPU_ONLY, precision="bf16")
    assert given.precision == "bf16" and "slower than fp32" in reason(given, "precision")


@pytest.mark.parametrize("hw, dials, fix", [
    (CPU_ONLY, dict(precision="fp16"), "--precision bf16 or fp32"),
    (V100_X1, dict(precision="bf16"), "--precision fp16"),
])
def test_a_precision_the_hardware_cannot_run_is_refused_naming_the_fix(hw, dials, fix):
    with pytest.raises(UserError, match=fix):
        plan_for(hw, **dials)


@pytest.mark.parametrize("ranks, micro, stage, said", [
    (1, None, 1, "one micro-batch on one rank"), (2, None, 2, "gradients reduced over ranks in fp32"),
    (1, 16, 3, "gradients accumulated over micro-batches in fp32"),
    (2, 16, 1, "accumulated over micro-batches and reduced over ranks in fp32")])
def test_bf16_under_zero_accumulates_and_reduces_gradients_in_fp32(ranks, micro, stage, said):
    hw = dataclasses.replace(ZEN4_CPU, world_size=ranks, local_world_size=ranks)
    plan = plan_for(hw, precision="bf16", zero_stage=stage, micro_batch=micro, global_batch=64)
    assert plan.grad_dtype == "fp32" and plan.loss_input_dtype == "bf16"
    assert "LayerNorm" in plan.fp32_parts and "logit scale" in plan.fp32_parts
    config = render(plan)
    assert config["bf16"] == {"enabled": True}
    assert config["data_types"] == {"grad_accum_dtype": "fp32"} and config["communication_data_type"] == "fp32"
    assert said in reason(plan, "grad_dtype")


@pytest.mark.parametrize("ranks, dials", [(1, {}), (2, dict(zero_stage=0))], ids=["planned", "given"])
def test_bf16_without_zero_trains_fp32_weights_with_the_towers_under_autocast(ranks, dials):
    hw = dataclasses.replace(ZEN4_CPU, world_size=ranks, local_world_size=ranks)
    plan = plan_for(hw, precision="bf16", global_batch=64, n_params=150_000_000, **dials)
    assert plan.zero_stage == 0 and towers_autocast(plan.precision, plan.zero_stage)
    assert (plan.grad_dtype, plan.loss_input_dtype) == ("fp32", "fp32")
    assert plan.fp32_parts.startswith("weights") and "autocast" in reason(plan, "grad_dtype")
    # An fp32 engine to DeepSpeed: the model casts inside its towers (engine/models/two_tower.py).
    assert not {"bf16", "fp16", "data_types", "communication_data_type"} & set(render(plan))


def test_fp32_and_fp16_runs_keep_their_deepspeed_precision_sections():
    fp32 = plan_for(CPU_ONLY)
    assert (fp32.precision, fp32.grad_dtype, fp32.fp32_parts, fp32.loss_input_dtype) == ("fp32", "fp32", "all", "fp32")
    assert not {"bf16", "fp16", "data_types", "communication_data_type"} & set(render(fp32))
    fp16 = plan_for(V100_X1)
    assert (fp16.precision, fp16.grad_dtype, fp16.loss_input_dtype) == ("fp16", "fp16", "fp32")
    assert render(fp16)["fp16"]["enabled"] and "data_types" not in render(fp16)


def test_the_gpu_default_is_unchanged():
    assert plan_for(H100_X8).precision == "bf16" and plan_for(V100_X1).precision == "fp16"
