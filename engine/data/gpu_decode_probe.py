"""Whether DALI's GPU decoding starts on this machine: one image through the training graph.

A CUDA device is not enough for `device="mixed"` decoding: the DALI wheel is built for one CUDA
major version (nvidia-dali-cuda120), and an older driver, a missing or mismatched nvJPEG, or a
GPU DALI does not support fails only when a pipeline is built or first run. Found in the first
training step, that ends the job; found here, before the plan is made, the plan decodes on the
CPU instead and says why (engine/plan/decode.py).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from engine.data.augment import ViewBatch, ViewDraw
from engine.data.dali import HostBatch

# Large enough for an ordinary JPEG (16x16 MCUs, several of them), small enough to cost nothing.
PROBE_IMAGE_SIDE = 64
# One line of a failure is enough to recognise it, and the plan's reason column stays readable.
MAX_FAILURE_CHARS = 240


def gpu_decode_failure(device_id: int) -> str | None:
    """None when a one-image GPU training graph builds and runs on GPU `device_id`; else the
    failure in one line ("RuntimeError: ...").

    It is the graph the loader builds for GPU decoding (engine/data/train_graph.train_pipeline:
    nvJPEG's mixed decoder, the GPU resize and normalisation), with DALI's default share for the
    hardware JPEG decoder, which is the plan's default too, so the decoder starts as it will in
    training.
    """
    host = HostBatch([_probe_jpeg()], None, (ViewBatch.stack([_whole_image()], "crop"),))
    inputs = host.dali_inputs()
    try:
        # deferred: train_graph imports DALI (about a second), which the planner needs only on a
        # GPU; inside the try, a missing or broken wheel is caught like a driver, CUDA or nvJPEG mismatch.
        from engine.data.train_graph import train_pipeline

        pipe = train_pipeline(lambda: inputs, batch_size=1, image_size=PROBE_IMAGE_SIDE, device="gpu",
                              device_id=device_id, num_threads=1)
        pipe.build()
        pipe.run()
    except Exception as error:  # DALI reports every start-up failure as some exception: all mean "no"
        return _one_line(error)
    return None


def _probe_jpeg() -> np.ndarray:
    """A small JPEG with some detail (a gradient), as the uint8 array the loader feeds DALI."""
    ramp = np.linspace(0, 255, PROBE_IMAGE_SIDE, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (PROBE_IMAGE_SIDE, 1)), np.tile(ramp[:, None], (1, PROBE_IMAGE_SIDE)),
                       np.full((PROBE_IMAGE_SIDE, PROBE_IMAGE_SIDE), 128, dtype=np.uint8)], axis=2)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def _whole_image() -> ViewDraw:
    """A crop window covering the whole image."""
    return ViewDraw(np.zeros(2, dtype=np.float32), np.ones(2, dtype=np.float32))


def _one_line(error: Exception) -> str:
    """The exception's type and the line that says what went wrong. DALI wraps an operator's
    failure in headings ("Critical error in pipeline:") and the Python traceback of the graph's
    definition, then "encountered:" and the failure itself: the first line after it that is not
    a heading."""
    lines = [line.strip() for line in str(error).rsplit("encountered:", 1)[-1].splitlines() if line.strip()]
    detail = next((line for line in lines if not line.endswith(":")), lines[0] if lines else "no message")
    if len(detail) > MAX_FAILURE_CHARS:
        detail = detail[:MAX_FAILURE_CHARS - 3] + "..."
    return f"{type(error).__name__}: {detail}"
