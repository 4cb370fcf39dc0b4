"""Evaluation inputs that are not an MDS set: an ImageFolder of classes, a Karpathy-split
caption file, and their decoding with the held-out set's transform.

Images are decoded as engine/data/eval_set.py decodes the held-out set (CLIP's eval transform,
DALI on the CPU): a record the loader's check finds unfit (engine/data/records.py) is left out
and reported, never scored as a miss; one that passes the check but that DALI still rejects is
kept as the flat placeholder, so that the numbers stay aligned with the inputs.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from engine.data.dali import DecodedBatches, HostBatch, eval_pipeline
from engine.data.eval_set import DECODE_BATCH
from engine.data.records import image_problem
from engine.errors import UserError

logger = logging.getLogger(__name__)

# torchvision's ImageFolder extensions; a file of a format DALI cannot read is reported by the check.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Decoded:
    images: torch.Tensor          # [K, 3, S, S], normalised, CPU
    kept: list[int]               # index into the input of each decoded image
    left_out: dict[int, str]      # index -> why the record was left out


def decode_images(files: Sequence[Path], image_size: int, what: str) -> Decoded:
    """Decode `files` in order; `what` names the set in messages."""
    left_out: dict[int, str] = {}

    def host_batches() -> Iterator[HostBatch]:
        ids, encoded = [], []
        for index, path in enumerate(files):
            try:
                data = Path(path).read_bytes()
            except OSError as error:
                left_out[index] = f"unreadable ({error.strerror})"
                data = None
            problem = None if data is None else image_problem(data)[0]
            if problem is not None:
                left_out[index] = problem
            elif data is not None:
                ids.append(index)
                encoded.append(np.frombuffer(data, dtype=np.uint8))
            if len(ids) == DECODE_BATCH or (index == len(files) - 1 and ids):
                yield HostBatch(encoded=encoded, payload=np.array(ids))
                ids, encoded = [], []

    threads = max(1, min(8, len(os.sched_getaffinity(0))))
    decoded = DecodedBatches(host_batches(), device=torch.device("cpu"), build=lambda source: eval_pipeline(
        source, batch_size=DECODE_BATCH, image_size=image_size, num_threads=threads))
    chunks, kept, replaced = [], [], []
    for (images,), host in decoded:
        chunks.append(images)
        kept.extend(host.payload.tolist())
        replaced.extend(host.payload[host.replaced].tolist())
    if left_out:
        logger.warning("%s: %d image(s) left out (%s), e.g. %s", what, len(left_out),
                       ", ".join(sorted(set(left_out.values()))), [str(files[i]) for i in sorted(left_out)[:5]])
    if replaced:
        logger.warning("%s: %d image(s) the decoder rejected scored as a flat placeholder, e.g. %s",
                       what, len(replaced), [str(files[i]) for i in replaced[:5]])
    if not chunks:
        raise UserError(f"{what}: none of its {len(files)} image(s) could be decoded")
    return Decoded(torch.cat(chunks), kept, left_out)


@dataclass(frozen=True)
class ImageFolder:
    files: list[Path]
    labels: list[int]             # index into `folders`
    folders: list[str]            # class folder names, sorted (the class ids' order)


def read_image_folder(root: str | Path) -> ImageFolder:
    """DIR/<class>/**/<image>: classes in sorted folder order, as torchvision's ImageFolder
    numbers them (so a class-name list written for it lines up)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--images {root}: not a directory; give an ImageFolder layout, DIR/<class>/<image>.jpg")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    for label, folder in enumerate(folders):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(path)
                labels.append(label)
    if not files:
        raise UserError(f"--images {root}: no images in class folders ({len(folders)} folder(s)); the layout "
                        f"is DIR/<class>/<image> with extensions {', '.join(IMAGE_EXTENSIONS)}")
    return ImageFolder(files, labels, folders)


@dataclass(frozen=True)
class CaptionedImages:
    files: list[Path]
    captions: list[list[str]]     # every caption of each image


def read_karpathy(path: str | Path, split: str, image_root: str | Path | None) -> CaptionedImages:
    """The images of `split` in a Karpathy-split file (COCO, Flickr30k) with all their captions,
    listed by the converter's own reader (the same checks and messages as launchers/convert.py)."""
    from engine.data.convert.sources import Columns, open_source

    if Path(path).suffix.lower() != ".json":
        raise UserError(f"--pairs {path}: give a Karpathy-split .json file or an MDS directory; convert other "
                        f"pairs to MDS first (`python launchers/convert.py SOURCE OUT`)")
    source = open_source(Path(path), Columns(), split, None if image_root is None else Path(image_root))
    by_image: dict[str, list[str]] = {}
    for pair in source.pairs():  # one pair per caption, an image's captions in a row
        captions = by_image.setdefault(pair.image.path, [])
        if isinstance(pair.caption, str) and pair.caption.strip():
            captions.append(pair.caption)
    kept = [(Path(image), captions) for image, captions in by_image.items() if captions]
    return CaptionedImages([image for image, _ in kept], [captions for _, captions in kept])
