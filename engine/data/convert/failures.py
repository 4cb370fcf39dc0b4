"""Failures that stop a conversion partway without anything wrong in the input: a full disk, a
read-only or forbidden output, a worker killed from outside (the out-of-memory killer).

Each becomes an `Interrupted`, a UserError whose one-line message says what to change; the
finished blocks stay in the work folder, so the same command, run again, resumes (see writer.py).
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from engine.errors import UserError

WORK_SUFFIX = ".converting"  # writer.work_dir(OUT) is OUT's sibling `.{OUT.name}.converting`
RESUMES = "then run the same command again: it resumes where it stopped"


class Interrupted(UserError):
    """A UserError after which the work folder is kept: a rerun goes on from the finished blocks."""


def out_of(work: Path) -> Path:
    """The OUT a work folder belongs to: the path the user gave, so messages name it."""
    while not work.name.endswith(WORK_SUFFIX) and work.parent != work:
        work = work.parent  # a split part's folder lies inside the work folder
    return work.parent / work.name[1:-len(WORK_SUFFIX)]


@contextmanager
def write_errors(work: Path) -> Iterator[None]:
    """Turn the OSErrors of writing under `work` (or creating OUT's parent) into an Interrupted.

    ENOSPC, EDQUOT and EROFS only come from writing, so they are always ours. EACCES and EPERM
    also come from reading the source; those are translated only when the path is the output's.
    """
    try:
        yield
    except OSError as error:
        message = write_error_message(error, work)
        if message is None:
            raise
        raise Interrupted(message) from error


def write_error_message(error: OSError, work: Path) -> str | None:
    out = out_of(work)
    where = f"{error.filename}: " if error.filename else ""
    cause = f"({where}{error.strerror or error})"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left" if error.errno == errno.ENOSPC else "disk quota exceeded"
        return (f"{what} on the filesystem of {out} {cause}; {_kept(work)}: free space there ({_free(work)}), "
                f"{RESUMES} (to start over on another filesystem instead, delete {work} and give another OUT)")
    if error.errno == errno.EROFS or (error.errno in (errno.EACCES, errno.EPERM) and _is_output(error, work)):
        return (f"cannot write under {out} {cause}: make {out.parent} writable for this user (or give an OUT "
                f"where you may write), {RESUMES}")
    return None


def worker_died(number: int, exitcode: int, work: Path) -> Interrupted:
    """The message for a worker process that ended without reporting (killed by a signal, usually)."""
    if exitcode < 0:
        try:
            how = f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            how += " (the out-of-memory killer sends it, or kill -9: check `dmesg` or the job's memory limit; " \
                   "fewer --workers use less memory)"
    else:
        how = f"exited with code {exitcode} without reporting an error"
    return Interrupted(f"convert worker {number} {how}; {_kept(work)}: {RESUMES}")


def _kept(work: Path) -> str:
    finished = len(list(work.glob("part-*/block-*")))
    return f"the {finished} finished block(s) are kept in {work}"


def _free(work: Path) -> str:
    try:
        return f"{shutil.disk_usage(work if work.exists() else work.parent).free / 2**20:,.1f} MiB free now"
    except OSError:
        return "free space unknown"


def _is_output(error: OSError, work: Path) -> bool:
    """True when the failed path is OUT, the work folder, something in them, or a folder above OUT."""
    out = out_of(work).absolute()
    for name in (error.filename, error.filename2):
        if name is None:
            continue
        path = Path(os.path.abspath(os.fsdecode(name)))
        if path.is_relative_to(work.absolute()) or path.is_relative_to(out) or out.is_relative_to(path):
            return True
    return False
