"""The augmentation recipes of augment.py as DALI graph nodes: resize, photometric steps, mirror.

augment.py draws every random value in Python and describes the recipes and the formulas; here
those draws, fed in as per-sample inputs, drive DALI's operators. Only the pipeline builders
(train_graph.py, cpu_pipeline.py) import this module, so DALI is loaded where a pipeline is made.
"""
from __future__ import annotations

from nvidia.dali import fn, types
from nvidia.dali import math as dali_math

from engine.data.augment import INT_FIELDS, LUMA, PHOTOMETRIC_FIELDS


def view_input_types(augment: str) -> list:
    """DALI types of ViewBatch.dali_inputs(), in order."""
    return [types.FLOAT, types.FLOAT,
            *(types.INT32 if name in INT_FIELDS else types.FLOAT for name in PHOTOMETRIC_FIELDS[augment])]


def augment_view(crop, inputs: dict, augment: str, image_size: int):
    """DALI graph of one view after decoding: (HWC pixels, per-sample mirror flag or None).

    `inputs` maps PHOTOMETRIC_FIELDS[augment] to the view's external-source nodes. The "crop"
    recipe is the CLIP graph unchanged: a uint8 resize, no photometric steps.
    """
    if augment == "crop":
        return fn.resize(crop, size=[image_size, image_size], interp_type=types.INTERP_CUBIC, antialias=True), None
    images = fn.resize(crop, size=[image_size, image_size], interp_type=types.INTERP_CUBIC, antialias=True,
                       dtype=types.FLOAT)
    # Cubic filtering overshoots; the uint8 resize saturates the same way.
    return photometric_view(_clamp(images), inputs, augment)


def photometric_view(images, inputs: dict, augment: str):
    """The recipe's steps after the resize, on float HWC pixels in 0..255: (pixels, mirror or None)."""
    if augment == "crop":
        return images, None
    images = _color_jitter(images, inputs)
    if augment == "moco_v2":
        grey = fn.expand_dims(_luma(images), axes=[2])
        images = images * (1.0 - inputs["gray"]) + grey * inputs["gray"]
        images = fn.gaussian_blur(images, sigma=inputs["blur_sigma"], window_size=inputs["blur_window"],
                                  dtype=types.FLOAT)
        return images, inputs["flip"]
    return images, None


def _color_jitter(images, inputs: dict):
    """torchvision's ColorJitter steps on 0..255 floats, in a fixed order (see augment.py's module doc)."""
    images = _clamp(images * inputs["brightness"])
    mean_luma = fn.reductions.mean(_luma(images))
    images = _clamp(images * inputs["contrast"] + mean_luma * (1.0 - inputs["contrast"]))
    grey = fn.expand_dims(_luma(images), axes=[2])
    images = _clamp(images * inputs["saturation"] + grey * (1.0 - inputs["saturation"]))
    return _shift_hue(images, inputs["hue"])


def _shift_hue(images, shift):
    """torchvision's adjust_hue: RGB -> HSV, hue + shift (a fraction of the circle), HSV -> RGB.

    Written out in element-wise operations because DALI's own `hsv` operator approximates the
    hue shift by a rotation about the grey axis, which for saturated colours differs from the
    HSV shift by about as much as the shift itself.
    """
    red, green, blue = images[:, :, 0], images[:, :, 1], images[:, :, 2]
    value = dali_math.max(dali_math.max(red, green), blue)
    chroma = value - dali_math.min(dali_math.min(red, green), blue)
    # Grey pixels (chroma 0) have no hue and come back unchanged whatever it is; the floor only
    # keeps 0/0 out of the sum below.
    safe = dali_math.max(chroma, 1e-6)
    red_max = value == red
    green_max = (value == green) * (value != red)
    blue_max = (value != green) * (value != red)
    hue = (red_max * ((green - blue) / safe) + green_max * (2.0 + (blue - red) / safe)
           + blue_max * (4.0 + (red - green) / safe))  # in sixths of the circle, within (-1, 5]
    hue = (hue + 6.0 * shift + 12.0) % 6.0  # |shift| <= 0.5, so the sum is positive before the modulo

    def channel(n):  # the HSV -> RGB formula V - C * clamp(min(k, 4 - k), 0, 1), k = (n + H) mod 6
        k = (hue + n) % 6.0
        return value - chroma * dali_math.clamp(dali_math.min(k, 4.0 - k), 0.0, 1.0)

    return fn.stack(channel(5.0), channel(3.0), channel(1.0), axis=2)


def _luma(images):
    return images[:, :, 0] * LUMA[0] + images[:, :, 1] * LUMA[1] + images[:, :, 2] * LUMA[2]


def _clamp(images):
    return dali_math.clamp(images, 0.0, 255.0)
