"""A conversion split over processes or machines: `--part I/N` converts part I of N, `--merge` publishes.

Split. Every part lists the whole source (the listing is the same on every machine that sees the
same files: job.json's fingerprint says so, and the merge compares them) and converts only the
blocks b with b mod N == I. So the parts' blocks are disjoint and together cover the listing
once, whatever N, and without a first pass to count the blocks.

Where. Part I of N works in `.OUT.converting/split-IIIII-of-NNNNN/`, a work folder of its own
laid out as a whole conversion's (job.json, worker folders, blocks with their records): the
parts never write the same file, and one part's rerun resumes as a whole conversion does
(writer.py's "Resume"), converting only the blocks it lacks. A finished part writes `done.json`
(the number of blocks in the listing, its counts) atomically; no part publishes anything.
Each part holds its own folder's lock, and the top work folder's shared.

Merge. `--merge OUT` takes the top work folder's lock exclusively (so no part is running), checks
that parts 0..N-1 are all done, of one N, with the same job, the same listing length and exactly
their blocks, then writes one index over every block in block order and renames the work folder
to OUT, as a whole conversion does (writer.finish). The merged dataset holds the same samples in
the same order and the same shard files as a whole conversion; only the shards' folders differ
(`split-IIIII-of-NNNNN/part-WWWWW/block-BBBBBB/` for `part-WWWWW/block-BBBBBB/`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from engine.data.convert import writer
from engine.errors import UserError
from engine.files import write_atomic

FOLDER = re.compile(r"split-(\d{5})-of-(\d{5})")


def parse_part(text: str) -> tuple[int, int]:
    """`I/N` (0 <= I < N) as given to --part."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]) <= 99999:
        raise UserError(f"--part {text}: give I/N with 0 <= I < N <= 99999, e.g. --part 0/8 for the first of 8 parts")
    return int(match[1]), int(match[2])


def folder(top: Path, part: tuple[int, int]) -> Path:
    return top / f"split-{part[0]:05d}-of-{part[1]:05d}"


def split_folders(top: Path) -> list[Path]:
    return sorted(path for path in top.glob("split-*") if path.is_dir() and FOLDER.fullmatch(path.name))


def mark_done(work: Path, blocks: int, seconds: float, workers: int, classes: int | None) -> None:
    write_atomic(work / writer.DONE, json.dumps({"blocks": blocks, "seconds": seconds, "workers": workers,
                                                 "classes": classes}))


def finished_parts(top: Path, out: Path) -> tuple[dict, dict, list[dict]]:
    """Check that every part of one split is done with the same job; returns (job, records, dones)."""
    folders = split_folders(top)
    command = f"launchers/convert.py SOURCE {out} --part I/N"
    if not folders:
        raise UserError(f"nothing to merge into {out}: no part of a split conversion in {top}; convert the parts "
                        f"first ({command}, or launchers/slurm/convert.sbatch)")
    splits = {int(FOLDER.fullmatch(path.name)[2]) for path in folders}
    if len(splits) > 1:
        raise UserError(f"{top} holds parts of splits into {', '.join(map(str, sorted(splits)))} parts; keep one: "
                        f"delete the folders split-*-of-N of the others, then merge again")
    parts = splits.pop()
    done = {int(FOLDER.fullmatch(path.name)[1]): path for path in folders if (path / writer.DONE).is_file()}
    missing = [i for i in range(parts) if i not in done]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise UserError(f"cannot merge {out}: {len(missing)} of {parts} parts are missing or unfinished (part(s) "
                        f"{shown}); run `{command.replace('I/N', f'{missing[0]}/{parts}')}` for each, with the "
                        f"same options, then merge again")
    jobs = {i: json.loads((done[i] / writer.JOB).read_text()) for i in range(parts)}
    dones = [json.loads((done[i] / writer.DONE).read_text()) for i in range(parts)]
    other = [i for i in range(parts) if jobs[i] != jobs[0]]
    if other:
        changed = sorted(key for key in set(jobs[0]) | set(jobs[other[0]]) if jobs[0].get(key) != jobs[other[0]].get(key))
        raise UserError(f"cannot merge {out}: part(s) {', '.join(map(str, other))} converted with another "
                        f"{', '.join(changed)} than part 0; rerun them with part 0's source and options and "
                        f"--overwrite")
    counts = {d["blocks"] for d in dones}
    if len(counts) > 1:
        raise UserError(f"cannot merge {out}: the parts saw {' and '.join(map(str, sorted(counts)))} blocks in the "
                        f"source listing, so it changed while they ran; rerun every part with --overwrite")
    count = counts.pop()
    records: dict[int, dict] = {}
    for i in range(parts):
        found = writer.collect_records(done[i])
        if sorted(found) != list(range(i, count, parts)):
            raise UserError(f"cannot merge {out}: part {i} in {done[i]} does not hold exactly its blocks; rerun "
                            f"`{command.replace('I/N', f'{i}/{parts}')} --overwrite`")
        for block_id, record in found.items():
            records[block_id] = {**record, "dir": f"{done[i].name}/{record['dir']}"}
    return jobs[0], records, dones
