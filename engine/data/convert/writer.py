"""Writing the dataset in blocks: one process per part, resumable after a kill, published atomically.

Blocks. The listing (every pair the source names, bad ones included, in a fixed order) is cut
into blocks of ENTRIES_PER_BLOCK entries, numbered in listing order. A block is the unit of
work and of resume: one MDSWriter writes its usable pairs (a shard closes at the size limit or
at the block's end) into a staging folder, the block's record (its counts, its shards, a digest
of its entries' names) is written beside them, and one `os.rename` turns the staging folder
into `part-NNNNN/block-BBBBBB/`. So a block is either complete on disk, record included, or
absent (a staging folder at most, deleted on the next run), never half there.

Workers. With W > 1 workers, block b goes to worker b mod W, a process that reads, decodes and
writes it into its own part folder, `part-{b mod W}/`; the main process only lists the source
and hands out blocks through one small queue per worker (two blocks in flight per worker bound
the memory, parquet images included; `processes.py`). With one worker all of it runs in this
process. Disk errors and a killed worker: `failures.py`.

Merge. The top-level `index.json` lists every block's shards in block order, their basenames
prefixed with `part-NNNNN/block-BBBBBB/` (streaming's `merge_index` prefixes the part folder the
same way, but concatenates parts; here the order is the listing's). So the dataset holds the
usable pairs in listing order, whatever the number of workers. Each part also gets an index.json
of its own blocks, so a part reads as an MDS dataset by itself.

Resume. The work happens in `.OUT.converting`, a hidden sibling whose name comes from OUT alone,
so a rerun finds it. Its `job.json` says what is converted: the source, the size and time of its
files, and every option that changes the output. A rerun of the same command reads the records
of the finished blocks, lists the source again and hands out only the others, checking that each
finished block's entries still hash to what was recorded; nothing is written twice or lost, and
the rerun may use another --workers. Other options or a changed source are refused (or, with
--overwrite, the old work is dropped). A lock on the work folder keeps two conversions apart;
workers die with the main process (Linux: PR_SET_PDEATHSIG), so a killed run leaves no writer
behind. Files are not fsync'ed: a killed process loses nothing the kernel already holds; a power
loss may need --overwrite.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Callable, Iterator

from streaming import MDSWriter

from engine.data.convert import failures, processes, samples
from engine.data.convert.report import EXAMPLES_PER_REASON, REPORT_NAME, Progress, Report, Ticker
from engine.data.convert.samples import SampleRules
from engine.data.convert.pairs import Pair
from engine.errors import UserError
from engine.files import write_atomic

ENTRIES_PER_BLOCK = 1024  # the most pairs a kill loses per worker, and the most samples in one shard
RECORD, JOB, STAGING = "record.json", "job.json", ".staging-"
DONE = "done.json"  # a split part's work folder: the part is finished (split.py)
LOCK_WAIT_S = 10.0  # a killed run's workers may take a moment to notice and exit


@dataclass(frozen=True)
class Job:
    """How every block is written; sent to each worker."""
    columns: dict[str, str]
    size_limit: int
    compression: str | None
    rules: SampleRules


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}{failures.WORK_SUFFIX}"


def part_name(worker: int) -> str:
    return f"part-{worker:05d}"


def names_digest(pairs: list[Pair]) -> str:
    """What a block's entries are, cheaply: their names and any problem the listing found (not file contents)."""
    text = "\0".join(f"{pair.name}\1{pair.problem[0] if pair.problem else ''}" for pair in pairs)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@contextmanager
