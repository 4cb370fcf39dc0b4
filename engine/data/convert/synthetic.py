"""Synthetic image-text pairs whose captions a model can learn: coloured shapes at named places.

Each image holds one or two shapes (circle, square, triangle, diamond) in one of six colours,
each at its own place (left, right, top, bottom, centre), on a plain or noisy grey background;
the caption names every shape in drawing order: "a red circle on the left and an orange square
at the top on a noisy background". The label (class) is the first shape's "colour shape", so the
set also serves zero-shot classification over 24 classes.

Sample `index` of seed `seed` is drawn from its own generator, seeded by (seed, index): the same
sample comes out whichever worker draws it, and in whatever order.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from engine.data.convert.pairs import Pair, Source

COLOURS = {  # far from the grey backgrounds and from one another
    "red": (215, 35, 35), "green": (35, 170, 55), "blue": (35, 70, 215),
    "yellow": (235, 215, 30), "purple": (140, 45, 185), "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
PLACES = {  # centre as a fraction of the side; far enough apart that two shapes never touch
    "left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "centre": (0.5, 0.5),
}
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
           "bottom": "at the bottom", "centre": "in the centre"}
RADIUS = 0.11  # a shape's half-width as a fraction of the side, before jitter
JITTER = 0.02  # how far a shape's centre may move from its place, as a fraction of the side


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    place: str


@dataclass(frozen=True)
class SyntheticImage:
    """What the listing hands a worker: enough to draw the sample there."""
    seed: int
    index: int
    size: int

    def render(self) -> tuple[bytes, str, str]:
        """(JPEG bytes, caption, label) of this sample."""
        return render(self.seed, self.index, self.size)


def classnames() -> list[str]:
    return sorted(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)


def synthetic_source(count: int, seed: int, size: int) -> Source:
    def pairs():
        for index in range(count):
            yield Pair(f"synthetic:{index}", image=SyntheticImage(seed, index, size))

    return Source("synthetic", None, (), pairs, labels=classnames)


def layout(seed: int, index: int) -> tuple[list[Shape], bool, np.random.Generator]:
    """The shapes of sample `index`, whether its background is noisy, and the generator to draw it with."""
    rng = np.random.default_rng([seed, index])
    count = 1 + int(rng.integers(2))
    places = [list(PLACES)[i] for i in rng.choice(len(PLACES), size=count, replace=False)]
    shapes = [Shape(list(COLOURS)[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))], place)
              for place in places]
    return shapes, bool(rng.random() < 0.5), rng


def caption_of(shapes: list[Shape], noisy: bool) -> str:
    text = " and ".join(f"{_article(s.colour)} {s.colour} {s.shape} {PHRASES[s.place]}" for s in shapes)
    return text + (" on a noisy background" if noisy else "")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def render(seed: int, index: int, size: int) -> tuple[bytes, str, str]:
    shapes, noisy, rng = layout(seed, index)
    grey = float(rng.integers(80, 180))
    pixels = np.full((size, size, 3), grey, dtype=np.float32)
    if noisy:
        pixels += rng.normal(0.0, 20.0, pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for s in shapes:
        fx, fy = PLACES[s.place]
        cx = (fx + rng.uniform(-JITTER, JITTER)) * size
        cy = (fy + rng.uniform(-JITTER, JITTER)) * size
        r = RADIUS * size * rng.uniform(0.85, 1.1)
        tint = np.clip(np.array(COLOURS[s.colour]) + rng.integers(-12, 13, 3), 0, 255)
        _draw(draw, s.shape, cx, cy, r, tuple(int(v) for v in tint))
    out = io.BytesIO()
    # 4:4:4 chroma: with 2x2 subsampling a shape a dozen pixels wide bleeds its colour into the background
    image.save(out, format="JPEG", quality=92, subsampling=0)
    return out.getvalue(), caption_of(shapes, noisy), f"{shapes[0].colour} {shapes[0].shape}"


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        side = r * 0.85  # a square's corners reach further than a circle of the same half-width
        draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
