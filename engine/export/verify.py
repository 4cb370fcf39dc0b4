"""The check that makes an export good: loaded back through the target library itself, it
embeds a fixed batch of images and captions as the trained model does.

The captions go through the export's own tokenizer (the one a user of that library gets), so a
tokenizer that splits text otherwise fails the check as a wrong weight would. The images are
seeded noise in the normalised space the towers read: every weight of the image tower moves them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from engine.data.text import ClipTokenizer
from engine.models.two_tower import TwoTower

# Max abs difference allowed between normalised embeddings (and relative, for the logit scale):
# float32 with the libraries' own attention kernels stays about two orders below it.
TOLERANCE = 1e-5
IMAGES = 4
SEED = 0

# Ordinary captions, punctuation and case, digits, an empty caption, and one longer than any
# context (cut so that the end token stays last).
CAPTIONS = [
    "a photo of the digit 7.",
    "A handwritten ZERO, slightly rotated!",
    "two cats and a dog's toy on a sofa (blurry)",
    "",
    " ".join(["a long caption about a red bicycle leaning on a wall"] * 12),
]


@dataclass(frozen=True)
class Encoders:
    """What a reloaded export offers, each through its library's own code."""
    library: str                                         # e.g. "transformers 4.57.6"
    encode_image: Callable[[torch.Tensor], torch.Tensor]  # [B, 3, S, S] normalised pixels -> [B, D]
    encode_text: Callable[[list[str]], torch.Tensor]      # captions -> [B, D] (its own tokenizer)
    logit_scale: float                                   # the multiplier its logits use


@dataclass(frozen=True)
class Agreement:
    library: str
    image_max_diff: float        # max abs difference of normalised image embeddings
    text_max_diff: float         # the same for text
    logit_scale_rel_diff: float  # relative difference of the logit scale
    tolerance: float = TOLERANCE

    @property
    def max_diff(self) -> float:
        return max(self.image_max_diff, self.text_max_diff)

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance and self.logit_scale_rel_diff <= self.tolerance

    def describe(self) -> str:
        return (f"{self.library}: max |difference| of normalised embeddings: image {self.image_max_diff:.2e}, "
                f"text {self.text_max_diff:.2e}; logit scale relative {self.logit_scale_rel_diff:.2e} "
                f"(tolerance {self.tolerance:.0e})")

    def as_dict(self) -> dict:
        return {"library": self.library, "image_max_abs_diff": self.image_max_diff,
                "text_max_abs_diff": self.text_max_diff, "logit_scale_rel_diff": self.logit_scale_rel_diff,
                "tolerance": self.tolerance, "images": IMAGES, "captions": CAPTIONS}


def fixed_images(image_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED)
    return torch.randn(IMAGES, 3, image_size, image_size, generator=generator)


def _max_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    theirs = F.normalize(theirs.float(), dim=-1)
    if theirs.shape != ours.shape:
        return float("inf")
    return (ours - theirs).abs().max().item()


@torch.no_grad()
def compare(model: TwoTower, tokenizer: ClipTokenizer, image_size: int, exported: Encoders) -> Agreement:
    """Our embeddings of the fixed batch against the export's, both normalised."""
    model.eval()
    images = fixed_images(image_size)
    ours_image = model.encode_image(images)
    ours_text = model.encode_text(tokenizer(CAPTIONS))
    ours_scale = float(model.scale())
    return Agreement(
        library=exported.library,
        image_max_diff=_max_diff(ours_image, exported.encode_image(images.clone())),
        text_max_diff=_max_diff(ours_text, exported.encode_text(list(CAPTIONS))),
        logit_scale_rel_diff=abs(exported.logit_scale - ours_scale) / ours_scale)
