"""Part of the planner: where DALI decodes the training images, with how many threads, and on a
GPU with a hardware JPEG decoder, the share of images it takes.

GPU decoding is chosen only where a one-image DALI GPU pipeline ran (Hardware.gpu_decode_error,
from engine/data/gpu_decode_probe.py): a first GPU run whose DALI wheel does not match the
driver decodes on the CPU and says why, rather than failing at its first step."""
from engine.errors import UserError
from engine.plan.dials import DECODE_DEVICES, Dials
from engine.plan.hardware import Hardware

# DALI's threads per rank: every CPU of the rank, up to this many. On a CPU run they share the
# cores with the training computation; fewer (1 of 2 CPUs) measured no faster end to end
# (benchmarks/e2e_openclip.py --our-flags '--decode-threads 1').
MAX_DECODE_THREADS = 8

# GPUs with nvJPEG's hardware JPEG decoder (NVJPG engines), by compute capability: the A100 and
# A30 (8.0), the H100 and H200 (9.0), the B200 (10.0). The consumer and inference parts of those
# generations (8.6, 8.9, 12.x) are left out: nvJPEG's documentation names only A100, A30 and
# H100, and a wrong "yes" would only send JPEGs to an engine that is not there (DALI then uses
# its CUDA decoder for all of them, as with 0).
HW_DECODER_CAPABILITIES = frozenset({(8, 0), (9, 0), (10, 0)})
# What to do when DALI's GPU decoder does not start: the usual cause is a DALI wheel built for a
# newer CUDA than the driver's (setup.py installs the CUDA 12 one; a cuda130 wheel exists too).
GPU_DECODE_FIX = ("check that nvidia-dali-cuda120 (or the cuda130 wheel) matches the driver's CUDA, "
                  "which nvidia-smi shows")
# DALI's own default share for the hardware decoder, the rest going to the hybrid CPU+CUDA path.
# DALI moved it to 0.9 and back (NVIDIA/DALI#6366, 2026): 0.9 trained 1.8% faster in their
# ImageNet measurement but more than doubled the slowest batch's decode time. Ours until a
# measurement of our pipeline (benchmarks/data.py on a GPU) says otherwise.
HW_DECODER_LOAD = 0.65


def decode_decisions(dials: Dials, hw: Hardware):
    """(name, value, reason) for decode_device, decode_threads and hw_decoder_load."""
    device, device_reason = _decode_device(dials, hw)
    yield "decode_device", device, device_reason
    yield ("decode_threads", *_decode_threads(dials, hw))
    yield ("hw_decoder_load", *_hw_decoder_load(dials, hw, device))


def _decode_device(dials: Dials, hw: Hardware):
    if dials.decode_device is not None:
        if dials.decode_device not in DECODE_DEVICES:
            raise UserError(f"--decode-device {dials.decode_device!r} is unknown: use gpu or cpu")
        if dials.decode_device == "gpu" and hw.accelerator != "cuda":
            raise UserError("--decode-device gpu needs a CUDA device: use --decode-device cpu")
        if dials.decode_device == "gpu" and hw.gpu_decode_error is not None:
            raise UserError(f"--decode-device gpu: {_gpu_decoder_failed(hw)}; {GPU_DECODE_FIX}, "
                            "or use --decode-device cpu")
        return dials.decode_device, "--decode-device given"
    if hw.accelerator == "cuda":
        if hw.gpu_decode_error is not None:
            return "cpu", (f"{_gpu_decoder_failed(hw)}: decoding on the CPU; {GPU_DECODE_FIX}, "
                           "or pass --decode-device cpu to silence this")
        return "gpu", "DALI mixed decode (a one-image GPU pipeline ran): JPEGs decoded on the GPU, CPUs stay free"
    return "cpu", "DALI CPU pipeline: no GPU"


def _gpu_decoder_failed(hw: Hardware) -> str:
    return f"DALI's GPU decoder failed to start here ({hw.gpu_decode_error})"


def _decode_threads(dials: Dials, hw: Hardware):
    if dials.decode_threads is not None:
        if dials.decode_threads < 1:
            raise UserError(f"--decode-threads {dials.decode_threads}: DALI needs at least 1 thread")
        return dials.decode_threads, "--decode-threads given"
    per_rank = max(1, hw.cpus_per_node // hw.local_world_size)
    return min(MAX_DECODE_THREADS, per_rank), (f"{hw.cpus_per_node} CPUs / {hw.local_world_size} rank(s) per "
                                                f"node, at most {MAX_DECODE_THREADS}")


def has_hw_jpeg_decoder(hw: Hardware) -> bool:
    return hw.accelerator == "cuda" and hw.compute_capability in HW_DECODER_CAPABILITIES


def _hw_decoder_load(dials: Dials, hw: Hardware, device: str):
    """None on a CPU decode (no such decoder); else the share of JPEGs for the hardware decoder."""
    given = dials.hw_decoder_load
    if device != "gpu":
        if given is not None and hw.accelerator == "cuda" and dials.decode_device is None:
            raise UserError(f"--hw-decoder-load {given}: {_gpu_decoder_failed(hw)}, so images are decoded on "
                            f"the CPU; {GPU_DECODE_FIX}, or drop --hw-decoder-load")
        if given is not None:
            raise UserError(f"--hw-decoder-load {given}: images are decoded on the CPU here; it applies to "
                            "--decode-device gpu only")
        return None, "CPU decode"
    if given is not None:
        if not 0 <= given <= 1:
            raise UserError(f"--hw-decoder-load {given}: give the share of JPEGs for the hardware decoder, "
                            "from 0 to 1")
        return given, "--hw-decoder-load given"
    if not has_hw_jpeg_decoder(hw):
        return 0.0, (f"{hw.device_name} has no hardware JPEG decoder (A100, A30, H100 class have one): "
                     "nvJPEG's CUDA decoder takes every image")
    return HW_DECODER_LOAD, ("share of JPEGs for the hardware JPEG decoder, the rest decoded by nvJPEG's "
                             "CPU+CUDA path (DALI's default)")
