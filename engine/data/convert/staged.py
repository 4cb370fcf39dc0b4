"""The workers of a conversion from or to the object store (remote.py): each converts its source
files one at a time with the local readers and writer, fetching the next file meanwhile and
uploading the previous one's shards, then that file's done marker, LAST.

Staging: worker w works in STAGING/worker-w/: `in/FFFFF/<name>` (a downloaded source file, deleted
once converted) and `out/file-FFFFF/` (its shards, deleted once uploaded). A killed worker loses at
most its current file: a rerun converts every file that has no marker.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path, PurePosixPath
from typing import Callable

from engine.data.convert import processes, writer
from engine.data.convert.failures import Interrupted
from engine.data.convert.pairs import Columns
from engine.data.convert.report import EXAMPLES_PER_REASON
from engine.data.convert.sources import open_source
from engine.errors import UserError
from engine.store import ObjectStore, StoreError, explain, is_url, join

DONE_PREFIX = ".converting/done"
SINGLE_STREAM = dict(multipart_threshold=2**30, multipart_chunksize=64 * 2**20, max_concurrency=4)

@dataclass(frozen=True)
class Plan:
    """What every worker needs (picklable)."""
    source: str                 # a URL, or a local folder or file
    names: tuple[str, ...]      # the source files, relative to `source`, in listing order
    out: str
    columns: Columns
    image_root: str | None
    job: writer.Job
    digest: str
    parts: int
    staging: str
    meta: dict                  # source, options and classes.json, for the merge's report and files


def file_dir(index: int) -> str:
    return f"file-{index:05d}"


def marker_name(index: int, digest: str) -> str:
    return f"{DONE_PREFIX}/{index:05d}.{digest}.json"


def convert_files(plan: Plan, todo: list[int], workers: int, log: Callable[[str], None]) -> tuple[int, list[dict]]:
    """Convert the files `todo` in `workers` processes (none with one): how many ran, the files' markers."""
    workers = max(1, min(workers, len(todo)))
    if workers == 1:
        return 1, run_files(plan, 0, todo, log)
    pool = ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=processes._die_with,
                               initargs=(os.getpid(),))
    try:
        futures = [pool.submit(run_files, plan, w, todo[w::workers], None) for w in range(workers)]
        return workers, [count for future in futures for count in future.result()]
    except BrokenProcessPool as error:
        _kill(pool)
        raise Interrupted(f"a convert worker died (killed by the out-of-memory killer or kill -9?); the files it "
                          f"finished are kept in {plan.out}: run the same command again, it converts only the "
                          f"others") from error
    except BaseException:  # one worker's error, or Ctrl-C: the others stop now, not after their files
        _kill(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _kill(pool: ProcessPoolExecutor) -> None:
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()


def run_files(plan: Plan, worker: int, todo: list[int], log: Callable[[str], None] | None) -> list[dict]:
    """One worker: fetch the next file while converting one and uploading the one before."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    root = Path(plan.staging) / f"worker-{worker}"
    source = ObjectStore(plan.source, root / "in") if is_url(plan.source) else None
    out = ObjectStore(plan.out, root / "out")
    counts = []

    def fetch(index: int) -> Path:
        if source is None:
            base = Path(plan.source)
            return base if base.is_file() else base / plan.names[index]
        name = plan.names[index]
        return download(source, name, root / "in" / f"{index:05d}" / PurePosixPath(name).name)

    try:
        with ThreadPoolExecutor(1) as fetcher, ThreadPoolExecutor(1) as uploader:
            fetching = fetcher.submit(fetch, todo[0]) if todo else None
            uploading = None
            for k, index in enumerate(todo):
                local = fetching.result()
                fetching = fetcher.submit(fetch, todo[k + 1]) if k + 1 < len(todo) else None
                marker = convert_file(plan, index, local, root / "out")
                if source is not None:
                    shutil.rmtree(local.parent)
                if uploading is not None:
                    uploading.result()
                uploading = uploader.submit(upload_file, out, plan, index, marker)
                counts.append(marker)
                log(f"  {plan.names[index]}: {marker['written']:,} of {marker['entries']:,} pairs written")
            if uploading is not None:
                uploading.result()
        return counts
    except (OSError, UserError) as error:  # writer.write_block's own Interrupted names no --staging
        if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _chain(error)):
            raise Interrupted(f"no space left in the staging folder {plan.staging} ({error}); give --staging DIR on "
                              f"a disk with more room, or fewer --workers, then run the same command again: it "
                              f"converts only the files not done") from None
        raise


def _chain(error: BaseException | None):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def convert_file(plan: Plan, index: int, local: Path, root: Path) -> dict:
    """One source file into root/file-FFFFF/block-BBBBBB/; returns its done marker's content."""
    started = time.monotonic()
    folder = root / file_dir(index)
    shutil.rmtree(folder, ignore_errors=True)
    source = open_source(local, plan.columns, None, Path(plan.image_root) if plan.image_root else None)
    blocks = writer.Blocks(source.pairs(), {}, writer.ENTRIES_PER_BLOCK)
    for block_id, pairs in blocks:
        writer.write_block(folder, block_id, pairs, plan.job, lambda written: None)
    marker = {"file": index, "name": plan.names[index], "files": len(plan.names), "parts": plan.parts,
              "job": plan.digest, "entries": 0, "written": 0, "reencoded": 0, "skipped": {}, "examples": {},
              "shards": [], "blocks": blocks.count, "meta": plan.meta}
    for block_id in range(blocks.count):
        block = folder / f"block-{block_id:06d}"
        record = json.loads((block / writer.RECORD).read_text())
        (block / writer.RECORD).unlink()
        for key in ("entries", "written", "reencoded"):
            marker[key] += record[key]
        for reason, count in record["skipped"].items():
            marker["skipped"][reason] = marker["skipped"].get(reason, 0) + count
            shown = marker["examples"].setdefault(reason, [])
            shown.extend(record["examples"][reason][:EXAMPLES_PER_REASON - len(shown)])
        prefix = f"{file_dir(index)}/{block.name}/"
        marker["shards"] += [{**shard, **{key: {**shard[key], "basename": prefix + shard[key]["basename"]}
                                          for key in ("raw_data", "zip_data") if shard.get(key)}}
                             for shard in record["shards"]]
    marker["bytes"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    marker["seconds"] = time.monotonic() - started
    return marker


def upload_file(out: ObjectStore, plan: Plan, index: int, marker: dict) -> None:
    """The file's shards, then (after removing any a crashed run left that are not its) its marker, LAST."""
    folder = out.local_root / file_dir(index)
    names = [p.relative_to(out.local_root).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    for name in names:
        out.put(name)
    out.delete(sorted(set(out.keys(f"{file_dir(index)}/")) - set(names)))
    path = out.local_root / marker_name(index, plan.digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(marker))
    out.put(marker_name(index, plan.digest))
    path.unlink()
    shutil.rmtree(folder)


def download(store: ObjectStore, name: str, destination: Path) -> Path:
    """store.get(name, destination), through the S3 client the store already holds where it has one:
    store.get makes a client per call (streaming's CloudDownloader.direct_download), which costs
    about 0.2 CPU-s each, a file's worth of pairs at a time;
    and in one GET up to SINGLE_STREAM's threshold, not in 8 MiB ranges from 10 threads (boto's
    default): a quarter of the CPU time, and the worker needs the file only by the time it is done
    converting the one before."""
    client = store.s3_client
    if client is None:
        return store.get(name, destination)
    # boto3 only where the store is S3 (its client exists, so boto3 is installed)
    from boto3.s3.transfer import TransferConfig
    bucket, _, base = store.url.split("://", 1)[1].partition("/")
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f"{destination.name}.download{os.getpid()}")
    try:
        client.download_file(bucket, "/".join(p for p in (base.strip("/"), name) if p), str(partial),
                             Config=TransferConfig(**SINGLE_STREAM))
    except Exception as error:
        partial.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise StoreError(explain(error, join(store.url, name), "download")) from error
    os.replace(partial, destination)
    return destination


def staging_folder(staging: str | Path | None) -> Path:
    root = Path(staging) if staging is not None else Path(tempfile.gettempdir())
    try:
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="clipzero-convert-", dir=root))
    except OSError as error:
        raise UserError(f"--staging {root}: cannot make a folder there ({error}); give a writable local "
                        f"folder") from error
