"""The planner's decode decisions (engine/plan/decode.py): where DALI decodes (the GPU only where
a one-image GPU pipeline ran, engine/data/gpu_decode_probe.py), its threads per rank and, on a
GPU with a hardware JPEG decoder, that decoder's share of the JPEGs."""
import dataclasses

import pytest
import torch

from engine.data.gpu_decode_probe import gpu_decode_failure
from engine.dist import local_device
from engine.errors import UserError
from engine.plan import hardware
from tests.unit.test_plan import A100_40GB_X4, CPU_ONLY, H100_X8, V100_X1, plan_for, reason

# What the probe reports on a GPU machine whose DALI wheel is built for a newer CUDA than the driver's.
DRIVER_TOO_OLD = "RuntimeError: CUDA driver version is insufficient for CUDA runtime version"
H100_DALI_FAILS = dataclasses.replace(H100_X8, gpu_decode_error=DRIVER_TOO_OLD)


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


def test_a_gpu_whose_dali_decoder_fails_to_start_decodes_on_the_cpu_and_says_why():
    plan = plan_for(H100_DALI_FAILS)
    why = reason(plan, "decode_device")
    assert plan.accelerator == "cuda" and plan.decode_device == "cpu"
    assert DRIVER_TOO_OLD in why and "nvidia-smi" in why and "--decode-device cpu" in why
    assert plan.hw_decoder_load is None and "hw_decoder_load" not in plan.table()   # follows the CPU decode
    assert plan_for(H100_X8).decode_device == "gpu"   # the probe ran: GPU decoding, as before


def test_gpu_decoding_asked_for_where_dalis_decoder_fails_is_refused_with_the_fix():
    with pytest.raises(UserError, match="--decode-device gpu: DALI's GPU decoder failed") as refused:
        plan_for(H100_DALI_FAILS, decode_device="gpu")
    assert DRIVER_TOO_OLD in str(refused.value) and "nvidia-smi" in str(refused.value)
    assert "use --decode-device cpu" in str(refused.value)
    with pytest.raises(UserError, match="so images are decoded on the CPU.*drop --hw-decoder-load"):
        plan_for(H100_DALI_FAILS, hw_decoder_load=0.9)
    assert plan_for(H100_DALI_FAILS, decode_device="cpu").decode_device == "cpu"   # the documented way out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the failure path needs a machine without CUDA")
def test_the_probe_reports_dalis_failure_as_one_line_instead_of_raising():
    # The real probe with the real DALI: without a CUDA driver the mixed pipeline cannot be built,
    # as it cannot with a driver too old for the DALI wheel.
    failure = gpu_decode_failure(0)   # GPU 0: local rank 0's
    assert failure is not None and failure.startswith("RuntimeError: ") and "CUDA" in failure
    assert "\n" not in failure


def test_the_probe_never_runs_without_a_gpu(monkeypatch):
    def must_not_run(device_id):
        raise AssertionError("the GPU decode probe ran on a machine without a GPU")
    monkeypatch.setattr(hardware, "gpu_decode_failure", must_not_run)
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.probe().gpu_decode_error is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_probe_passes_on_a_working_gpu():
    assert gpu_decode_failure(local_device(0).index) is None
    assert hardware.probe().gpu_decode_error is None
