"""The planner's decode decisions (engine/plan/decode.py): DALI's threads per rank and, on a
GPU with a hardware JPEG decoder, that decoder's share of the JPEGs."""
import dataclasses

import pytest

from engine.errors import UserError
from tests.unit.test_plan import A100_40GB_X4, CPU_ONLY, H100_X8, V100_X1, plan_for, reason


@pytest.mark.parametrize("hw, threads", [
    (CPU_ONLY, 2), (dataclasses.replace(CPU_ONLY, cpus_per_node=64), 8),   # the rank's CPUs, at most 8
    (H100_X8, 8), (dataclasses.replace(H100_X8, cpus_per_node=32), 4),
])
def test_decode_threads_are_the_ranks_cpus_at_most_8(hw, threads):
    plan = plan_for(hw)
    assert plan.decode_threads == threads and "rank(s) per node" in reason(plan, "decode_threads")


@pytest.mark.parametrize("hw, load, why", [
    (H100_X8, 0.65, "hardware JPEG decoder"), (A100_40GB_X4, 0.65, "hardware JPEG decoder"),
    (V100_X1, 0.0, "has no hardware JPEG decoder"),
])
def test_hw_decoder_load_follows_the_gpus_jpeg_decoder(hw, load, why):
    plan = plan_for(hw)
    assert plan.decode_device == "gpu" and plan.hw_decoder_load == load and why in reason(plan, "hw_decoder_load")
    assert "hw_decoder_load" in plan.table()


def test_hw_decoder_load_is_absent_on_a_cpu_decode_and_checked_when_given():
    cpu = plan_for(CPU_ONLY)
    assert cpu.hw_decoder_load is None and "hw_decoder_load" not in cpu.table()
    assert plan_for(H100_X8, hw_decoder_load=0.9).hw_decoder_load == 0.9
    assert plan_for(H100_X8, decode_device="cpu").hw_decoder_load is None
    with pytest.raises(UserError, match="from 0 to 1"):
        plan_for(H100_X8, hw_decoder_load=1.5)
    with pytest.raises(UserError, match="applies to --decode-device gpu only"):
        plan_for(CPU_ONLY, hw_decoder_load=0.5)
    with pytest.raises(UserError, match="applies to --decode-device gpu only"):
        plan_for(H100_X8, decode_device="cpu", hw_decoder_load=0.5)


def test_the_gpu_decoders_take_hw_decoder_load():
    # The GPU graph passes it to these two DALI operators: a renamed argument would only fail on a GPU.
    from nvidia.dali import backend
    assert all(backend.GetSchema(op).HasArgument("hw_decoder_load")
               for op in ("decoders__Image", "decoders__ImageSlice"))


def test_decode_threads_given_win_and_below_one_is_refused():
    assert plan_for(CPU_ONLY, decode_threads=3).decode_threads == 3
    with pytest.raises(UserError, match="at least 1 thread"):
        plan_for(CPU_ONLY, decode_threads=0)
