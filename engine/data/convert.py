"""Turn image-caption pairs into the MDS layout pretraining reads: `jpg` (encoded bytes) + `txt`.

Sources, told apart by path: a folder of images with same-stem `.txt` captions (img2dataset's
"files" layout, searched recursively); a `.csv`/`.tsv`/`.jsonl` file naming image paths and
captions; img2dataset webdataset shards (one `.tar`, or a folder holding `*.tar`).

The main process lists the pairs in a fixed order; a process pool reads and decodes each
image once (so the loader never meets a broken file) and the one writer stores the original
bytes, not a re-encoding, in list order: the same input always gives the same dataset. Bad
pairs are skipped and counted by reason. The dataset is built in a hidden sibling directory
and renamed into place at the end, so a crash never leaves a half-written dataset behind.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tarfile
import time
from collections import Counter, deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from engine.data.dali import DALI_FORMATS
from engine.errors import UserError

SUPPORTED_SOURCES = (
    "a folder of images with same-stem .txt captions (a.jpg + a.txt, searched recursively); "
    "a .csv, .tsv or .jsonl file with an image path and a caption per row; "
    "img2dataset webdataset shards (one .tar, or a folder of *.tar)")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".jp2"})
# Column names tried in order when none is given; file_name + text is Hugging Face's imagefolder.
IMAGE_COLUMNS = ("image", "filepath", "path", "jpg", "image_path", "file_name", "filename")
CAPTION_COLUMNS = ("caption", "text", "txt", "title")
MDS_COLUMNS = {"jpg": "bytes", "txt": "str"}
EXAMPLES_PER_REASON = 3
CHUNK = 32            # pairs per pool task: amortises inter-process overhead on small images
CHUNKS_PER_WORKER = 4  # tasks in flight per worker: keeps workers busy, bounds memory if the disk is slow
PROGRESS_EVERY_S = 30.0


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
    name: str                       # shown in the examples of skipped pairs
    image: Blob | None = None
    caption: str | Blob | None = None
    problem: tuple[str, str] | None = None  # (reason, detail)


@dataclass
class Report:
    out: Path
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def skip(self, reason: str, example: str) -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(example)

    def summary(self) -> str:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        lines = [f"wrote {self.written:,} samples to {self.out}: {self.shards} shard(s), "
                 f"{self.bytes / 2**20:,.1f} MiB, {self.seconds:.1f} s ({rate:,.0f} samples/s)"]
        if self.skipped:
            lines.append(f"skipped {sum(self.skipped.values()):,}:")
            for reason, count in self.skipped.most_common():
                lines.append(f"  {count:,} {reason}, e.g. " + "; ".join(self.examples[reason]))
        return "\n".join(lines)


def convert(source: str | Path, out: str | Path, *, workers: int | None = None, shard_size_mb: int = 64,
            overwrite: bool = False, image_column: str | None = None, caption_column: str | None = None,
            classes: str | Path | None = None, log: Callable[[str], None] = print) -> Report:
    """Convert `source` into an MDS dataset at `out`; see the module docstring for the sources."""
    source, out = Path(source), Path(out)
    if not 1 <= shard_size_mb < 4096:  # MDS stores offsets in a shard as uint32
        raise UserError(f"--shard-size-mb {shard_size_mb}: give 1 to 4095 (64 is the usual size)")
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    if workers < 1:
        raise UserError(f"--workers {workers}: give at least 1")
    _check_output(out, source, overwrite)
    class_file = _read_classes(Path(classes)) if classes is not None else None
    # Listing starts here so column and source errors surface before any work is done.
    with _listing_errors(source):
        pairs = _list_pairs(source, image_column, caption_column)
    from streaming import MDSWriter  # imported after the checks: it takes seconds to import

    report = Report(out=out)
    started = last_progress = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.converting-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        # The pool forks before the writer starts its upload threads: a lock one of them held
        # at the fork would stay locked forever in the children.
        with (Pool(workers) if workers > 1 else nullcontext()) as pool, \
                MDSWriter(out=str(partial), columns=MDS_COLUMNS, size_limit=shard_size_mb * 2**20) as writer:
            with _listing_errors(source):
                for pair, (sample, problem) in _checked(pairs, pool, workers):
                    if problem is not None:
                        report.skip(problem[0], f"{pair.name} ({problem[1]})" if problem[1] else pair.name)
                        continue
                    writer.write(sample)
                    report.written += 1
                    if time.monotonic() - last_progress > PROGRESS_EVERY_S:
                        last_progress = time.monotonic()
                        log(f"  {report.written:,} written, {sum(report.skipped.values()):,} skipped")
        if report.written == 0:
            reasons = ", ".join(f"{n} {reason}" for reason, n in report.skipped.most_common()) or "none listed"
            raise UserError(f"{source}: no usable image-caption pair ({reasons}); expected {SUPPORTED_SOURCES}")
        if class_file is not None:
            (partial / "classes.json").write_text(json.dumps(class_file, indent=1))
        report.shards = len(json.loads((partial / "index.json").read_text())["shards"])
        report.bytes = sum(f.stat().st_size for f in partial.iterdir())
        _publish(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    report.seconds = time.monotonic() - started
    return report


def _check_output(out: Path, source: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file: give a directory path for the dataset")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output {out} already exists and is not empty: choose a new directory, "
                        f"or pass --overwrite to replace it")
    if overwrite and out.exists() and (out.resolve() == source.resolve() or out.resolve() in source.resolve().parents):
        raise UserError(f"output {out} holds the source {source}: --overwrite would delete it; choose another output")


@contextmanager
def _listing_errors(source: Path) -> Iterator[None]:
    """A CSV or JSONL file that is not text stops the conversion: no row after the damage can be trusted."""
    try:
        yield
    except (UnicodeDecodeError, csv.Error) as error:  # workers catch their own: these come from the listing
        raise UserError(f"{source}: cannot be read as UTF-8 text with one pair per line ({error})") from error


def _read_classes(path: Path) -> dict:
    """A zero-shot class file, checked now so a typo does not surface after hours of converting."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"--classes {path}: cannot read it as JSON ({error})") from error
    if not (isinstance(content, dict) and all(
            isinstance(content.get(key), list) and content[key] and all(isinstance(s, str) for s in content[key])
            for key in ("classnames", "templates"))):
        raise UserError(f'--classes {path}: expected {{"classnames": ["dog", ...], '
                        f'"templates": ["a photo of a {{}}.", ...]}} with non-empty lists of strings')
    return content


