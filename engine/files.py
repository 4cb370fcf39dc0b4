"""Files that a reader sees whole or not at all, whenever the writer is killed."""
import os
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, content: str | Callable[[Path], object]) -> None:
    """Replace `path` by `content`: the text, or a function that writes the file it is given.

    The content goes to a temporary file beside `path` (one file system, so the rename is
    atomic) named with this process's id, so two processes writing the same file at once
    (ranks of one node) never write into the same temporary file; the last rename wins. Not
    fsync'ed: a killed process loses nothing the kernel already holds."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    if isinstance(content, str):
        tmp.write_text(content)
    else:
        content(tmp)
    os.replace(tmp, path)
