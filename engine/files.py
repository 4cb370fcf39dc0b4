"""Files that a reader sees whole or not at all, whenever the writer is killed."""
import os
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, content: str | Callable[[Path], object]) -> None:
    """Replace `path` by `content`: the text, or a function that writes the file it is given.

    The content goes to a temporary file beside `path` (one file system, so the rename is
    atomic) named with this process's id, so two processes writing the same file at once
    (ranks of one node) never write into the same temporary file; the last rename wins. Not
    fsync'ed: a killed process loses nothing the kernel already holds. A write that fails (a
    full disk) removes its temporary file, giving its space back, and leaves `path` as it was."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        else:
            content(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


# File systems that several machines mount at once (network and cluster file systems).
SHARED_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "fuse.ceph", "glusterfs",
    "fuse.glusterfs", "panfs", "wekafs", "fuse.juicefs", "fuse.s3fs", "fuse.gcsfuse", "fuse.sshfs", "9p"})


def filesystem_type(path: Path, mounts: str | None = None) -> str:
    """The type of the file system holding `path` (which must exist), from /proc/mounts (or the
    `mounts` text given): the entry with the longest mount point above it. "" when unknown."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:  # not Linux
            return ""
    target, best, kind = os.path.realpath(path), -1, ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes spaces and the like in octal (\040).
        point = fields[1].encode().decode("unicode_escape")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > best:
            best, kind = len(point), fields[2]
    return kind
