"""What an objective needs from each training sample, declared once and read by the loader.

An objective states its needs as a `DataSpec`; the loader turns it into batches holding

    "image"       [B, 3, S, S] float   first image view (CLIP-normalised)
    "image2"      [B, 3, S, S] float   second view of the same decoded image   (image_views == 2)
    "text"        [B, L] long          caption tokens, MLM-masked when `mlm`
    "mlm_labels"  [B, L] long          original id at masked positions, -100 elsewhere   (mlm)
    "text_aug"    [B, L] long          tokens of an EDA-edited copy of the caption, unmasked   (text_aug)
    "sample_id"   [B] long             index of each sample in the dataset

Every random draw behind these (crop windows, colour jitter, flips, EDA edits, MLM masks) is a
function of (seed, epoch, sample id) alone, so a resumed run and any worker count see the
same batches.
"""
from __future__ import annotations

from dataclasses import dataclass

# "crop": random resized crop only (CLIP). "moco_v2": crop + colour jitter + grayscale + blur +
# flip (DeCLIP's image views). "crop_jitter": crop + colour jitter (CLIP-Lite). See augment.py.
AUGMENTS = ("crop", "moco_v2", "crop_jitter")


@dataclass(frozen=True)
class DataSpec:
    """What an objective needs from each training sample."""

    image_views: int = 1                 # 2: DeCLIP's two augmented views of one decoded image
    augment: str = "crop"                # one of AUGMENTS
    crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area fraction
    text_aug: bool = False               # an EDA copy of the caption under "text_aug" (not masked)
    mlm: bool = False                    # "text" is MLM-masked; targets under "mlm_labels" (-100 = not chosen)
    strip_punctuation: bool = False      # CLIP-Lite: captions lower-cased, punctuation stripped before tokenising

    def __post_init__(self):
        if self.image_views not in (1, 2):
            raise ValueError(f"image_views must be 1 or 2, got {self.image_views}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
        low, high = (float(value) for value in self.crop_scale)
        # The crop scale comes from a recipe (engine/objectives/recipes.py), never from the command
        # line: a bad one is a mistake in the recipe's code, not in the user's input.
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop scale {tuple(self.crop_scale)} must satisfy 0 < low <= high <= 1.")
        object.__setattr__(self, "crop_scale", (low, high))

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The keys of every batch the loader yields for this spec."""
        return ("image", *(("image2",) if self.image_views == 2 else ()), "text",
                *(("mlm_labels",) if self.mlm else ()), *(("text_aug",) if self.text_aug else ()), "sample_id")
