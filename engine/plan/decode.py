"""Part of the planner: where DALI decodes the training images, and with how many threads."""
from engine.errors import UserError
from engine.plan.dials import DECODE_DEVICES, Dials
from engine.plan.hardware import Hardware

# DALI's threads per rank: every CPU of the rank, up to this many. On a CPU run they share the
# cores with the training computation; fewer (1 of 2 CPUs) measured no faster end to end
# (benchmarks/e2e_openclip.py --our-flags '--decode-threads 1').
MAX_DECODE_THREADS = 8


def decode_decisions(dials: Dials, hw: Hardware):
    """(name, value, reason) for decode_device and decode_threads."""
    device, device_reason = _decode_device(dials, hw)
    yield "decode_device", device, device_reason
    yield ("decode_threads", *_decode_threads(dials, hw))


def _decode_device(dials: Dials, hw: Hardware):
    if dials.decode_device is not None:
        if dials.decode_device not in DECODE_DEVICES:
            raise UserError(f"--decode-device {dials.decode_device!r} is unknown: use gpu or cpu")
        if dials.decode_device == "gpu" and hw.accelerator != "cuda":
            raise UserError("--decode-device gpu needs a CUDA device: use --decode-device cpu")
        return dials.decode_device, "--decode-device given"
    if hw.accelerator == "cuda":
        return "gpu", "DALI mixed decode: JPEGs decoded on the GPU, CPUs stay free"
    return "cpu", "DALI CPU pipeline: no GPU"


def _decode_threads(dials: Dials, hw: Hardware):
    if dials.decode_threads is not None:
        if dials.decode_threads < 1:
            raise UserError(f"--decode-threads {dials.decode_threads}: DALI needs at least 1 thread")
        return dials.decode_threads, "--decode-threads given"
    per_rank = max(1, hw.cpus_per_node // hw.local_world_size)
    return min(MAX_DECODE_THREADS, per_rank), (f"{hw.cpus_per_node} CPUs / {hw.local_world_size} rank(s) per "
                                                f"node, at most {MAX_DECODE_THREADS}")