def _publish(partial: Path, out: Path) -> None:
    """Swap the finished dataset into place; a replaced one is moved aside first, then deleted."""
    if not out.exists():
        os.rename(partial, out)
        return
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    os.rename(out, old)
    os.rename(partial, out)
    shutil.rmtree(old)


def _checked(pairs: Iterator[Pair], pool, workers: int) -> Iterator[tuple[Pair, tuple]]:
    """(pair, (sample, problem)) in listing order, read and decoded in `pool` (or here, without one)."""
    if pool is None:
        for pair in pairs:
            yield pair, _check(pair)
        return
    # apply_async with a bounded window rather than imap: imap drains the whole listing at once
    # and queues every result, however far the writer has fallen behind.
    in_flight: deque = deque()
    for chunk in iter(lambda: list(islice(pairs, CHUNK)), []):
        in_flight.append((chunk, pool.apply_async(_check_chunk, (chunk,))))
        if len(in_flight) >= workers * CHUNKS_PER_WORKER:
            done, result = in_flight.popleft()
            yield from zip(done, result.get())
    while in_flight:
        done, result = in_flight.popleft()
        yield from zip(done, result.get())


def _check_chunk(chunk: list[Pair]) -> list[tuple]:
    return [_check(pair) for pair in chunk]


def _check(pair: Pair) -> tuple[dict | None, tuple[str, str] | None]:
    """Read and fully decode one pair: ({"jpg", "txt"}, None), or (None, (reason, detail))."""
    if pair.problem is not None:
        return None, pair.problem
    try:
        caption = pair.caption.read().decode("utf-8") if isinstance(pair.caption, Blob) else pair.caption
    except OSError as error:
        return None, ("unreadable caption file", str(error))
    except UnicodeDecodeError:
        return None, ("caption not UTF-8", "")
    caption = (caption or "").strip()
    if not caption:
        return None, ("empty caption", "")
    try:
        encoded = pair.image.read()
    except FileNotFoundError:
        return None, ("missing image file", pair.image.path)
    except OSError as error:
        return None, ("unreadable image file", str(error))
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            if image.format not in DALI_FORMATS:
                return None, ("unsupported image format", str(image.format))
            image.load()  # the header alone passes truncated files; only decoding the pixels catches them
    except Exception as error:  # PIL raises many types for corrupt data; all mean "cannot decode"
        return None, ("undecodable image", f"{type(error).__name__}: {error}")
    return {"jpg": encoded, "txt": caption}, None


