"""Parquet sources: image bytes or paths plus a caption per row, read in bounded batches.

The image column may hold encoded bytes (binary, as img2dataset's `--output_format parquet`
writes in `jpg`), a struct with a `bytes` field (Hugging Face's Image feature:
`{"bytes": ..., "path": ...}`, bytes first, the path when bytes are null), or a path string.
Rows are read with `ParquetFile.iter_batches` over only the needed columns, so memory stays
bounded by a batch whatever the file's size. img2dataset's parquet output also has a `status`
column: rows whose download failed are skipped with img2dataset's error message as the detail.
A caption cell holding a list (list<string>) gives a pair per caption (`captions.caption_pairs`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from engine.data.convert.captions import caption_pairs
from engine.data.convert.pairs import (CAPTION_COLUMNS, IMAGE_COLUMNS, Blob, Columns, Pair, Source,
                                       bad_image_path, resolve_column)
from engine.errors import UserError

# Columns holding image bytes come first: img2dataset writes `jpg`, Hugging Face `image`.
PARQUET_IMAGE_COLUMNS = ("jpg", "image", "bytes", "img", "png", "webp", "jpeg") + IMAGE_COLUMNS
BATCH_ROWS = 256  # rows per read: a few MiB of images, so listing memory stays small


def _schema(path: Path):
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path}: cannot be read as parquet ({error})") from error


def _image_kind(arrow_type) -> str | None:
    """How an image column of this Arrow type holds the image: 'bytes', 'struct', 'path', or None."""
    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type) \
            or pa.types.is_fixed_size_binary(arrow_type):
        return "bytes"
    if pa.types.is_struct(arrow_type) and arrow_type.get_field_index("bytes") >= 0:
        return "struct"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "path"
    return None


def has_image_column(path: Path, given: str | None) -> bool:
    """True when the parquet file has a column the converter can take images from."""
    schema = _schema(path)
    if given is not None:
        return given in schema.names
    lowered = {name.lower(): name for name in schema.names}
    return any(c in lowered and _image_kind(schema.field(lowered[c]).type) for c in PARQUET_IMAGE_COLUMNS)


def parquet_source(files: list[Path], columns: Columns, image_root: Path | None, root: Path | None = None) -> Source:
    """Rows of `files` in order; the columns are resolved on the first file and required in every one."""
    first = files[0]
    schema = _schema(first)
    names, where = list(schema.names), str(first)
    image = resolve_column(names, columns.image, PARQUET_IMAGE_COLUMNS, "--image-column", where,
                           accept=lambda name: _image_kind(schema.field(name).type) is not None)
    kind = _image_kind(schema.field(image).type)
    if kind is None:
        raise UserError(f"{where}: column '{image}' holds {schema.field(image).type}; --image-column must name "
                        f"a column of image bytes, of {{bytes, path}} structs, or of image paths")
    caption = resolve_column(names, columns.caption, CAPTION_COLUMNS, "--caption-column", where)
    label = resolve_column(names, columns.label, (), "--label-column", where) if columns.label is not None else None
    # img2dataset's parquet output: rows whose download failed stay in the file with their status
    status = "status" if "status" in names and "error_message" in names else None
    wanted = [name for name in (image, caption, label, status, "error_message" if status else None) if name]

    def pairs() -> Iterator[Pair]:
        for path in files:
            base = image_root or path.parent
            for row_number, row in _rows(path, wanted):
                name = f"{path.name}:{row_number}"
                if status is not None and row[status] != "success":
                    yield Pair(name, problem=("download failed (img2dataset status)",
                                              f"{row[status]}: {row.get('error_message') or 'no message'}"))
                    continue
                pair = _pair(name, row[image], kind, base, row[label] if label else None)
                yield from (caption_pairs(pair, row[caption]) if pair.problem is None else (pair,))

    def labels() -> Iterator:
        for path in files:
            for _, row in _rows(path, [label]):
                yield row[label]

    return Source("parquet", root or files[0], tuple(files), pairs,
                  labels if label is not None else None)


def _rows(path: Path, wanted: list[str]) -> Iterator[tuple[int, dict]]:
    schema = _schema(path)
    missing = [name for name in wanted if name not in schema.names]
    if missing:
        raise UserError(f"{path}: no column(s) {missing}, which the first parquet file has; "
                        f"found {list(schema.names)}: convert the files with different columns separately")
    number = 0
    with pq.ParquetFile(path) as parquet:
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=wanted):
            for row in batch.to_pylist():
                yield number, row
                number += 1


def _pair(name: str, value: object, kind: str, base: Path, label: object) -> Pair:
    """The row's image (or its problem); its caption cell comes next, through `caption_pairs`."""
    if kind == "struct" and isinstance(value, dict):
        # Hugging Face's Image feature keeps bytes, or only a path when the data was not embedded
        value, kind = (value["bytes"], "bytes") if value.get("bytes") is not None else (value.get("path"), "path")
    if kind in ("bytes", "struct"):
        if not value:
            return Pair(name, problem=("no image bytes", "the image cell is empty"))
        return Pair(name, image=bytes(value), label=label)
    bad = bad_image_path(name, value)
    if bad is not None:
        return bad
    path = str(value).strip()
    return Pair(f"{name} {path}", image=Blob(str(base / path)), label=label)
