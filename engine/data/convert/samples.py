"""One listed pair -> the sample the dataset stores, or the reason it is skipped.

Every image is decoded once here (a JPEG kept as it is at an eighth of its size: see
_checked_image) and passes the training loader's record check, so the loader never meets a record
it would have to replace.
The original bytes are stored, not a re-encoding, unless `--max-side` asks to shrink an image
whose longer side is larger: that one is resized (aspect kept), turned into RGB (transparent
pixels onto white) and stored as a JPEG of quality 95.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from PIL import Image, ImageOps

from engine.data.convert.pairs import Blob, Pair, label_text
from engine.data.convert.synthetic import SyntheticImage
from engine.data.dali import DALI_FORMATS
from engine.data.records import record_problem

REENCODE_QUALITY = 95

Problem = tuple[str, str]  # (reason, detail)


@dataclass(frozen=True)
class SampleRules:
    """What a worker needs besides the pair; picklable, sent to every worker once."""
    max_side: int | None = None
    label_ids: Mapping[str, int] | None = None  # class name -> class id; None: the dataset has no labels
    labels_from_classes_file: bool = False      # an unknown label is then "not in --classes"


def make_sample(pair: Pair, rules: SampleRules) -> tuple[dict | None, Problem | None, bool]:
    """(sample, None, re-encoded?) for a usable pair, else (None, (reason, detail), False)."""
    if pair.problem is not None:
        return None, pair.problem, False
    label = pair.label
    if isinstance(pair.image, SyntheticImage):
        encoded, caption, label = pair.image.render()
    else:
        caption, problem = _caption(pair.caption)
        if problem is not None:
            return None, problem, False
        encoded, problem = _image_bytes(pair.image)
        if problem is not None:
            return None, problem, False
    sample = {"txt": caption}
    if rules.label_ids is not None:
        name = label_text(label)
        if not name:
            return None, ("missing label", "the label cell is empty"), False
        if name not in rules.label_ids:
            return None, ("label not in --classes" if rules.labels_from_classes_file else "unknown label", name), False
        sample["cls"] = rules.label_ids[name]
    stored, problem = _checked_image(encoded, rules.max_side)
    if problem is None:
        # The training loader's own check (engine/data/records.py) as well, so that a converted
        # dataset holds nothing the loader would have to replace.
        reason = record_problem(stored, caption)[0]
        problem = (reason, "") if reason is not None else None
    if problem is not None:
        return None, problem, False
    sample["jpg"] = stored
    return sample, None, stored is not encoded


def _caption(caption: str | Blob | None) -> tuple[str, Problem | None]:
    try:
        text = caption.read().decode("utf-8") if isinstance(caption, Blob) else caption
    except OSError as error:
        return "", ("unreadable caption file", str(error))
    except UnicodeDecodeError:
        return "", ("caption not UTF-8", "")
    text = (text or "").strip()
    return text, None if text else ("empty caption", "")


def _image_bytes(image: Blob | bytes) -> tuple[bytes, Problem | None]:
    if isinstance(image, bytes):
        return image, None
    try:
        return image.read(), None
    except FileNotFoundError:
        return b"", ("missing image file", image.path)
    except OSError as error:
        return b"", ("unreadable image file", str(error))


def _checked_image(encoded: bytes, max_side: int | None, full_decode: bool = False) -> tuple[bytes, Problem | None]:
    """The bytes to store (`encoded` itself unless shrunk), after decoding every pixel's data.

    A JPEG that is stored as it is gets decoded at an eighth of its size (libjpeg's DCT scaling):
    all of its compressed data is still read and entropy-decoded, which is where a truncated or
    corrupt file fails, while the inverse transforms and the colour conversion, the rest of a full
    decode's work, run on a 64th of the pixels. `full_decode=True` is the plain reference the tests hold it
    to; an image to shrink is always decoded fully, as its pixels are needed."""
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            if image.format not in DALI_FORMATS:
                return b"", ("unsupported image format", str(image.format))
            kept = max_side is None or max(image.size) <= max_side
            if kept and not full_decode and image.format == "JPEG":
                image.draft(None, (1, 1))
            image.load()  # the header alone passes truncated files; only decoding the pixels catches them
            if kept:
                return encoded, None
            return _shrunk(image, max_side), None
    except Exception as error:  # PIL raises many types for corrupt data; all mean "cannot decode"
        return b"", ("undecodable image", f"{type(error).__name__}: {error}")


def _shrunk(image: Image.Image, max_side: int) -> bytes:
    # DALI applies the EXIF orientation of the stored bytes; the re-encoding drops EXIF, so the
    # pixels are turned upright first and the image looks the same to the loader as before.
    image = _eight_bit(ImageOps.exif_transpose(image))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    else:
        image = image.convert("RGB")
    scale = max_side / max(image.size)
    size = tuple(max(1, round(side * scale)) for side in image.size)
    out = io.BytesIO()
    image.resize(size, Image.Resampling.LANCZOS).save(out, format="JPEG", quality=REENCODE_QUALITY)
    return out.getvalue()


def _eight_bit(image: Image.Image) -> Image.Image:
    """Grey of more than 8 bits as 8-bit grey, scaled as DALI decodes the original file.

    PIL's convert("RGB") clips such values at 255 instead of scaling them, which turns a 16-bit
    PNG almost white. DALI maps 16-bit values 0..65535 and float values 0..1 onto 0..255; mode I
    (32-bit integers) is read as 16-bit data, the range PIL gives it when it stands for such a file.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        top = 65535.0
    elif image.mode == "F":
        top = 1.0
    else:
        return image
    pixels = np.clip(np.asarray(image, dtype=np.float64), 0.0, top)
    return Image.fromarray(np.rint(pixels * (255.0 / top)).astype(np.uint8), "L")
