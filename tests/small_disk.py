"""A real small file system for the full-disk tests: a tmpfs mounted on a folder (root only;
the test is skipped, saying why, where mounting is not permitted)."""
import subprocess
from pathlib import Path

import pytest


def mount_tmpfs(folder: Path, options: str) -> None:
    """Mount a tmpfs with `options` (e.g. "size=3M") on `folder`, created if need be. The caller
    unmounts it (`umount -l`) whatever happens."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"a real small filesystem is needed and mounting a tmpfs is not permitted here: "
                    f"{done.stderr.strip()}")
