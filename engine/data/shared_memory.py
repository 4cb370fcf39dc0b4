"""Streaming's shared memory, cleaned without touching that of other runs.

mosaicml-streaming keeps each dataset's coordination state in POSIX shared memory named
`<prefix>_<what>` (/dev/shm/000042_locals, 000042_barrier, ...) and frees it when the dataset
is collected. A killed run never frees it, and the next run on the same local directory is
then refused ("reused local directory"). streaming's own clean_stale_shared_memory() unlinks
every prefix on the machine, those of runs that are alive included (another job sharing the
node loses its state), and it probes names by creating them, which makes a run starting at
the same moment fail with FileExistsError (seen with two runs on one machine). Here a prefix
is stale only when no process maps any of its segments (/proc/<pid>/maps): a live dataset
maps its own for as long as it exists. A segment is created a moment before its creator maps
it, so a prefix is removed only when it is still unmapped a second later: a run starting at the
same time on a loaded machine keeps its memory (seen: a rank of such a run then failed to find
its leader's segment).
"""
import os
import re
import time
from collections import defaultdict
from pathlib import Path

from streaming.base.shared.prefix import _unpack_locals

SHM = Path("/dev/shm")
RECHECK_AFTER_S = 1.0
_STREAMING_NAME = re.compile(r"(\d{6})_[a-z_]+")


def mapped_shared_memory() -> set[str]:
    """Names of /dev/shm entries some process on this machine maps now (those we can see)."""
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or belongs to another user
            continue
        for line in text.splitlines():
            at = line.find("/dev/shm/")
            if at >= 0:
                names.add(line[at + len("/dev/shm/"):].removesuffix(" (deleted)"))
    return names


def remove_stale_streaming_memory() -> list[str]:
    """Unlink every streaming prefix that no process maps; returns the names removed. Call it
    on one rank per node (local rank 0) before that node's first StreamingDataset."""
    groups: dict[str, list[Path]] = defaultdict(list)
    try:
        entries = list(SHM.iterdir())
    except OSError:
        return []
    for path in entries:
        match = _STREAMING_NAME.fullmatch(path.name)
        if match:
            groups[match.group(1)].append(path)
    unmapped = _unmapped(groups.values())
    if unmapped:
        time.sleep(RECHECK_AFTER_S)
        unmapped = _unmapped(unmapped)
    removed = []
    for paths in unmapped:
        for path in paths:
            try:
                path.unlink()
                removed.append(path.name)
            except FileNotFoundError:
                pass
            except PermissionError:  # another user's: theirs to clean
                break
    return sorted(removed)


def _unmapped(groups) -> list[list[Path]]:
    """The groups of which no segment is mapped by any process now."""
    groups = list(groups)
    if not groups:
        return []
    in_use = mapped_shared_memory()
    return [paths for paths in groups if not any(path.name in in_use for path in paths)]


def live_streaming_locals() -> set[str]:
    """The local directories (absolute) that live streaming datasets on this machine use: those
    listed in a `<prefix>_locals` segment, streaming's registry, that some process maps.

    streaming compares a new dataset's directories with this registry itself, but it passes
    over every prefix whose file locks exist in the temp directory, and those locks outlive
    their runs: a second run on a cache in use was let through, and the first then waited
    forever for a shard the second had evicted.
    """
    found = set()
    for name in mapped_shared_memory():
        if not (name.endswith("_locals") and _STREAMING_NAME.fullmatch(name)):
            continue
        try:
            directories, _ = _unpack_locals((SHM / name).read_bytes())
        except (OSError, ValueError, UnicodeDecodeError):  # gone meanwhile, or not yet written
            continue
        found.update(os.path.abspath(directory) for directory in directories)
    return found
