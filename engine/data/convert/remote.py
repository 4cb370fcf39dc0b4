"""Conversion from and to an object store: SOURCE s3://bucket/prefix holding webdataset `.tar`
or `.parquet` files (img2dataset's layouts), a local folder of them, and OUT s3://bucket/prefix.

Unit of work: one source file. The store's listing (engine/store.py) gives the files in a fixed
order: the `.tar` objects directly under the prefix (as a local folder's `*.tar`), else every
`.parquet` below it, sorted as paths are. File f is converted alone, by the local readers and
writer (`sources.open_source`, `writer.write_block`), into blocks of ENTRIES_PER_BLOCK listed
pairs that restart at each file; so no part needs to know how many pairs the other files hold,
and a part only downloads its own files. The samples, and their order, are those of a local
conversion of the same files; only the shard boundaries differ (a shard also ends with a file).

Split. Part I of N converts the files f with f mod N == I; within a part, worker w of W converts
every W-th of them. A worker downloads its next file into the staging folder while it converts
the current one, and uploads the previous one's shards meanwhile; a converted file's source copy
and shards are deleted at once, so staging holds at most about three files per worker.

In the store. File f's shards go to `OUT/file-FFFFF/block-BBBBBB/shard.NNNNN.mds` (names that no
two files share), then its done marker `OUT/.converting/done/FFFFF.<job>.json`, LAST: a marker
means every shard of the file is there. <job> is a digest of the source listing and the options,
so a rerun skips exactly the files converted the same way, and refuses other work unless told
--overwrite. The merge (`merge_store`, or the end of a conversion without --part) checks that
every file has a marker of one job, then writes classes.json, convert_report.json and, LAST, the
one `index.json` over every file's shards in file order: OUT is a dataset from that moment, and
never half of one. The markers are removed after it.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from engine.data.convert import parquet, writer
from engine.data.convert.pairs import Columns, resolve_column
from engine.data.convert.report import REPORT_NAME, Report
from engine.data.convert.staged import DONE_PREFIX, Plan, convert_files, download, staging_folder
from engine.data.convert.sources import open_source
from engine.errors import UserError
from engine.store import ObjectStore, StoreError, explain, is_url, join

MARKER = re.compile(r"\.converting/done/(\d+)\.([0-9a-f]{16})\.json")
SPACE_PER_WORKER = 3  # source files staged per worker at most: the next, the current, its shards
SPACE_MARGIN = 64 * 2**20
MARKER_READERS = 16


def list_source(source: str, columns: Columns, image_root, staging: Path) -> tuple[tuple[str, ...], list[int]]:
    """The source files (names relative to `source`) in listing order, and their sizes."""
    if not is_url(source):
        opened = open_source(Path(source), columns, None, Path(image_root) if image_root else None)
        if opened.kind not in ("tar", "parquet"):
            raise UserError(f"source {source} is read as a {opened.kind} source: only webdataset .tar and .parquet "
                            f"files convert to an object store OUT; convert to a local OUT and upload the folder")
        base = Path(source) if Path(source).is_dir() else Path(source).parent
        names = tuple(f.relative_to(base).as_posix() for f in opened.files)
        return names, [(base / n).stat().st_size for n in names]
    store = ObjectStore(source, staging / "listing")
    sizes = object_sizes(store)
    keys = store.keys()
    tars = [k for k in keys if "/" not in k and k.lower().endswith(".tar")]
    found = tars or sorted((k for k in keys if k.lower().endswith(".parquet")), key=PurePosixPath)
    if not found:
        shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        raise UserError(f"source {source}: no .tar object directly under the prefix and no .parquet object below "
                        f"it ({f'found {shown}' if keys else 'the prefix is empty or does not exist'}); give the "
                        f"prefix that holds img2dataset's webdataset .tar or parquet files (compressed tars: "
                        f"decompress them first)")
    if not tars:
        _check_parquet(store, found[0], columns, staging)
    return tuple(found), [sizes.get(name, 0) for name in found]


def object_sizes(store: ObjectStore) -> dict[str, int]:
    """Object sizes under the store folder, for the staging space check. ObjectStore lists names
    only; this asks its S3 client (other schemes: no sizes, no check)."""
    client = store.s3_client
    if client is None:
        return {}
    bucket, _, base = store.url.split("://", 1)[1].partition("/")
    base = base.strip("/")
    prefix = f"{base}/" if base else ""
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {item["Key"][len(prefix):]: item["Size"] for page in pages for item in page.get("Contents", [])}
    except Exception as error:
        raise StoreError(explain(error, store.url, "list")) from error


def _check_parquet(store: ObjectStore, name: str, columns: Columns, staging: Path) -> None:
    """The first parquet file's columns, as a local conversion checks them, before any work."""
    path = download(store, name, staging / "check" / PurePosixPath(name).name)
    try:
        if not parquet.has_image_column(path, columns.image):
            raise UserError(f"{join(store.url, name)} has no column of image bytes (img2dataset's metadata parquet "
                            f"beside its tars?): give the prefix of parquet files with images, or --image-column")
        parquet.parquet_source([path], columns, None)  # a missing or wrong column fails here, as locally
        schema = parquet._schema(path)
        image = resolve_column(list(schema.names), columns.image, parquet.PARQUET_IMAGE_COLUMNS, "--image-column",
                               str(path), accept=lambda n: parquet._image_kind(schema.field(n).type) is not None)
        if parquet._image_kind(schema.field(image).type) == "path":
            raise UserError(f"{join(store.url, name)}: column '{image}' holds image paths, which are not in the store "
                            f"listing; convert parquet files that hold the image bytes, or a local copy")
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


