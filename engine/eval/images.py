"""Evaluation inputs that are not an MDS set: an ImageFolder of classes, a Karpathy-split
caption file, and their decoding with the held-out set's transform.

Images are decoded by engine/eval/eval_set.decode_for_eval, as the held-out set is: one the
record check finds unfit is left out and reported, never scored as a miss.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from engine.data.convert.pairs import Columns
from engine.data.convert.sources import open_source
from engine.errors import UserError
from engine.eval.eval_set import Decoded, decode_for_eval

# torchvision's ImageFolder extensions; a file of a format DALI cannot read is reported by the check.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_files(files: Sequence[Path]) -> Iterator[bytes | str]:
    """Each file's bytes, in order, or why it cannot be read (the decoder leaves it out, counted)."""
    for path in files:
        try:
            yield Path(path).read_bytes()
        except OSError as error:
            yield f"unreadable ({error.strerror})"


def decode_images(files: Sequence[Path], image_size: int, what: str) -> Decoded:
    """Decode `files` in order, as the held-out set is decoded; `what` names the set in messages."""
    return decode_for_eval(read_files(files), image_size, what)


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