def _list_pairs(source: Path, image_column: str | None, caption_column: str | None) -> Iterator[Pair]:
    """The source's pairs in a fixed order, checking its type and columns before returning."""
    if not source.exists():
        raise UserError(f"source {source}: no such file or directory")
    suffix = source.suffix.lower()
    if source.is_file() and suffix in (".csv", ".tsv", ".jsonl"):
        return _record_pairs(source, image_column, caption_column)
    if source.is_file() and suffix == ".tar":
        return _tar_pairs([source])
    if source.is_dir():
        tars = sorted(source.glob("*.tar"))
        if tars:  # img2dataset's webdataset output: NNNNN.tar beside parquet and stats files
            return _tar_pairs(tars)
        if any(p.suffix.lower() in IMAGE_SUFFIXES for _, _, files in os.walk(source) for p in map(Path, files)):
            return _folder_pairs(source)
    raise UserError(f"source {source}: not a supported source; give {SUPPORTED_SOURCES}")


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


def _resolve_columns(available: list[str], image_column: str | None, caption_column: str | None,
                     where: str) -> tuple[str, str]:
    def pick(given: str | None, candidates: tuple[str, ...], flag: str) -> str:
        if given is not None:
            if given not in available:
                raise UserError(f"{where}: no column '{given}' (given by {flag}); found {available}")
            return given
        lowered = {name.lower(): name for name in available}
        for candidate in candidates:
            if candidate in lowered:
                return lowered[candidate]
        raise UserError(f"{where}: none of the columns {available} is one of {list(candidates)}; "
                        f"name the right one with {flag}")
    return (pick(image_column, IMAGE_COLUMNS, "--image-column"),
            pick(caption_column, CAPTION_COLUMNS, "--caption-column"))


def _record_pairs(path: Path, image_column: str | None, caption_column: str | None) -> Iterator[Pair]:
    """CSV/TSV/JSONL rows. The columns are resolved on the first row, so a wrong file fails before any work."""
    records = _jsonl_records if path.suffix.lower() == ".jsonl" else _table_records
    first = next(records(path), None)
    if first is None:
        raise UserError(f"{path}: no rows; expected one image path and caption per row")
    # a CSV row keeps cells beyond the header under the key None: only named columns count
    keys = [key for key in first[1] if isinstance(key, str)] if isinstance(first[1], dict) else []
    image_key, caption_key = _resolve_columns(keys, image_column, caption_column, str(path))

    def pairs() -> Iterator[Pair]:
        for name, record in records(path):
            if not isinstance(record, dict):
                yield Pair(name, problem=("malformed JSON line", "not a JSON object"))
                continue
            image, caption = record.get(image_key), record.get(caption_key)
            image = str(image).strip() if image is not None else ""
            if not image:
                yield Pair(name, problem=("missing image file", "no image path in the row"))
            elif "://" in image:
                yield Pair(name, problem=("image is a URL", f"{image}; download it first, e.g. with img2dataset"))
            else:
                yield Pair(f"{name} {image}", image=Blob(str(path.parent / image)),
                           caption=None if caption is None else str(caption))
    return pairs()


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


def _tar_pairs(tars: list[Path]) -> Iterator[Pair]:
    """Pairs of `KEY.<image>` + `KEY.txt` members, as spans the workers read straight from the tar."""
    for tar_path in tars:
        images: dict[str, tarfile.TarInfo] = {}  # in tar order: a dict keeps insertion order
        captions: dict[str, tarfile.TarInfo] = {}
        try:
            with tarfile.open(tar_path, "r:") as tar:  # "r:": uncompressed, as img2dataset writes
                for member in tar:
                    folder, base = os.path.split(member.name)
                    stem, dot, extension = base.partition(".")  # webdataset keys end at the first dot
                    if not member.isfile() or not dot:
                        continue
                    key = os.path.join(folder, stem)
                    if f".{extension.lower()}" in IMAGE_SUFFIXES:
                        images[key] = member
                    elif extension.lower() == "txt":
                        captions[key] = member
        except (tarfile.TarError, OSError) as error:
            # Pairs listed before the damage are still used; the reader checks each span's length.
            yield Pair(tar_path.name, problem=("unreadable tar", str(error)))
        for key, image in images.items():  # keys without an image (a failed download's .json) are no pair
            name = f"{tar_path.name}:{key}"
            if key not in captions:
                yield Pair(name, problem=("missing caption file", f"no {key}.txt in the tar"))
                continue
            yield Pair(name, image=Blob(str(tar_path), image.offset_data, image.size),
                       caption=Blob(str(tar_path), captions[key].offset_data, captions[key].size))