def digest(source: str, names, sizes, options: dict) -> str:
    text = json.dumps({"format": 1, "entries_per_block": writer.ENTRIES_PER_BLOCK, "source": source,
                       "names": list(names), "sizes": list(sizes), "options": options}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def open_out(out: str, staging: Path, overwrite: bool, part: tuple[int, int] | None,
             job: str) -> tuple[ObjectStore, dict[int, str]]:
    """The OUT store, checked writable and ready: the files already done in this job, by index."""
    store = ObjectStore(out, staging / "out")
    store.check_writable()
    keys = [k for k in store.keys() if k != ".clipzero-write-check"]  # another part's check_writable
    ours = [k for k in keys if k.startswith((".converting/", "file-"))]
    if "index.json" in keys or len(ours) < len(keys):
        if not overwrite:
            what = "a published dataset (index.json)" if "index.json" in keys else "objects of something else"
            raise UserError(f"output {out} already holds {what}: choose another OUT, or pass --overwrite to "
                            f"replace it")
        store.delete(["index.json"])  # first: from here on OUT is no dataset, never a half one
        if part is None:
            store.delete([k for k in keys if k != "index.json"])
            keys = []
        else:
            store.delete([k for k in keys if k not in ours and k != "index.json"])
    done, stale = {}, []
    for key in keys:
        found = MARKER.fullmatch(key)
        if found and found[2] == job:
            done[int(found[1])] = key
        elif found:
            stale.append((int(found[1]), key))
    mine = [(i, k) for i, k in stale if part is None or i % part[1] == part[0]]
    if mine and not overwrite:
        raise UserError(f"{out} holds files converted from another source listing or with other options "
                        f"({len(stale)} done marker(s) under {join(out, DONE_PREFIX)}): rerun that command to go "
                        f"on with it, or pass --overwrite to convert them again")
    store.delete([k for _, k in mine])
    return store, done


def check_space(staging: Path, sizes: list[int], workers: int) -> None:
    """Refuse to start when the staging disk cannot hold the workers' files (sizes known: S3).
    `staging` is this run's folder inside the one --staging names."""
    need = workers * SPACE_PER_WORKER * max(sizes, default=0) + SPACE_MARGIN
    free = shutil.disk_usage(staging).free
    if max(sizes, default=0) and free < need:
        raise UserError(f"the staging folder {staging.parent} has {free / 2**20:,.0f} MiB free; {workers} worker(s) "
                        f"need about {need / 2**20:,.0f} MiB there ({SPACE_PER_WORKER} x the largest source file "
                        f"each): give --staging DIR on a disk with more room, or fewer --workers")


def merge_store(out: str, staging: Path, known: dict[int, dict] | None = None) -> Report:
    """Publish the converted files at `out` as one dataset: index.json, written last. `known`: the
    markers this process wrote (the others are read from the store)."""
    known = known or {}
    store = ObjectStore(out, staging / "merge")
    keys = store.keys()
    markers = {}
    for key in keys:
        found = MARKER.fullmatch(key)
        if found:
            markers.setdefault(found[2], {})[int(found[1])] = key
    if not markers:
        if "index.json" in keys:
            raise UserError(f"nothing to merge into {out}: it holds a published dataset and no converted files are "
                            f"waiting; to convert again, run the parts with --overwrite")
        raise UserError(f"nothing to merge into {out}: no converted file under {join(out, DONE_PREFIX)}; convert "
                        f"the parts first (launchers/convert.py SOURCE {out} --part I/N, or "
                        f"launchers/slurm/convert.sbatch)")
    if len(markers) > 1:
        raise UserError(f"cannot merge {out}: its files were converted by {len(markers)} different jobs (other "
                        f"source listings or options); rerun every part with the same options and --overwrite")
    (job, done), = markers.items()
    first = known.get(min(done)) or _read_json(store, done[min(done)], staging)
    total, parts = first["files"], first["parts"]
    missing = [i for i in range(total) if i not in done]
    if missing:
        need = sorted({i % parts for i in missing})
        shown = ", ".join(map(str, need[:20])) + (f" and {len(need) - 20} more" if len(need) > 20 else "")
        raise UserError(f"cannot merge {out}: {len(missing)} of {total} source files are not converted yet (part(s) "
                        f"{shown} of {parts}); run `launchers/convert.py SOURCE {out} --part {need[0]}/{parts}` "
                        f"for each, with the same options, then merge again")
    # workers 1, seconds summed over the files: the summary's pairs/s is one worker's
    report = Report(out=out, workers=1)
    report.blocks, shards = 0, []
    with ThreadPoolExecutor(MARKER_READERS) as readers:  # many small objects: a request each
        markers = readers.map(lambda i: known.get(i) or _read_json(store, done[i], staging), range(total))
    for marker in markers:
        report.add_block(marker)
        report.processed += marker["entries"]
        report.blocks += marker["blocks"]
        report.bytes += marker["bytes"]
        report.seconds += marker["seconds"]
        shards += marker["shards"]
    if report.written == 0:
        raise UserError(f"{out}: no usable image-caption pair in any source file "
                        f"({', '.join(f'{n} {r}' for r, n in report.skipped.most_common()) or 'none listed'})")
    names = []
    meta = first.get("meta", {})
    if meta.get("classes") is not None:
        (store.local_root / "classes.json").write_text(json.dumps(meta["classes"], indent=1))
        names.append("classes.json")
    options = {key: value for key, value in meta.get("options", {}).items() if key != "classes"}
    report.options, report.source, report.max_side = options, meta.get("source", ""), options.get("max_side")
    report.write(store.local_root)
    (store.local_root / "index.json").write_text(json.dumps({"version": 2, "shards": shards}, sort_keys=True))
    for name in [*names, REPORT_NAME, "index.json"]:  # index.json LAST: the commit point
        store.put(name)
    store.delete(sorted(done.values()))
    return report


def _read_json(store: ObjectStore, name: str, staging: Path) -> dict:
    path = download(store, name, staging / "markers" / PurePosixPath(name).name)
    content = json.loads(path.read_text())
    path.unlink()
    return content


def convert_to_store(source: str, out: str, *, workers: int, overwrite: bool, columns: Columns, image_root,
                     job: writer.Job, options: dict, part: tuple[int, int] | None, staging, log) -> Report:
    """Convert (part of) `source` into the store folder `out`; see the module docstring."""
    if not is_url(out):
        raise UserError(f"source {source}: a conversion from the object store writes to the object store: give "
                        f"OUT as s3://bucket/prefix (pretraining's --data reads it there), or download the "
                        f"source and convert it to a local OUT")
    if is_url(source) and (source.rstrip("/") + "/").startswith(out.rstrip("/") + "/"):
        raise UserError(f"output {out} holds the source {source}: choose an OUT outside the source prefix")
    started = time.monotonic()
    folder = staging_folder(staging)
    try:
        names, sizes = list_source(source, columns, image_root, folder)
        identity = source if is_url(source) else str(Path(source).resolve())
        job_digest = digest(identity, names, sizes, options)
        _, done = open_out(out, folder, overwrite, part, job_digest)
        index, parts = part or (0, 1)
        mine = [i for i in range(len(names)) if i % parts == index]
        todo = [i for i in mine if i not in done]
        if len(todo) < len(mine):
            log(f"resuming: {len(mine) - len(todo)} of the {len(mine)} source file(s) to convert here are done "
                f"in {out}")
        check_space(folder, [sizes[i] for i in todo] if is_url(source) else [], max(1, min(workers, len(todo))))
        plan = Plan(source=identity, names=names, out=out, columns=columns,
                    image_root=str(Path(image_root).resolve()) if image_root else None, job=job, digest=job_digest,
                    parts=parts, staging=str(folder), meta={"source": identity, "options": options,
                                                              "classes": options.get("classes")})
        log(f"converting {len(todo)} of {len(names)} source file(s) from {source} into {out} "
            f"({'part %d of %d, ' % part if part else ''}staging in {folder})")
        ran, markers = convert_files(plan, todo, workers, log)
        if part is not None:
            report = Report(out=out, workers=ran, source=identity, max_side=options.get("max_side"),
                            options={key: value for key, value in options.items() if key != "classes"})
            for marker in markers:
                report.add_block(marker)
                report.processed += marker["entries"]
                report.blocks += marker["blocks"]
            report.seconds = time.monotonic() - started
            log(f"part {index} of {parts} is done; once all {parts} are, publish {out} with "
                f"`launchers/convert.py --merge {out}`")
            return report
        report = merge_store(out, folder, {marker["file"]: marker for marker in markers})
        report.workers, report.seconds = ran, time.monotonic() - started
        return report
    finally:
        shutil.rmtree(folder, ignore_errors=True)
