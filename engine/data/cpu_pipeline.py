"""The CPU's DALI graphs, cut around the resize: DALI decodes, torch resizes, DALI finishes.

Why the cut: on the CPU, DALI's antialiased cubic resize of a large image (a ~500 px photo to
224 px) costs several times DALI's own decode of it, where torch's uint8 antialiased bicubic
resize (the a = -0.5 cubic kernel of DALI and PIL, widened for a downscale) costs a small part
of it. benchmarks/data.py measures the training path against open_clip's.

Training (`cpu_train_pipeline`, what the loader runs for a CPU decode):
    stage 1, DALI (its threads, running ahead): each view's crop window decoded, as
             train_graph.train_pipeline does; the view's photometric inputs pass through untouched
    stage 2, torch (the caller's thread, when stage 3 asks for a batch): each crop resized to
             image_size x image_size uint8
    stage 3, DALI (its threads, running ahead): the recipe's photometric steps, normalisation
The single graph (train_graph.train_pipeline) stays the reference, and the GPU's graph: the two
agree to within rounding and the resamplers' edge handling (tests/unit/test_cpu_pipeline.py). One
difference by design: the photometric recipes start from the uint8 resize here (float in the
single graph), at most half a level apart.

Evaluation (`eval_pipeline`): the whole image decoded, its shorter side resized to
image_size * 256 / 224 and the centre square cut as transformers' CLIPImageProcessor does
(the processor an hf export writes), then normalised.

A stage-1 failure (an image DALI cannot decode) reaches the caller from `run()`, as from a
single graph, so dali.DecodedBatches recovers the same way.

DALI is imported here at load: the loader and the evaluation import this module when they build
a pipeline, so that what only reads or plans loads without DALI (train_graph.py says the same).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from nvidia.dali import fn, pipeline_def, types

from engine.data.augment import PHOTOMETRIC_FIELDS
from engine.data.augment_graph import photometric_view, view_input_types
from engine.data.train_graph import decode_windows, normalise


def resize_crops(crops, image_size: int) -> np.ndarray:
    """[B, image_size, image_size, 3] uint8 from a batch of HWC uint8 crops of any sizes."""
    out = torch.empty(len(crops), image_size, image_size, 3, dtype=torch.uint8)
    with _one_torch_thread():
        for i in range(len(crops)):
            out[i] = _resize(torch.from_numpy(np.asarray(crops[i])), (image_size, image_size))
    return out.numpy()


def resize_and_centre_crop(images, image_size: int) -> np.ndarray:
    """[B, image_size, image_size, 3] uint8: each HWC uint8 image's shorter side resized to
    round(image_size * 256 / 224), the longer in proportion (truncated), then the centre square
    (offsets floored): the sizes transformers' CLIPImageProcessor computes."""
    shorter = round(image_size * 256 / 224)
    out = torch.empty(len(images), image_size, image_size, 3, dtype=torch.uint8)
    with _one_torch_thread():
        for i in range(len(images)):
            hwc = torch.from_numpy(np.asarray(images[i]))
            height, width = hwc.shape[:2]
            size = ((shorter, int(shorter * width / height)) if height <= width
                    else (int(shorter * height / width), shorter))
            resized = _resize(hwc, size)
            top, left = (size[0] - image_size) // 2, (size[1] - image_size) // 2
            out[i] = resized[top:top + image_size, left:left + image_size]
    return out.numpy()


def _resize(hwc: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """An HWC uint8 image resized to (height, width), antialiased bicubic; as it is at its size."""
    if tuple(hwc.shape[:2]) == size:
        return hwc
    # Viewed as NCHW with channels-last strides: torch's vectorised uint8 path.
    nchw = hwc.permute(2, 0, 1).unsqueeze(0)
    return F.interpolate(nchw, size=size, mode="bicubic", antialias=True)[0].permute(1, 2, 0)


@contextlib.contextmanager
def _one_torch_thread():
    """Torch's intra-op threads off for the resize (the caller's setting restored after). One
    image is too small to split, and the threads would wait for cores that DALI's threads and
    the DataLoader workers hold: with them, the whole path measured slower than DALI's resize."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


class SplitPipeline:
    """Two DALI graphs with a torch step between them, built and run like one DALI pipeline."""

    def __init__(self, first, between: Callable[[tuple], tuple], last: Callable[[Callable[[], tuple]], Any]):
        """`last` builds the second graph from its source: `between` of the first graph's outputs."""
        self._first = first
        self._last = last(lambda: between(first.run()))

    def build(self) -> None:
        self._first.build()
        self._last.build()

    def run(self) -> tuple:
        return self._last.run()


def cpu_train_pipeline(source: Callable[[], tuple], *, batch_size: int, image_size: int, num_threads: int,
                       augment: str = "crop", views: int = 1) -> SplitPipeline:
    """train_graph.train_pipeline's outputs for a CPU decode."""

    def resized(outputs: tuple) -> tuple:
        crops, passed = outputs[:views], outputs[views:]
        return (*(resize_crops(view, image_size) for view in crops), *(list(p.as_array()) for p in passed))

    decode = _decode_graph(source, batch_size=batch_size, num_threads=num_threads, augment=augment, views=views)
    return SplitPipeline(decode, resized, lambda feed: _augment_graph(
        feed, batch_size=batch_size, num_threads=num_threads, augment=augment, views=views))


def eval_pipeline(source: Callable[[], tuple], *, batch_size: int, image_size: int, num_threads: int) -> SplitPipeline:
    """CLIP's evaluation transform, normalised: shorter side to image_size * 256 / 224, centre crop."""
    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None)
    def decode():
        encoded = fn.external_source(source=source, num_outputs=1, batch=True, dtype=[types.UINT8])[0]
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None)
    def finish(feed):
        images = fn.external_source(source=feed, num_outputs=1, batch=True, dtype=[types.UINT8])[0]
        return normalise(images)

    return SplitPipeline(decode(), lambda outputs: (resize_and_centre_crop(outputs[0], image_size),), finish)


def _decode_graph(source, *, batch_size: int, num_threads: int, augment: str, views: int):
    per_view = view_input_types(augment)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None)
    def graph():
        encoded, *inputs = fn.external_source(source=source, num_outputs=1 + views * len(per_view), batch=True,
                                              dtype=[types.UINT8, *per_view * views])
        view_inputs = [inputs[i * len(per_view):(i + 1) * len(per_view)] for i in range(views)]
        crops = decode_windows(encoded, [view[:2] for view in view_inputs], dict(device="cpu", output_type=types.RGB))
        return (*crops, *(node for view in view_inputs for node in view[2:]))

    return graph()


def _augment_graph(source, *, batch_size: int, num_threads: int, augment: str, views: int):
    names = PHOTOMETRIC_FIELDS[augment]
    per_view = view_input_types(augment)[2:]

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None)
    def graph():
        nodes = fn.external_source(source=source, num_outputs=views + views * len(per_view), batch=True,
                                   dtype=[types.UINT8] * views + per_view * views)
        resized, inputs = nodes[:views], nodes[views:]
        outputs = []
        for i, images in enumerate(resized):
            photometric = dict(zip(names, inputs[i * len(names):(i + 1) * len(names)]))
            if augment != "crop":
                images = fn.cast(images, dtype=types.FLOAT)
            images, mirror = photometric_view(images, photometric, augment)
            outputs.append(normalise(images, mirror=mirror))
        return tuple(outputs)

    return graph()
