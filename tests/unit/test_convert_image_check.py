"""The converter's image check: a JPEG decoded at an eighth of its size (the fast path) is refused
exactly when a full decode (the reference) refuses it, on fresh random images and damage."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from engine.data.convert.samples import _checked_image

SEED = int.from_bytes(os.urandom(4), "little")


def random_jpeg(rng: np.random.Generator, index: int) -> bytes:
    """Smooth colour blocks plus noise, as photos compress; modes, subsampling and progressive vary."""
    mode = ("RGB", "L", "CMYK")[index % 3]
    width, height = (int(side) for side in rng.integers(16, 400, size=2))
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    blocks = rng.integers(0, 256, size=(4, 4, channels)).astype(np.float32)
    pixels = np.repeat(np.repeat(blocks, height // 4 + 1, 0), width // 4 + 1, 1)[:height, :width]
    pixels = np.clip(pixels + rng.normal(0, 8, size=pixels.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=int(rng.integers(30, 100)), subsampling=int(rng.integers(0, 3)),
               progressive=mode != "CMYK" and bool(rng.integers(0, 2)))
    return out.getvalue()


def damaged(rng: np.random.Generator, data: bytes, kind: int) -> bytes:
    data = bytearray(data)
    if kind == 0:  # cut short
        return bytes(data[:int(rng.integers(1, len(data)))])
    if kind == 1:  # a few bytes changed anywhere, the headers included
        for _ in range(int(rng.integers(1, 6))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        return bytes(data)
    start = int(rng.integers(0, len(data)))  # a run of zeros, as a torn write leaves
    end = min(len(data), start + int(rng.integers(1, 200)))
    data[start:end] = bytes(end - start)
    return bytes(data)


def test_scaled_decode_refuses_what_a_full_decode_refuses():
    rng = np.random.default_rng(SEED)
    outcomes = {"refused": 0, "kept": 0}
    for index in range(24):
        original = random_jpeg(rng, index)
        for trial in range(30):
            data = original if trial == 0 else damaged(rng, original, trial % 3)
            fast_bytes, fast = _checked_image(data, None)
            reference_bytes, reference = _checked_image(data, None, full_decode=True)
            assert (fast is None) == (reference is None), (
                f"seed {SEED}, image {index}, trial {trial}: scaled decode {fast}, full decode {reference}")
            assert fast_bytes == reference_bytes
            outcomes["kept" if fast is None else "refused"] += 1
    # both kinds occur, or the comparison says nothing
    assert outcomes["refused"] > 50 and outcomes["kept"] > 50, outcomes


@pytest.mark.parametrize("max_side", [None, 64])
def test_an_image_to_shrink_is_still_decoded_whole(max_side):
    rng = np.random.default_rng(SEED)
    data = random_jpeg(rng, 0)
    with Image.open(io.BytesIO(data)) as image:
        size = image.size
    stored, problem = _checked_image(data, max_side)
    assert problem is None
    with Image.open(io.BytesIO(stored)) as image:
        if max_side is None or max(size) <= max_side:
            assert stored == data
        else:  # shrunk from the full-size pixels: the longer side is max_side, not an eighth of it
            assert max(image.size) == max_side
