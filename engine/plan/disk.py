"""Part of the planner: how many bytes one checkpoint takes, how many are on disk at once, and
whether the file system under the run directory holds them.

A new checkpoint is written whole before the oldest is pruned (engine/train/checkpoint.py), so a
run holds its KEEP_LAST complete checkpoints and, while it writes the next, one more.
"""
import os
import tempfile
from pathlib import Path

from engine.errors import UserError
from engine.store import local_name
from engine.plan.memory import ADAM_STATE_BYTES_PER_PARAM, FP32_MASTER_BYTES_PER_PARAM, GB

KEEP_LAST = 2  # complete checkpoints kept; older ones are deleted once a newer one is complete
MB = 10**6


def show_bytes(n_bytes: float) -> str:
    """A size as people read a disk's: in GB from 1 GB up, else in MB."""
    return f"{n_bytes / GB:,.3g} GB" if n_bytes >= GB else f"{n_bytes / MB:.1f} MB"


def _weight_and_master_bytes(precision: str, stage: int) -> tuple[int, int]:
    # Without ZeRO, fp32 and bf16 (autocast) train fp32 weights that the optimizer steps in
    # place: no master copy. ZeRO, and fp16 always, keep an fp32 master beside 16-bit weights.
    low_precision_weights = precision == "fp16" or (precision == "bf16" and stage > 0)
    master = FP32_MASTER_BYTES_PER_PARAM if stage > 0 or precision == "fp16" else 0
    return (2 if low_precision_weights else 4), master


def checkpoint_bytes_per_param(precision: str, stage: int) -> int:
    """The weights as the engine holds them, plus the optimizer's states as engine/plan/memory.py
    counts them (two fp32 states per parameter, and ZeRO's fp32 master copy)."""
    weights, master = _weight_and_master_bytes(precision, stage)
    return weights + ADAM_STATE_BYTES_PER_PARAM - FP32_MASTER_BYTES_PER_PARAM + master


def checkpoints_at_once(total_steps: int, checkpoint_every: int) -> int:
    """The most checkpoints on disk at once: KEEP_LAST plus the one being written, or fewer when
    the run writes fewer (one each checkpoint_every steps, and one at its end)."""
    written = total_steps // checkpoint_every + (1 if total_steps % checkpoint_every else 0)
    return min(KEEP_LAST + 1, written)


def checkpoint_decisions(n_params: int, precision: str, stage: int, total_steps: int,
                         checkpoint_every: int) -> list[tuple[str, object, str]]:
    """(name, value, reason) of checkpoint_bytes and checkpoints_on_disk."""
    per_param = checkpoint_bytes_per_param(precision, stage)
    size = n_params * per_param
    at_once = checkpoints_at_once(total_steps, checkpoint_every)
    weight_bytes, master_bytes = _weight_and_master_bytes(precision, stage)
    weights = "16-bit" if weight_bytes == 2 else "fp32"
    master = "an fp32 master copy and " if master_bytes else ""
    return [("checkpoint_bytes", size,
             f"{show_bytes(size)}: {per_param} bytes per parameter, {weights} weights plus {master}two optimizer "
             "states in fp32 (per-rank files such as a DeCLIP queue come on top)"),
            ("checkpoints_on_disk", at_once,
             f"{show_bytes(at_once * size)} at most: the last {KEEP_LAST} complete checkpoints and the one being "
             "written" if at_once == KEEP_LAST + 1 else f"{show_bytes(at_once * size)}: all the run writes")]


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path`, or its
    nearest existing parent (a run directory not made yet)."""
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def check_room(run_dir: Path, checkpoint_bytes: int, at_once: int) -> str | None:
    """A warning when the file system under `run_dir` cannot hold the checkpoints the run has on
    disk at once (counting those a resumed run already has there); UserError when it cannot
    hold even one more. Then the run could train but keep nothing of it, and would stop at its
    first checkpoint; with room for one or two it keeps its progress and stops, with the
    message of engine/train/checkpoint.py, at the checkpoint that does not fit."""
    checkpoints = run_dir / "checkpoints"
    present = sum(1 for p in checkpoints.glob("step*") if p.is_dir()) if checkpoints.is_dir() else 0
    missing = max(1, at_once - present)
    free = free_bytes(run_dir)
    where = f"the file system of {run_dir} has {show_bytes(free)} free"
    fix = "free space there, or give --out on a larger disk"
    if free < checkpoint_bytes:
        raise UserError(f"{where}, less than one checkpoint of this run ({show_bytes(checkpoint_bytes)}, see "
                        f"checkpoint_bytes in the plan): it could train but keep nothing. {fix.capitalize()}"
                        + (", then run the same command again: it resumes from its last checkpoint."
                           if present else "."))
    if free < missing * checkpoint_bytes:
        return (f"warning: {where}; this run needs {show_bytes(missing * checkpoint_bytes)} for {missing} more "
                f"checkpoint(s) of {show_bytes(checkpoint_bytes)} on disk at once (checkpoints_on_disk in the plan). "
                f"It will stop with a message at the first checkpoint that does not fit: {fix}")
    return None


def staging_decision(out: str | None, dialled: str | None) -> tuple[str | None, str]:
    """(staging_dir, reason): where a run whose --out is an object store folder is written on
    each node before it is copied there (engine/train/run_store.py). Each rank decides it on
    its own node: TMPDIR may differ between nodes (a job's own temporary folder)."""
    if out is None or "://" not in out:
        if dialled is not None:
            raise UserError(f"--staging {dialled} is for a run whose --out is an object store URL "
                            f"(s3://bucket/prefix); --out {out or '(default)'} is a local folder, written directly")
        return None, "--out is a local folder: the run is written there directly"
    if dialled is not None:
        return str(Path(dialled).absolute()), "--staging: each node writes the run here, then copies it to --out"
    folder = Path(tempfile.gettempdir()) / "clipzero-staging" / local_name(out)
    return (str(folder), "each node's temporary folder (TMPDIR; --staging to choose): the run is written here, "
            f"then copied to {out} in the background; a resume on a fresh disk fetches its checkpoint from there")
