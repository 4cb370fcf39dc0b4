"""Listing a source: its pairs in a fixed order, found without reading any image.

A lister yields `Pair`s. A pair the listing already knows to be bad carries its `problem`
and is counted, not read. The same source always lists the same pairs in the same order:
the dataset's sample order, and resuming an interrupted conversion, rely on it.

Sources, told apart by path (`open_source`):
- a folder of images with same-stem `.txt` captions (img2dataset's "files" layout), recursively;
- a `.csv`/`.tsv`/`.jsonl` file with an image path and a caption per row (and a label, optionally);
- img2dataset webdataset shards: one `.tar`, or a folder of `*.tar` (these win over the
  metadata `NNNNN.parquet` img2dataset writes beside each tar);
- parquet: one `.parquet` file or a folder of them (see `parquet.py`);
- a Karpathy-split caption file (`dataset_coco.json`, `dataset_flickr30k.json`).
"""
from __future__ import annotations

import csv
import json
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

from engine.data.convert import parquet
from engine.data.convert.captions import caption_pairs, captioned
from engine.data.convert.pairs import (CAPTION_COLUMNS, IMAGE_COLUMNS, Blob, Columns, Pair, Source, bad_image_path,
                                       label_text, resolve_column)
from engine.errors import UserError

SUPPORTED_SOURCES = (
    "a folder of images with same-stem .txt captions (a.jpg + a.txt, searched recursively); "
    "a .csv, .tsv or .jsonl file with an image path and a caption per row; "
    "img2dataset webdataset shards (one .tar, or a folder of *.tar); "
    "a .parquet file or a folder of them (image bytes or paths, and captions); "
    "a Karpathy-split caption file such as dataset_coco.json; "
    "or --synthetic N instead of a source")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".jp2"})
KARPATHY_SPLITS = ("train", "restval", "val", "test")
# The usual training split of the Karpathy files: restval is the part of COCO's val2014 not in val/test.
KARPATHY_TRAINING = ("train", "restval")


def sorted_classnames(values: Iterable) -> list[str]:
    """The distinct labels in a stable order: numerically when all are integers (2 before 10)."""
    names = {label_text(value) for value in values} - {""}
    if names and all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


def open_source(path: Path, columns: Columns, split: str | None, image_root: Path | None) -> Source:
    """The source at `path`, its type and columns checked before any work is done."""
    if not path.exists():
        raise UserError(f"source {path}: no such file or directory")
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".csv", ".tsv", ".jsonl"):
        source = _table_source(path, columns, image_root)
    elif path.is_file() and suffix == ".tar":
        source = Source("tar", path, (path,), lambda: _tar_pairs([path]))
    elif path.is_file() and suffix == ".parquet":
        source = parquet.parquet_source([path], columns, image_root)
    elif path.is_file() and suffix == ".json":
        source = _karpathy_source(path, split, image_root)
    elif path.is_dir():
        source = _folder_source(path, columns, image_root)
    elif path.name.lower().endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")):
        raise UserError(f"source {path}: a compressed tar; image spans are read straight from a plain tar, so "
                        f"decompress it (e.g. tar's -z/-j/-J/--zstd, or gzip -dc) into a .tar and convert that")
    else:
        raise UserError(f"source {path}: not a supported source; give {SUPPORTED_SOURCES}")
    _check_options_apply(source, columns, split, image_root)
    return source


def _folder_source(root: Path, columns: Columns, image_root: Path | None) -> Source:
    tars = sorted(root.glob("*.tar"))
    if tars:  # img2dataset's webdataset output: NNNNN.tar beside metadata parquet and stats files
        return Source("tar", root, tuple(tars), lambda: _tar_pairs(tars))
    parquets = sorted(root.rglob("*.parquet"))
    # img2dataset's "files" layout also writes a metadata NNNNN.parquet (no image column) beside
    # each folder of images: such parquet files are a source only when no images are there.
    if parquets and parquet.has_image_column(parquets[0], columns.image):
        return parquet.parquet_source(parquets, columns, image_root, root)
    if any(Path(name).suffix.lower() in IMAGE_SUFFIXES for _, _, files in os.walk(root) for name in files):
        return Source("folder", root, (), lambda: _folder_pairs(root))
    if parquets:  # fails with the columns found and the flag to name the right one
        return parquet.parquet_source(parquets, columns, image_root, root)
    raise UserError(f"source {root}: not a supported source; give {SUPPORTED_SOURCES}")


