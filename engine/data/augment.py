"""Image augmentations of the training views: every random draw in Python, applied by DALI.

Recipes (DataSpec.augment), in the order their steps apply:
  crop         RandomResizedCrop (CLIP)
  crop_jitter  RandomResizedCrop, ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8 (CLIP-Lite)
  moco_v2      RandomResizedCrop, ColorJitter as above with p = 0.8, grayscale p = 0.2,
               Gaussian blur with sigma uniform in [0.1, 2] p = 0.5, horizontal flip p = 0.5
               (MoCo v2, DeCLIP's image views)

Exact resume needs every draw to be a function of (seed, epoch, sample id, view) alone, so
the draws happen here, in the DataLoader workers, and reach DALI as per-sample inputs; DALI's
own random operators (whose draws depend on how many batches a pipeline has run) are never
used. A draw that does not apply becomes the identity value (jitter factors 1 and hue 0,
grayscale weight 0, a one-pixel blur window, no mirror), so one graph serves every sample.
The graph's side, DALI's operators fed with these draws, is augment_graph.py: this module
needs no DALI, so the data workers and the planner import it without loading DALI.

The photometric steps run on float pixels in 0..255, after the resize, with torchvision's
tensor formulas: brightness scales, contrast blends with the image's mean luma, saturation
blends with the per-pixel luma, each clamped to 0..255, and hue shifts in HSV. One departure:
the four jitter steps apply in the fixed order brightness, contrast, saturation, hue, where
torchvision draws a random order per image (without the clamping the first three are linear
maps that commute, so the order matters only for clipped pixels and for the hue shift).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CROP_ASPECT = (3 / 4, 4 / 3)
JITTER_P, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0.8, 0.4, 0.4, 0.4, 0.1
GRAY_P = 0.2
BLUR_P, BLUR_SIGMA = 0.5, (0.1, 2.0)
FLIP_P = 0.5
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, torchvision's rgb_to_grayscale and PIL's "L"

# The per-sample DALI inputs of one view, beyond its crop window, for each recipe.
PHOTOMETRIC_FIELDS = {
    "crop": (),
    "crop_jitter": ("brightness", "contrast", "saturation", "hue"),
    "moco_v2": ("brightness", "contrast", "saturation", "hue", "gray", "blur_sigma", "blur_window", "flip"),
}
INT_FIELDS = frozenset({"blur_window", "flip"})


def view_generator(seed: int, epoch: int, sample_id: int, view: int) -> np.random.Generator:
    """The generator of one image view's draws.

    numpy's SeedSequence ignores trailing zero words, so view 0 draws from the generator seeded
    with (seed, epoch, sample id) alone: the crop windows of a one-view "crop" run are those
    the loader drew before views existed, and CLIP's batches did not change.
    """
    return np.random.default_rng((seed, epoch, sample_id, view))


def random_resized_crop(width: int, height: int, scale: tuple[float, float],
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Crop window as relative (x, y) and relative (w, h), drawn the way torchvision does.

    Area fraction uniform in `scale`, aspect ratio log-uniform in CROP_ASPECT (in pixels,
    hence the image size), up to ten tries; otherwise a centre crop at the nearest allowed
    aspect. The window lies on whole pixels, so DALI's rounding of relative coordinates back
    to pixels is exact and never steps past the image edge (which would fail the pipeline).
    """
    area = width * height
    log_ratio = (math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * ratio))
        crop_h = round(math.sqrt(target_area / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            x = int(rng.integers(0, width - crop_w + 1))
            y = int(rng.integers(0, height - crop_h + 1))
            return _relative(x, y, crop_w, crop_h, width, height)
    image_ratio = width / height
    if image_ratio < CROP_ASPECT[0]:
        crop_w, crop_h = width, min(height, round(width / CROP_ASPECT[0]))
    elif image_ratio > CROP_ASPECT[1]:
        crop_w, crop_h = min(width, round(height * CROP_ASPECT[1])), height
    else:
        crop_w, crop_h = width, height
    return _relative((width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h, width, height)


def _relative(x: int, y: int, crop_w: int, crop_h: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    anchor = np.array([x / width, y / height], dtype=np.float32)
    shape = np.array([crop_w / width, crop_h / height], dtype=np.float32)
    return anchor, shape


@dataclass(frozen=True)
class ViewDraw:
    """Everything random about one view of one sample; the defaults are the identity."""

    anchor: np.ndarray                 # relative (x, y) of the crop window
    shape: np.ndarray                  # relative (w, h)
    jitter: tuple[float, float, float, float] | None = None  # brightness, contrast, saturation, hue
    gray: bool = False
    blur_sigma: float | None = None    # in output pixels
    flip: bool = False

    def inputs(self) -> dict[str, float]:
        """The view's per-sample photometric inputs, identity values where a step is off."""
        brightness, contrast, saturation, hue = self.jitter or (1.0, 1.0, 1.0, 0.0)
        sigma = self.blur_sigma or 1.0
        return {"brightness": brightness, "contrast": contrast, "saturation": saturation,
                "hue": hue,  # a fraction of the hue circle, as torchvision's hue factor
                "gray": float(self.gray), "blur_sigma": sigma,
                # DALI's default window for a sigma; a one-pixel window (any sigma) leaves the image as it is.
                "blur_window": 2 * math.ceil(3 * sigma) + 1 if self.blur_sigma else 1,
                "flip": int(self.flip)}


def draw_view(width: int, height: int, augment: str, scale: tuple[float, float],
              seed: int, epoch: int, sample_id: int, view: int) -> ViewDraw:
    """Draw one view's crop and, per the recipe, its photometric steps.

    The draws of a step are made whether or not it applies, so whether one step applies never
    shifts the draws of the next.
    """
    anchor, shape = random_resized_crop(width, height, scale, view_generator(seed, epoch, sample_id, view))
    if augment == "crop":
        return ViewDraw(anchor, shape)
    # A stream of its own, so the photometric draws do not depend on how many tries the crop
    # took (that depends on the image size, which a placeholder changes).
    rng = np.random.default_rng((seed, epoch, sample_id, view, 1))
    jittered = rng.random() < JITTER_P
    factors = (*(float(rng.uniform(1 - s, 1 + s)) for s in (BRIGHTNESS, CONTRAST, SATURATION)),
               float(rng.uniform(-HUE, HUE)))
    jitter = factors if jittered else None
    if augment == "crop_jitter":
        return ViewDraw(anchor, shape, jitter=jitter)
    gray = bool(rng.random() < GRAY_P)
    blurred, sigma = rng.random() < BLUR_P, float(rng.uniform(*BLUR_SIGMA))
    flip = bool(rng.random() < FLIP_P)
    return ViewDraw(anchor, shape, jitter=jitter, gray=gray, blur_sigma=sigma if blurred else None, flip=flip)


@dataclass
class ViewBatch:
    """One view's draws for a batch, as the per-sample arrays the DALI graph reads."""

    anchor: np.ndarray                 # [B, 2] float32
    shape: np.ndarray                  # [B, 2] float32
    photometric: dict[str, np.ndarray]  # field -> [B], the recipe's PHOTOMETRIC_FIELDS

    @classmethod
    def stack(cls, draws: list[ViewDraw], augment: str) -> "ViewBatch":
        inputs = [draw.inputs() for draw in draws]
        photometric = {name: np.array([row[name] for row in inputs],
                                      dtype=np.int32 if name in INT_FIELDS else np.float32)
                       for name in PHOTOMETRIC_FIELDS[augment]}
        return cls(np.stack([d.anchor for d in draws]), np.stack([d.shape for d in draws]), photometric)

    def dali_inputs(self) -> list[list[np.ndarray]]:
        return [list(self.anchor), list(self.shape), *(list(values) for values in self.photometric.values())]
