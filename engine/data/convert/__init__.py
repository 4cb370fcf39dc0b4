"""Turn image-caption pairs into the MDS layout pretraining reads: `jpg` (encoded bytes) + `txt`.

    convert(source, out, ...)           # see launchers/convert.py for the command line
    convert(source, out, part=(i, n))   # part i of n only, on any machine; then merge(out) (split.py)

`sources.py` and `parquet.py` list a source's pairs (`pairs.py`) in a fixed order (folders,
CSV/TSV/JSONL, webdataset tars, parquet, Karpathy JSON); `synthetic.py` draws pairs instead;
`samples.py` reads and fully decodes each pair (shrinking it with --max-side); `writer.py` writes
them in blocks, in parallel and resumably, and publishes the dataset atomically; `split.py` splits
a conversion over machines and merges the parts; `report.py` counts.

With a label column (or --synthetic), an integer `cls` column holds each sample's class id and
`classes.json` ({"classnames": [...], "templates": [...]}) names the classes: the layout the
built-in held-out set has and `engine/eval/eval_set.py` reads for zero-shot evaluation.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

from streaming.base.compression import get_compressions

from engine.data.convert import failures, remote, writer
from engine.data.convert import split as splits  # `split` is convert()'s Karpathy-split option
from engine.data.convert.report import Progress, Report
from engine.data.convert.pairs import Columns
from engine.data.convert.samples import SampleRules
from engine.data.convert.sources import SUPPORTED_SOURCES, open_source, sorted_classnames
from engine.data.convert.synthetic import synthetic_source
from engine.errors import UserError
from engine.store import is_url

__all__ = ["convert", "merge", "Report", "SUPPORTED_SOURCES"]

MDS_COLUMNS = {"jpg": "bytes", "txt": "str"}
LABEL_COLUMN = {"cls": "int"}  # the name engine/eval/eval_set.py and the built-in held-out set use
DEFAULT_TEMPLATES = ["a photo of a {}."]
FORMAT_VERSION = 2  # bump when a change to the converter changes what a job writes: old work is not resumed


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def convert(source: str | Path | None, out: str | Path, *, workers: int | None = None, shard_size_mb: int = 64,
            overwrite: bool = False, image_column: str | None = None, caption_column: str | None = None,
            label_column: str | None = None, classes: str | Path | None = None, split: str | None = None,
            image_root: str | Path | None = None, max_side: int | None = None, compression: str | None = None,
            synthetic: int | None = None, seed: int = 0, synthetic_size: int = 64,
            part: tuple[int, int] | None = None, staging: str | Path | None = None,
            log: Callable[[str], None] = _stderr) -> Report:
    """Convert `source` (or `synthetic` drawn pairs) into an MDS dataset at `out`; see the module docstrings.

    With `part` (i, n), convert only part i of n and publish nothing: `merge(out)` does, once all are done.
    A URL source or OUT (s3://...) goes through remote.py, which stages files in `staging`."""
    if is_url(out) and synthetic is not None:
        raise UserError(f"output {out}: --synthetic writes a local OUT; convert there and upload the folder")
    if not (is_url(out) or is_url(source or "")):
        out = Path(out)
    if not 1 <= shard_size_mb < 4096:  # MDS stores offsets in a shard as uint32
        raise UserError(f"--shard-size {shard_size_mb}: give 1 to 4095 MiB (64 is the usual size)")
    cpus = _usable_cpus()
    workers = workers if workers is not None else min(8, cpus)
    if workers < 1:
        raise UserError(f"--workers {workers}: give at least 1")
    if workers > cpus:
        log(f"warning: --workers {workers} is more than the {cpus} CPU(s) this process may use: the extra workers "
            f"only share those CPUs and add memory; --workers {cpus} converts as fast")
    if max_side is not None and max_side < 1:
        raise UserError(f"--max-side {max_side}: give the longest side in pixels an image may keep, e.g. 512")
    compression = _checked_compression(compression)
    class_file = _read_classes(Path(classes)) if classes is not None else None
    if is_url(out) or is_url(source or ""):
        return _convert_store(source, str(out), workers, overwrite, Columns(image_column, caption_column,
                              label_column), class_file, split, image_root, max_side, compression,
                              shard_size_mb, part, staging, log)

    pairs = _source(source, Columns(image_column, caption_column, label_column), split, image_root,
                    synthetic, seed, synthetic_size)
    _check_output(out, pairs.path, overwrite)

    started = time.monotonic()
    rules, classes_json = _labels(pairs.labels, class_file, max_side)
    options = {"image_column": image_column, "caption_column": caption_column, "label_column": label_column,
               "split": split, "image_root": str(Path(image_root).resolve()) if image_root is not None else None,
               "max_side": max_side, "shard_size_mb": shard_size_mb, "compression": compression,
               "synthetic": synthetic, "seed": seed if synthetic is not None else None,
               "synthetic_size": synthetic_size if synthetic is not None else None,
               "classes": classes_json}
    fingerprint = {"format": FORMAT_VERSION, "entries_per_block": writer.ENTRIES_PER_BLOCK,
                   "source": str(pairs.path.resolve()) if pairs.path is not None else "synthetic",
                   "source_files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in pairs.files],
                   **options}
    job = writer.Job(columns={**MDS_COLUMNS, **(LABEL_COLUMN if rules.label_ids is not None else {})},
                     size_limit=shard_size_mb * 2**20, compression=compression, rules=rules)
    report = Report(out=out, workers=workers, source=fingerprint["source"], max_side=max_side,
                    options={key: value for key, value in options.items() if key != "classes"},
                    classes=len(classes_json["classnames"]) if rules.label_ids is not None else None)

    top = writer.work_dir(out)
    work = splits.folder(top, part) if part is not None else top
    with failures.write_errors(work):  # a full disk, a read-only OUT: a message, the work kept for a rerun
        out.parent.mkdir(parents=True, exist_ok=True)
        with writer.locked(top, shared=part is not None), writer.locked(work) if part else nullcontext():
            _check_split(top, out, part, overwrite)
            done = writer.resume_state(work, fingerprint, overwrite)
            blocks = writer.Blocks(pairs.pairs(), done, writer.ENTRIES_PER_BLOCK, part or (0, 1))
            if done:
                log(f"resuming the interrupted conversion in {work}: {len(done)} block(s) of "
                    f"{writer.ENTRIES_PER_BLOCK} pairs are done")
            try:
                report.workers = writer.write_blocks(work, blocks, job, workers, lambda: Progress(log, total=synthetic))
                if report.workers < workers:
                    log(f"{report.workers} worker(s) ran: only {blocks.count - len(done)} block(s) of "
                        f"{writer.ENTRIES_PER_BLOCK} pairs were left to convert")
                records = writer.collect_records(work)
                report.blocks, report.resumed_blocks = blocks.count, len(done)
                for block_id in sorted(records):
                    report.add_block(records[block_id])
                    report.processed += records[block_id]["entries"] if block_id not in done else 0
                if part is not None:  # a part of only bad pairs is no error: the merge judges the whole
                    report.seconds, report.out = time.monotonic() - started, work
                    report.bytes = sum(path.stat().st_size for path in work.rglob("*.mds"))
                    splits.mark_done(work, blocks.count, report.seconds, report.workers, report.classes)
                    log(f"part {part[0]} of {part[1]} is done; once all {part[1]} are, publish {out} with "
                        f"`launchers/convert.py --merge {out}`")
                    return report
                if report.written == 0:
                    reasons = ", ".join(f"{n} {reason}" for reason, n in report.skipped.most_common()) or "none listed"
                    raise UserError(f"{source}: no usable image-caption pair ({reasons}); expected {SUPPORTED_SOURCES}")
                report.seconds = time.monotonic() - started
                writer.finish(work, out, records, blocks.count, classes_json, report)
            except failures.Interrupted:
                raise  # nothing wrong with the input: the finished blocks are kept for the rerun
            except UserError:
                if not done:  # the input must change before a rerun, so this run's blocks are of no use
                    shutil.rmtree(work, ignore_errors=True)
                raise
    return report


def merge(out: str | Path, *, overwrite: bool = False) -> Report:
    """Publish the parts of a split conversion (`convert(..., part=(i, n))` for every i) as one dataset at `out`."""
    if is_url(out):
        folder = remote.staging_folder(None)
        try:
            return remote.merge_store(str(out), folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    out = Path(out)
    top = writer.work_dir(out)
    if not top.is_dir():
        if out.is_dir() and (out / "index.json").is_file():  # a second merge, e.g. a resubmitted one
            raise UserError(f"nothing to merge into {out}: it holds a published dataset and no parts are left "
                            f"in {top}; to convert again, run the parts with --overwrite")
        raise UserError(f"nothing to merge into {out}: {top} does not exist; convert the parts first "
                        f"(launchers/convert.py SOURCE {out} --part I/N, or launchers/slurm/convert.sbatch)")
    _check_output(out, None, overwrite)
    with failures.write_errors(top), writer.locked(top):  # exclusive: no part is running
        job, records, dones = splits.finished_parts(top, out)
        options = {key: value for key, value in job.items()
                   if key not in ("format", "entries_per_block", "source", "source_files", "classes")}
        report = Report(out=out, workers=sum(done["workers"] for done in dones), source=job["source"],
                        max_side=job["max_side"], options=options, classes=dones[0]["classes"])
        report.blocks = dones[0]["blocks"]
        for block_id in sorted(records):
            report.add_block(records[block_id])
            report.processed += records[block_id]["entries"]
        if report.written == 0:
            reasons = ", ".join(f"{n} {reason}" for reason, n in report.skipped.most_common()) or "none listed"
            raise UserError(f"{job['source']}: no usable image-caption pair in any part ({reasons}); "
                            f"expected {SUPPORTED_SOURCES}")
        report.seconds = max(done["seconds"] for done in dones)  # the parts ran side by side, as a rule
        writer.finish(top, out, records, report.blocks, job["classes"], report)
    return report


def _convert_store(source, out: str, workers: int, overwrite: bool, columns: Columns, class_file,
                   split, image_root, max_side, compression, shard_size_mb: int, part, staging, log) -> Report:
    """A conversion from or to the object store (remote.py), its options checked as a local one's."""
    if source is None:
        raise UserError(f"give a source to convert ({SUPPORTED_SOURCES})")
    source = str(source)
    if split is not None:
        raise UserError("--split selects images of a Karpathy-split JSON file; a conversion from or to the "
                        "object store reads .tar or .parquet files: drop --split")
    if image_root is not None and is_url(source):
        raise UserError(f"--image-root: source {source} is in the object store, whose parquet files must hold the "
                        f"image bytes: drop --image-root")
    if columns.label is not None and class_file is None:
        raise UserError("--label-column to the object store needs --classes FILE: the class ids must be known "
                        "before the files are converted one by one (a local conversion reads every label first)")
    rules, classes_json = _labels((lambda: []) if columns.label is not None else None, class_file, max_side)
    options = {"image_column": columns.image, "caption_column": columns.caption, "label_column": columns.label,
               "max_side": max_side, "shard_size_mb": shard_size_mb, "compression": compression,
               "classes": classes_json}
    job = writer.Job(columns={**MDS_COLUMNS, **(LABEL_COLUMN if rules.label_ids is not None else {})},
                     size_limit=shard_size_mb * 2**20, compression=compression, rules=rules)
    return remote.convert_to_store(source, out, workers=workers, overwrite=overwrite, columns=columns,
                                   image_root=image_root, job=job, options=options, part=part, staging=staging,
                                   log=log)


def _check_split(top: Path, out: Path, part: tuple[int, int] | None, overwrite: bool) -> None:
    """A whole conversion and a split one of the same OUT cannot share the work folder."""
    if part is None and splits.split_folders(top) and not overwrite:
        raise UserError(f"{top} holds parts of a split conversion of {out}: convert the missing ones with --part "
                        f"and publish with `launchers/convert.py --merge {out}`, or pass --overwrite to drop them")
    if part is not None and (top / writer.JOB).is_file():
        if not overwrite:
            raise UserError(f"{top} holds an interrupted conversion of {out} without --part: run it again without "
                            f"--part to finish it, or pass --overwrite to drop it")
        for child in top.iterdir():
            if not splits.FOLDER.fullmatch(child.name):
                shutil.rmtree(child) if child.is_dir() else child.unlink()


def _usable_cpus() -> int:
    """The CPUs this process may run on (a job's allocation or a container's), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _source(source, columns: Columns, split, image_root, synthetic: int | None, seed: int, synthetic_size: int):
    if synthetic is not None:
        if source is not None:
            raise UserError("--synthetic draws its own pairs: give only the output directory, not a source")
        if synthetic < 1 or not 8 <= synthetic_size <= 4096:
            raise UserError(f"--synthetic {synthetic} --synthetic-size {synthetic_size}: give at least 1 pair "
                            f"and a side of 8 to 4096 pixels")
        given = [flag for flag, value in (("--image-column", columns.image), ("--caption-column", columns.caption),
                                          ("--label-column", columns.label), ("--split", split),
                                          ("--image-root", image_root)) if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} read(s) a source; --synthetic draws its pairs: drop {given[0]}")
        return synthetic_source(synthetic, seed, synthetic_size)
    if source is None:
        raise UserError(f"give a source to convert ({SUPPORTED_SOURCES})")
    return open_source(Path(source), columns, split, Path(image_root) if image_root is not None else None)


def _labels(labels, class_file: dict | None, max_side: int | None) -> tuple[SampleRules, dict | None]:
    """Class ids for a labelled source, and the classes.json to write (or copy) with the dataset."""
    if labels is None:
        return SampleRules(max_side=max_side), class_file
    if class_file is not None:  # the user's class order and templates; labels outside it are skipped
        names = list(class_file["classnames"])
        classes_json = class_file
    else:
        names = sorted_classnames(labels())
        if not names:
            raise UserError("--label-column: every label cell is empty; name the column that holds class labels")
        classes_json = {"classnames": names, "templates": list(DEFAULT_TEMPLATES)}
    ids = {name: number for number, name in reversed(list(enumerate(names)))}  # a repeated name keeps its first id
    return SampleRules(max_side, ids, labels_from_classes_file=class_file is not None), classes_json


def _checked_compression(compression: str | None) -> str | None:
    if compression in (None, "", "none"):
        return None
    known = get_compressions()
    if compression not in known:
        families = sorted({name.split(":")[0] for name in known})
        raise UserError(f"--compression {compression}: MDS shards take one of {', '.join(families)}, optionally "
                        f"with a level (e.g. zstd:7, zstd:1 to zstd:22), or none (the default)")
    return compression


def _check_output(out: Path, source: Path | None, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file: give a directory path for the dataset")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output {out} already exists and is not empty: choose a new directory, "
                        f"or pass --overwrite to replace it")
    if source is not None and overwrite and out.exists() and (
            out.resolve() == source.resolve() or out.resolve() in source.resolve().parents):
        raise UserError(f"output {out} holds the source {source}: --overwrite would delete it; choose another output")


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