def locked(work: Path, shared: bool = False) -> Iterator[None]:
    """Hold a lock on the work folder (created if missing) for the whole conversion.

    The parts of a split conversion hold the top work folder's lock shared (they run side by
    side, each holding its own folder's exclusively); a whole conversion and the merge hold it
    exclusively."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        work.mkdir(parents=True, exist_ok=True)
        fd = os.open(work, os.O_RDONLY)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise UserError(f"another conversion into the same output is running (it holds {work}); "
                                f"wait for it to finish, or stop it first") from None
            time.sleep(0.2)
            continue
        # The holder we waited for may have published (renamed) or removed the folder meanwhile.
        try:
            same = os.stat(work).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def resume_state(work: Path, fingerprint: dict, overwrite: bool) -> dict[int, dict]:
    """The records of blocks an interrupted run of the same job finished; the work folder ready to go on."""
    fingerprint = json.loads(json.dumps(fingerprint))  # tuples as lists, as they come back from job.json
    job_file = work / JOB
    if job_file.is_file():
        previous = json.loads(job_file.read_text())  # written atomically: never torn
        if previous != fingerprint:
            changed = sorted(key for key in set(previous) | set(fingerprint)
                             if previous.get(key) != fingerprint.get(key))
            if not overwrite:
                # A converter that writes differently (format, block size) cannot go on with old work.
                how = ("it was written by another version of the converter and cannot be resumed"
                       if {"format", "entries_per_block"} & set(changed) else "rerun that command to resume it")
                raise UserError(f"{work} holds an interrupted conversion with another {', '.join(changed)}: {how}; "
                                f"pass --overwrite to drop it and start over")
            _empty(work)
    elif any(work.iterdir()):
        _empty(work)  # no job recorded: nothing worth keeping
    write_atomic(job_file, json.dumps(fingerprint, indent=1))
    for staging in work.glob(f"part-*/{STAGING}*"):  # blocks cut short: done again from scratch
        shutil.rmtree(staging)
    return collect_records(work)


def collect_records(work: Path) -> dict[int, dict]:
    records: dict[int, dict] = {}
    for path in sorted(work.glob(f"part-*/block-*/{RECORD}")):
        record = json.loads(path.read_text())
        record["dir"] = path.parent.relative_to(work).as_posix()
        if record["block"] in records:
            raise RuntimeError(f"block {record['block']} is in {records[record['block']]['dir']} and in "
                               f"{record['dir']}: the work folder {work} is damaged; rerun with --overwrite")
        records[record["block"]] = record
    return records


class Blocks:
    """The listing cut into numbered blocks; those an earlier run finished are checked, not handed out.

    Part i of n (split.py) hands out only the blocks b with b mod n == i, but counts them all."""

    def __init__(self, pairs: Iterator[Pair], done: dict[int, dict], size: int, part: tuple[int, int] = (0, 1)):
        self.pairs, self.done, self.size = pairs, done, size
        self.part = part
        self.count = 0

    def __iter__(self) -> Iterator[tuple[int, list[Pair]]]:
        index, parts = self.part
        for block_id, chunk in enumerate(iter(lambda: list(islice(self.pairs, self.size)), [])):
            self.count = block_id + 1
            if block_id % parts != index:
                continue
            record = self.done.get(block_id)
            if record is None:
                yield block_id, chunk
            elif record["entries"] != len(chunk) or record["names"] != names_digest(chunk):
                raise UserError(f"the source lists other pairs than when the interrupted conversion began "
                                f"(block {block_id} differs): restore it, or pass --overwrite to start over")


def write_block(part: Path, block_id: int, pairs: list[Pair], job: Job, tick: Callable[[bool], None]) -> None:
    """Check and write one block, then publish it into `part` with a single rename."""
    staging = part / f"{STAGING}{block_id:06d}"
    with failures.write_errors(part.parent):
        try:
            _write_block(part, staging, block_id, pairs, job, tick)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # redone from scratch anyway: give its room back now
            raise


def _write_block(part: Path, staging: Path, block_id: int, pairs: list[Pair], job: Job,
                 tick: Callable[[bool], None]) -> None:
    part.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(staging, ignore_errors=True)
    record = {"block": block_id, "entries": len(pairs), "names": names_digest(pairs),
              "written": 0, "reencoded": 0, "skipped": {}, "examples": {}}
    writer = BlockWriter(out=str(staging), columns=job.columns, compression=job.compression,
                         size_limit=job.size_limit)
    for pair in pairs:
        # looked up on the module at each call, so a test can wrap it
        sample, problem, reencoded = samples.make_sample(pair, job.rules)
        if problem is None:
            writer.write(sample)
            record["written"] += 1
            record["reencoded"] += reencoded
        else:
            reason, detail = problem
            record["skipped"][reason] = record["skipped"].get(reason, 0) + 1
            shown = record["examples"].setdefault(reason, [])
            if len(shown) < EXAMPLES_PER_REASON:
                shown.append(f"{pair.name} ({detail})" if detail else pair.name)
        tick(problem is None)
    writer.finish()
    record["shards"] = writer.shards  # the index entries of its shards, basenames relative to the block
    (staging / RECORD).write_text(json.dumps(record))
    os.rename(staging, part / f"block-{block_id:06d}")


class BlockWriter(MDSWriter):
    """An MDSWriter for one block: the merged index at the top is the only index.

    MDSWriter's own index writing also waits, a second at a time, until its upload queue is
    empty; with nothing to upload (local shards) that is a pause per block for nothing.
    """

    def _write_index(self) -> None:
        pass


def write_blocks(work: Path, blocks: Blocks, job: Job, workers: int, progress: Callable[[], Progress]) -> int:
    """Write every block `blocks` hands out, in this process or in worker processes; returns how many ran.

    At most `workers` processes, and none without a block: when fewer blocks than that are left
    to do, only the workers they go to (block b to worker b mod `workers`; in part i of n, the
    part's k-th block, b // n, to worker k mod `workers`, so every worker gets blocks) are started."""
    parts = blocks.part[1]
    worker_of = lambda block_id: block_id // parts % workers  # noqa: E731
    todo = iter(blocks)
    first = list(islice(todo, workers))  # fewer than `workers`: these are all the blocks to do
    numbers = (sorted({worker_of(block_id) for block_id, _ in first}) if len(first) < workers
               else list(range(workers)))
    todo = chain(first, todo)
    if len(numbers) <= 1:  # one worker's blocks (or none): no process to start
        part = work / part_name(numbers[0] if numbers else 0)
        bar = progress()
        ticker = Ticker(bar.add)
        try:
            for block_id, pairs in todo:
                write_block(part, block_id, pairs, job, ticker)
            ticker.flush()
        finally:
            bar.close()
        return len(numbers)
    write = lambda n, block_id, pairs, tick: write_block(work / part_name(n), block_id, pairs, job, tick)
    return processes.write_in_workers(todo, numbers, worker_of, write, progress, work)


def merged_index(work: Path, records: dict[int, dict], count: int) -> dict:
    """One index over every block's shards, in block order, basenames relative to the dataset root."""
    if sorted(records) != list(range(count)):
        raise UserError(f"the source lists {count} block(s) of pairs but {work} holds blocks "
                        f"{sorted(set(records) - set(range(count)))[:5]}... beyond them: the source changed "
                        f"since the interrupted conversion; pass --overwrite to start over")
    shards = []
    for block_id in range(count):
        record = records[block_id]
        for shard in record["shards"]:
            shard = dict(shard)
            for key in ("raw_data", "zip_data"):
                if shard.get(key):
                    shard[key] = {**shard[key], "basename": f"{record['dir']}/{shard[key]['basename']}"}
            shards.append(shard)
    return {"version": 2, "shards": shards}


def _rebased(shard: dict, prefix: str) -> dict:
    """A merged index entry with `prefix` taken off its basenames."""
    return {**shard, **{key: {**shard[key], "basename": shard[key]["basename"][len(prefix):]}
                        for key in ("raw_data", "zip_data") if shard.get(key)}}


def finish(work: Path, out: Path, records: dict[int, dict], count: int, classes: dict | None, report: Report) -> None:
    """Write the top-level files, drop the bookkeeping and rename the work folder to `out`."""
    index = merged_index(work, records, count)
    (work / "index.json").write_text(json.dumps(index, sort_keys=True))
    for part in sorted({record["dir"].split("/")[0] for record in records.values()}):
        # each part is an MDS dataset of its own too, as streaming's merge_index expects of parts
        prefix = f"{part}/"
        shards = [_rebased(shard, prefix) for shard in index["shards"]
                  if shard["raw_data"]["basename"].startswith(prefix)]
        (work / part / "index.json").write_text(json.dumps({"version": 2, "shards": shards}, sort_keys=True))
    if classes is not None:
        (work / "classes.json").write_text(json.dumps(classes, indent=1))
    # Every write comes before the bookkeeping goes: a full disk up to here leaves a work folder
    # that a rerun finishes, not one it cannot recognise and empties.
    report.bytes = sum(path.stat().st_size for path in work.rglob("*")
                       if path.is_file() and path.name not in (RECORD, JOB, DONE, REPORT_NAME))
    report.write(work)
    for record in records.values():
        (work / record["dir"] / RECORD).unlink()
    # a whole conversion's job.json, or a split one's: each part's job.json and done.json
    for path in [*work.glob(JOB), *work.glob(f"split-*/{JOB}"), *work.glob(f"split-*/{DONE}")]:
        path.unlink()
    _publish(work, out)


def _publish(partial: Path, out: Path) -> None:
    """Swap the finished dataset into place; a replaced one is moved aside first, then deleted."""
    if not out.exists():
        os.rename(partial, out)
        return
    old = out.parent / f".{out.name}.replaced-{os.getpid()}"
    os.rename(out, old)
    os.rename(partial, out)
    shutil.rmtree(old)


def _empty(folder: Path) -> None:
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
