"""The plan's activation checkpointing (engine/plan/memory.py, micro_batch_setting): on, with its
reason, when the micro-batch the step needs fits in device memory only with it; off when it fits
without, and off when it fits neither way; --activation-checkpointing overrides both ways; the
factor it divides activations by is the one the benchmark measured."""
import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from engine.plan.dials import Dials, add_dial_arguments, dials_from_args
from engine.plan.hardware import Hardware
from engine.plan.memory import CHECKPOINTED_ACTIVATION_FRACTION, GB
from test_plan import CPU_ONLY, H100_X8, V100_X1, plan_for, reason

ROOT = Path(__file__).resolve().parents[2]
VIT_B32_MICRO_80GB = 512   # engine/objectives/recipes.py, the per-rank batch on 8 ranks (4,096 / 8)


def gpus_of(memory_bytes: float, world_size: int = 8) -> Hardware:
    return dataclasses.replace(H100_X8, device_name="a smaller GPU", device_memory_bytes=int(memory_bytes),
                               world_size=world_size, local_world_size=world_size)


# A device where ViT-B/32's 512 per rank fit in bf16 with checkpointing, not without:
# between the fraction of 80 GB and 80 GB.
SQUEEZED = gpus_of(80 * GB * (1 + CHECKPOINTED_ACTIVATION_FRACTION) / 2)


def test_on_with_its_reason_when_only_checkpointing_fits_the_per_rank_batch():
    plan = plan_for(SQUEEZED)
    assert plan.precision == "bf16" and plan.global_batch // plan.world_size == 512
    assert plan.activation_checkpointing is True
    assert (plan.micro_batch, plan.grad_accum, plan.accumulation) == (512, 1, "plain")
    why = reason(plan, "activation_checkpointing")
    assert why.startswith("on: the whole per-rank batch of 512") and "fits only with it" in why
    assert f"with its activations at x{CHECKPOINTED_ACTIVATION_FRACTION:g}, as measured" in why
    assert "with activation checkpointing" in reason(plan, "micro_batch")
    # Without it the same device splits the step into micro-batches (GradCache).
    off = plan_for(SQUEEZED, activation_checkpointing="off")
    assert off.activation_checkpointing is False and "given" in reason(off, "activation_checkpointing")
    assert off.micro_batch < 512 and off.grad_accum > 1 and off.accumulation == "gradcache"


def test_off_when_the_per_rank_batch_fits_without_it():
    plan = plan_for(H100_X8)
    assert plan.activation_checkpointing is False
    assert (plan.micro_batch, plan.grad_accum) == (512, 1)
    assert reason(plan, "activation_checkpointing").startswith("off: the whole per-rank batch of 512") \
        and "fits without it" in reason(plan, "activation_checkpointing")


def test_off_when_the_per_rank_batch_fits_not_even_with_it():
    plan = plan_for(V100_X1)  # 16 GB, 4,096 per rank
    assert plan.activation_checkpointing is False and plan.grad_accum > 1
    assert "does not fit even with it" in reason(plan, "activation_checkpointing")
    assert "with activation checkpointing" not in reason(plan, "micro_batch")


def test_on_when_without_it_a_micro_batch_is_under_the_objectives_least():
    # DeCLIP's heads need 2 per micro-batch; here 1 fits without checkpointing, 2 or more with it.
    tiny = gpus_of(80 * GB * 1.5 / VIT_B32_MICRO_80GB)
    dials = Dials(method="declip", model="vit-b-32", zero_stage=3, offload=True)
    plan = plan_for(tiny, dials)
    assert plan.activation_checkpointing is True and plan.micro_batch >= 2
    assert "under the 2 the objective needs" in reason(plan, "activation_checkpointing")


def test_a_given_micro_batch_over_what_fits_without_it_turns_it_on():
    plan = plan_for(H100_X8, global_batch=8192)  # 1,024 per rank; 512 fit without it
    assert plan.activation_checkpointing is (1024 <= 549 / CHECKPOINTED_ACTIVATION_FRACTION)
    given = plan_for(H100_X8, global_batch=8192, micro_batch=1024)
    assert given.activation_checkpointing is True and given.micro_batch == 1024
    assert reason(given, "activation_checkpointing").startswith("on: --micro-batch 1024 is over")
    assert plan_for(H100_X8, micro_batch=256).activation_checkpointing is False


def test_the_override_wins_both_ways():
    on = plan_for(H100_X8, activation_checkpointing="on")
    assert on.activation_checkpointing is True and "given" in reason(on, "activation_checkpointing")
    assert on.micro_batch == 512
    off = plan_for(SQUEEZED, activation_checkpointing="off")
    assert off.activation_checkpointing is False
    cpu = plan_for(CPU_ONLY)
    assert cpu.activation_checkpointing is False and "CPU" in reason(cpu, "activation_checkpointing")
    assert plan_for(CPU_ONLY, activation_checkpointing="on").activation_checkpointing is True


def test_the_dial_parses_on_and_off_and_refuses_others():
    parser = argparse.ArgumentParser()
    add_dial_arguments(parser, None)
    assert dials_from_args(parser.parse_args([])).activation_checkpointing is None
    for value in ("on", "off"):
        args = parser.parse_args(["--activation-checkpointing", value])
        assert dials_from_args(args).activation_checkpointing == value
    with pytest.raises(SystemExit):
        parser.parse_args(["--activation-checkpointing", "yes"])


def test_the_factor_covers_the_measured_saving():
    results = json.loads((ROOT / "benchmarks/results/activation_checkpointing_cpu.json").read_text())
    measured = [m["step_memory_ratio"] for m in results["models"] if m["status"] == "ok"]
    assert len(measured) == 2
    assert max(measured) <= CHECKPOINTED_ACTIVATION_FRACTION <= max(measured) + 0.05
