"""The training graph on the CPU, cut around the resize: DALI decodes, torch resizes, DALI augments.

Why the cut: on the CPU, DALI's antialiased cubic resize of a large crop (a ~500 px photo to
224 px) costs several times DALI's own decode of it, where torch's uint8 antialiased bicubic
resize (the same a = -0.5 cubic kernel as DALI's and PIL's, widened for a downscale) costs a
small part of it. benchmarks/data.py measures the whole data path against open_clip's.

    stage 1, DALI (its threads, running ahead): each view's crop window decoded, as
             dali.train_pipeline does; the view's photometric inputs pass through untouched
    stage 2, torch (the caller's thread, when stage 3 asks for a batch): each crop resized to
             image_size x image_size uint8
    stage 3, DALI (its threads, running ahead): the recipe's photometric steps, normalisation

The single graph (dali.train_pipeline) stays the reference, and the GPU's graph: the two agree
to within rounding and the resamplers' edge handling (tests/unit/test_cpu_pipeline.py). One
difference by design: the photometric recipes start from the uint8 resize here (float in the
single graph), at most half a level apart. A stage-1 failure (an image DALI cannot decode)
reaches the caller from `run()`, as from the single graph, so dali.DecodedBatches recovers
the same way.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from engine.data.augment import PHOTOMETRIC_FIELDS, photometric_view, view_input_types
from engine.data.dali import decode_windows, normalise


def resize_crops(crops, image_size: int) -> np.ndarray:
    """[B, image_size, image_size, 3] uint8 from a batch of HWC uint8 crops of any sizes."""
    out = torch.empty(len(crops), image_size, image_size, 3, dtype=torch.uint8)
    with _one_torch_thread():
        for i in range(len(crops)):
            hwc = torch.from_numpy(np.asarray(crops[i]))
            # Viewed as NCHW with channels-last strides: torch's vectorised uint8 path.
            nchw = hwc.permute(2, 0, 1).unsqueeze(0)
            resized = F.interpolate(nchw, size=(image_size, image_size), mode="bicubic", antialias=True)
            out[i] = resized[0].permute(1, 2, 0)
    return out.numpy()


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


class SplitTrainPipeline:
    """dali.train_pipeline's outputs for a CPU decode, built and run like a DALI pipeline."""

    def __init__(self, source: Callable[[], tuple], *, batch_size: int, image_size: int, num_threads: int,
                 augment: str = "crop", views: int = 1, whole_decode: bool = False):
        self._image_size, self._views = image_size, views
        self._decode = _decode_graph(source, batch_size=batch_size, num_threads=num_threads, augment=augment,
                                     views=views, whole_decode=whole_decode)
        self._augment = _augment_graph(self._resized_batch, batch_size=batch_size, num_threads=num_threads,
                                       augment=augment, views=views)

    def build(self) -> None:
        self._decode.build()
        self._augment.build()

    def run(self) -> tuple:
        return self._augment.run()

    def _resized_batch(self) -> tuple:
        outputs = self._decode.run()
        crops, passed = outputs[:self._views], outputs[self._views:]
        return (*(resize_crops(view, self._image_size) for view in crops), *(list(p.as_array()) for p in passed))


def _decode_graph(source, *, batch_size: int, num_threads: int, augment: str, views: int, whole_decode: bool):
    from nvidia.dali import fn, pipeline_def, types

    per_view = view_input_types(augment)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None)
    def graph():
        encoded, *inputs = fn.external_source(source=source, num_outputs=1 + views * len(per_view), batch=True,
                                              dtype=[types.UINT8, *per_view * views])
        view_inputs = [inputs[i * len(per_view):(i + 1) * len(per_view)] for i in range(views)]
        crops = decode_windows(encoded, [view[:2] for view in view_inputs],
                               dict(device="cpu", output_type=types.RGB), whole_decode)
        return (*crops, *(node for view in view_inputs for node in view[2:]))

    return graph()


def _augment_graph(source, *, batch_size: int, num_threads: int, augment: str, views: int):
    from nvidia.dali import fn, pipeline_def, types

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
            outputs.append(normalise(images, fn, types, mirror=mirror))
        return tuple(outputs)

    return graph()