def _check_options_apply(source: Source, columns: Columns, split: str | None, image_root: Path | None) -> None:
    """An option the source type ignores is a mistake worth stopping for (a wrong path, usually)."""
    with_columns = ("table", "parquet")
    given = [(flag, value) for flag, value in (("--image-column", columns.image), ("--caption-column", columns.caption),
                                               ("--label-column", columns.label)) if value is not None]
    for flag, _ in given:
        if source.kind not in with_columns:
            raise UserError(f"{flag} names a column of a CSV/TSV/JSONL or parquet source; "
                            f"{source.path} is read as a {source.kind} source: drop {flag}")
    if split is not None and source.kind != "karpathy":
        raise UserError(f"--split selects images of a Karpathy-split JSON file; {source.path} is read as a "
                        f"{source.kind} source: drop --split")
    if image_root is not None and source.kind not in ("table", "parquet", "karpathy"):
        raise UserError(f"--image-root resolves image paths of a CSV/TSV/JSONL, parquet or Karpathy JSON "
                        f"source; {source.path} is read as a {source.kind} source: drop --image-root")


def _folder_pairs(root: Path) -> Iterator[Pair]:
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()  # os.walk visits subfolders in this list's order: sorted gives a fixed order
        names = set(files)
        for name in sorted(files):
            stem, suffix = os.path.splitext(name)
            path = os.path.join(folder, name)
            shown = os.path.relpath(path, root)
            if suffix.lower() in IMAGE_SUFFIXES:
                sidecar = stem + ".txt"
                if sidecar in names:
                    yield Pair(shown, image=Blob(path), caption=Blob(os.path.join(folder, sidecar)))
                else:
                    yield Pair(shown, problem=("missing caption file", f"no {sidecar}"))


def _table_source(path: Path, columns: Columns, image_root: Path | None) -> Source:
    """CSV/TSV/JSONL rows. The columns are resolved on the first row, so a wrong file fails before any work."""
    records = _jsonl_records if path.suffix.lower() == ".jsonl" else _table_records
    with _listing_errors(path):
        first = next(records(path), None)
    if first is None:
        raise UserError(f"{path}: no rows; expected one image path and caption per row")
    # a CSV row keeps cells beyond the header under the key None: only named columns count
    keys = [key for key in first[1] if isinstance(key, str)] if isinstance(first[1], dict) else []
    where = str(path)
    image_key = resolve_column(keys, columns.image, IMAGE_COLUMNS, "--image-column", where)
    caption_key = resolve_column(keys, columns.caption, CAPTION_COLUMNS, "--caption-column", where)
    label_key = (resolve_column(keys, columns.label, (), "--label-column", where)
                 if columns.label is not None else None)
    base = image_root or path.parent

    def pairs() -> Iterator[Pair]:
        with _listing_errors(path):
            for name, record in records(path):
                if not isinstance(record, dict):
                    yield Pair(name, problem=("malformed JSON line", "not a JSON object"))
                    continue
                image, caption = record.get(image_key), record.get(caption_key)
                bad = bad_image_path(name, image)
                if bad is not None:
                    yield bad
                    continue
                image = str(image).strip()
                yield from caption_pairs(Pair(f"{name} {image}", image=Blob(str(base / image)),
                                              label=record.get(label_key) if label_key is not None else None),
                                         caption)

    def labels() -> Iterator:
        with _listing_errors(path):
            for _, record in records(path):
                if isinstance(record, dict):
                    yield record.get(label_key)

    return Source("table", path, (path,), pairs, labels if label_key is not None else None)


