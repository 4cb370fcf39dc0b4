"""What a source lists: Pair (a name with its image and caption, or the problem listing found),
the Blob a pair's image or caption may point at, and Source, the listing itself; plus the column
helpers the table and parquet listers share.

sources.py tells the sources apart and lists most of them, handing parquet files to parquet.py;
both build on these types, which live here so that parquet.py need not import sources.py back.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from engine.errors import UserError

# Column names tried in order when none is given; file_name + text is Hugging Face's imagefolder.
IMAGE_COLUMNS = ("image", "filepath", "path", "jpg", "image_path", "file_name", "filename")
CAPTION_COLUMNS = ("caption", "text", "txt", "title")


@dataclass(frozen=True)
class Blob:
    """Bytes in a file: the whole file, or a member's span inside an uncompressed tar."""
    path: str
    offset: int = 0
    size: int = -1  # -1: the whole file

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if self.size >= 0 and len(data) != self.size:
            raise OSError(f"file ends {self.size - len(data)} bytes early")
        return data


@dataclass(frozen=True)
class Pair:
    """One pair as the source lists it; `problem` is set when listing already found it bad."""
    name: str                               # shown in the examples of skipped pairs
    image: object = None                    # Blob, bytes (parquet), or synthetic.SyntheticImage
    caption: str | Blob | None = None
    label: object = None                    # the label column's raw value, when there is one
    problem: tuple[str, str] | None = None  # (reason, detail)


@dataclass(frozen=True)
class Columns:
    """The column names the user gave (None: the first default name the file has)."""
    image: str | None = None
    caption: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class Source:
    kind: str                               # "folder", "table", "tar", "parquet", "karpathy", "synthetic"
    path: Path | None
    files: tuple[Path, ...]                 # files whose size and time identify the source on a resume
    pairs: Callable[[], Iterator[Pair]]     # a fresh listing at each call
    labels: Callable[[], Iterable] | None = None  # every label value, for the class list; None: no labels


def label_text(value: object) -> str:
    """A label value as the class name it stands for: '3' for 3 and for ' 3 '."""
    return "" if value is None else str(value).strip()


def resolve_column(available: list[str], given: str | None, candidates: tuple[str, ...], flag: str,
                   where: str, accept: Callable[[str], bool] = lambda name: True) -> str:
    """The column `given` by `flag`, else the first of `candidates` (any case) that `accept`s."""
    if given is not None:
        if given not in available:
            raise UserError(f"{where}: no column '{given}' (given by {flag}); found {available}")
        return given
    lowered = {name.lower(): name for name in available}
    for candidate in candidates:
        if candidate in lowered and accept(lowered[candidate]):
            return lowered[candidate]
    raise UserError(f"{where}: none of the columns {available} is one of {list(candidates)}; "
                    f"name the right one with {flag}")


def bad_image_path(name: str, image: object) -> Pair | None:
    """A Pair holding the problem when a row's image path cell is empty or a URL; None when usable."""
    image = str(image).strip() if image is not None else ""
    if not image:
        return Pair(name, problem=("missing image file", "no image path in the row"))
    if "://" in image:
        return Pair(name, problem=("image is a URL", f"{image}; download it first, e.g. with img2dataset"))
    return None
