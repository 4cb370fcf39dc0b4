"""Checkpoints that a crash mid-save can never break.

Layout under <run>/checkpoints/:
  step00000040/            DeepSpeed's files (model, optimizer shards, LR scheduler, client
                           state with the step) + rank<r>.pt (that rank's RNG and its own
                           state: loader position, the objective's per-rank state)
  latest                   the tag of the newest *complete* checkpoint, replaced atomically

`latest` is written by rank 0 only after every rank has finished writing (a barrier), via a
temporary file and os.replace, so it always names a complete checkpoint. DeepSpeed's own
`latest` is turned off because it is written without that guarantee.
"""
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

from engine import dist

KEEP_LAST = 2  # older complete checkpoints are deleted once a newer one is complete


def _tag(step: int) -> str:
    return f"step{step:08d}"


def _barrier() -> None:
    if dist.world_size() > 1:
        torch_dist.barrier()


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save(engine, checkpoint_dir: Path, step: int, rank_state: dict) -> None:
    """Every rank calls this (DeepSpeed shards optimizer states across ranks). `rank_state` is
    what this rank alone knows (data position, e.g. a per-rank queue), restored by load()."""
    tag = _tag(step)
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={"step": step},
                           save_latest=False)
    own = {"rng": rng_state(), "state": rank_state}
    _atomic_write(checkpoint_dir / tag / f"rank{dist.rank()}.pt", lambda p: torch.save(own, p))
    _barrier()
    if dist.rank() == 0:
        _atomic_write(checkpoint_dir / "latest", lambda p: p.write_text(tag))
        _prune(checkpoint_dir, keep=tag)
    _barrier()


def _prune(checkpoint_dir: Path, keep: str) -> None:
    tags = sorted(p.name for p in checkpoint_dir.glob("step*") if p.is_dir())
    complete = [t for t in tags if t <= keep]
    for old in complete[:-KEEP_LAST]:
        shutil.rmtree(checkpoint_dir / old, ignore_errors=True)


def latest_tag(checkpoint_dir: Path) -> str | None:
    pointer = checkpoint_dir / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def load(engine, checkpoint_dir: Path) -> tuple[int, dict] | None:
    """Restore the newest complete checkpoint; returns (step, rank_state) or None."""
    tag = latest_tag(checkpoint_dir)
    if tag is None:
        return None
    _, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    own = torch.load(checkpoint_dir / tag / f"rank{dist.rank()}.pt", weights_only=False)
    set_rng_state(own["rng"])
    return client_state["step"], own["state"]