class _listing_errors:
    """A CSV or JSONL file that is not text stops the conversion: no row after the damage can be trusted."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, (UnicodeDecodeError, csv.Error)):
            raise UserError(f"{self.path}: cannot be read as UTF-8 text with one pair per line ({error})") from error
        return False


def _table_records(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often start with a BOM
        rows = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        for row in rows:
            yield f"{path.name}:{rows.line_num}", row


def _jsonl_records(path: Path) -> Iterator[tuple[str, object]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield f"{path.name}:{number}", json.loads(line)
                except ValueError:
                    yield f"{path.name}:{number}", None


def _unsafe_member(name: str) -> str | None:
    """Why a tar member's name could point outside the tar, or None. Nothing is ever extracted,
    but such a member is not data a well-formed shard holds, so it is skipped and reported."""
    if name.startswith(("/", "\\")) or os.path.isabs(name):
        return "absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "'..' in the path"
    return None


def _tar_pairs(tars: list[Path]) -> Iterator[Pair]:
    """Pairs of `KEY.<image>` + `KEY.txt` members, as spans the workers read straight from the tar."""
    for tar_path in tars:
        images: dict[str, tarfile.TarInfo] = {}  # in tar order: a dict keeps insertion order
        captions: dict[str, tarfile.TarInfo] = {}
        unsafe: list[Pair] = []
        try:
            with tarfile.open(tar_path, "r:") as tar:  # "r:": uncompressed, as img2dataset writes
                for member in tar:
                    why = _unsafe_member(member.name)
                    if why is not None:
                        unsafe.append(Pair(f"{tar_path.name}:{member.name}", problem=("unsafe tar member path", why)))
                        continue
                    folder, base = os.path.split(member.name)
                    stem, dot, extension = base.partition(".")  # webdataset keys end at the first dot
                    kind = images if f".{extension.lower()}" in IMAGE_SUFFIXES else (
                        captions if extension.lower() == "txt" else None)
                    if not dot or kind is None or member.isdir():
                        continue
                    shown = f"{tar_path.name}:{member.name}"
                    if not member.isfile():  # a link's data is elsewhere: not a span to read
                        unsafe.append(Pair(shown, problem=("link in the tar, not read", f"-> {member.linkname}")))
                        continue
                    key = os.path.join(folder, stem)
                    if key in kind:  # the first member of a key is its pair, as it comes first in the tar
                        unsafe.append(Pair(shown, problem=("repeated key in the tar, later member not read",
                                                           f"{kind[key].name} is used")))
                        continue
                    kind[key] = member
        except (tarfile.TarError, OSError) as error:
            # Pairs listed before the damage are still used; the reader checks each span's length.
            unsafe.append(Pair(tar_path.name, problem=_tar_problem(tar_path, error)))
        yield from unsafe
        for key, image in images.items():  # keys without an image (a failed download's .json) are no pair
            name = f"{tar_path.name}:{key}"
            if key not in captions:
                yield Pair(name, problem=("missing caption file", f"no {key}.txt in the tar"))
                continue
            yield Pair(name, image=Blob(str(tar_path), image.offset_data, image.size),
                       caption=Blob(str(tar_path), captions[key].offset_data, captions[key].size))


COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _tar_problem(tar_path: Path, error: Exception) -> tuple[str, str]:
    """Why a tar cannot be listed. Pairs are read as byte spans of the tar file itself, which a
    compressed tar does not have: such a tar must be decompressed, and the message says so."""
    try:
        with open(tar_path, "rb") as f:
            head = f.read(6)
    except OSError:
        head = b""
    for magic, name in COMPRESSION_MAGIC.items():
        if head.startswith(magic):
            return (f"compressed tar ({name}): decompress it into a plain .tar and convert that",
                    f"{tar_path.name} is {name}-compressed")
    return "unreadable tar", str(error)


def _karpathy_source(path: Path, split: str | None, image_root: Path | None) -> Source:
    """Karpathy's split files: one entry per image, five or so captions each; one pair per caption."""
    splits = KARPATHY_TRAINING if split is None else tuple(s.strip() for s in split.split(",") if s.strip())
    unknown = [s for s in splits if s not in KARPATHY_SPLITS]
    if unknown or not splits:
        raise UserError(f"--split {split}: give one or more of {', '.join(KARPATHY_SPLITS)}, comma-separated "
                        f"(default: train,restval, the usual training split)")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read it as JSON ({error})") from error
    images = content.get("images") if isinstance(content, dict) else None
    if not (isinstance(images, list) and images and all(
            isinstance(entry, dict) and "filename" in entry and "sentences" in entry for entry in images)):
        raise UserError(f'{path}: not a supported source: a .json file must be a Karpathy-split caption file, '
                        f'{{"images": [{{"filepath": ..., "filename": ..., "split": ..., '
                        f'"sentences": [{{"raw": ...}}]}}]}}; '
                        f"other sources: {SUPPORTED_SOURCES}")
    chosen = [entry for entry in images if entry.get("split") in splits]
    if not chosen:
        found = sorted({str(entry.get("split")) for entry in images})
        raise UserError(f"{path}: no image in split(s) {', '.join(splits)}; the file has {found}: choose with --split")
    root = image_root or path.parent

    def pairs() -> Iterator[Pair]:
        for entry in chosen:
            relative = os.path.join(str(entry.get("filepath") or ""), str(entry["filename"]))
            for number, sentence in enumerate(entry["sentences"] or []):
                caption = sentence.get("raw") if isinstance(sentence, dict) else None
                if caption is None and isinstance(sentence, dict) and sentence.get("tokens"):
                    caption = " ".join(map(str, sentence["tokens"]))
                yield captioned(Pair(f"{relative}#{number}", image=Blob(str(root / relative))), caption)

    return Source("karpathy", path, (path,), pairs)
