"""The training graph: each image view's crop window decoded, resized, augmented and normalised.

On the CPU (`device_id=None`) or decoding with nvJPEG (`device="mixed"`) and augmenting on the
GPU. On the CPU the loader runs it cut around a torch resize (cpu_pipeline.py, which also holds
the evaluation transform); this single graph is the reference for that cut. The crop windows
and the augmentation draws come in as per-sample inputs (augment.py, dali.HostBatch).

DALI is imported here at load. The loader and the GPU decode probe import this module when they
build a pipeline, so what only describes batches (dali.py, augment.py) loads without DALI.
"""
from __future__ import annotations

from typing import Callable

from nvidia.dali import fn, pipeline_def, types

from engine.data.augment import PHOTOMETRIC_FIELDS
from engine.data.augment_graph import augment_view, view_input_types
from engine.data.dali import CLIP_MEAN, CLIP_STD


def train_pipeline(source: Callable[[], tuple], *, batch_size: int, image_size: int, device: str,
                   device_id: int | None, num_threads: int, augment: str = "crop", views: int = 1,
                   hw_decoder_load: float | None = None, whole_decode: bool = False):
    """Each view: its crop window resized to image_size^2, augmented, normalised to CHW float.

    One view decodes its crop window only. Two views decode the whole image once and slice
    both windows from it: decoding is the costly step. `hw_decoder_load`: on the GPU, the share
    of JPEGs for the hardware JPEG decoder (None: DALI's default). `whole_decode`: one view
    too is sliced from the whole image, the form the hardware decoder may need (an old DALI
    note said windowed decoding bypassed it). Training decodes the window; benchmarks/data.py
    measures both on a GPU.
    """
    per_view = view_input_types(augment)

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id)
    def graph():
        encoded, *inputs = fn.external_source(source=source, num_outputs=1 + views * len(per_view), batch=True,
                                              dtype=[types.UINT8, *per_view * views])
        decoder = "mixed" if device == "gpu" else "cpu"
        options = dict(device=decoder, output_type=types.RGB)
        if device == "gpu" and hw_decoder_load is not None:
            options["hw_decoder_load"] = hw_decoder_load
        view_inputs = [inputs[i * len(per_view):(i + 1) * len(per_view)] for i in range(views)]
        crops = decode_windows(encoded, [view[:2] for view in view_inputs], options, whole_decode)
        outputs = []
        for crop, (_, _, *photometric) in zip(crops, view_inputs):
            names = PHOTOMETRIC_FIELDS[augment]
            images, mirror = augment_view(crop, dict(zip(names, photometric)), augment, image_size)
            outputs.append(normalise(images, mirror=mirror))
        return tuple(outputs)

    return graph()


def decode_windows(encoded, windows: list, options: dict, whole_decode: bool = False) -> list:
    """DALI nodes of each view's crop window, given as (relative anchor, relative shape) nodes:
    one view decodes its window only, two decode the whole image once and slice both."""
    window = dict(normalized_anchor=True, normalized_shape=True)
    if len(windows) == 1 and not whole_decode:
        anchor, shape = windows[0]
        return [fn.decoders.image_slice(encoded, anchor, shape, **options, **window)]
    whole = fn.decoders.image(encoded, **options)
    return [fn.slice(whole, anchor, shape, **window) for anchor, shape in windows]


def normalise(images, mirror=None):
    """HWC pixels in 0..255 to CHW floats with CLIP's mean and std (every recipe, and evaluation)."""
    options = {} if mirror is None else {"mirror": mirror}
    return fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW",
        mean=[255 * m for m in CLIP_MEAN], std=[255 * s for s in CLIP_STD], **options)
