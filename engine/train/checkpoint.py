"""Checkpoints that a crash mid-save can never break, and a resume that survives a torn one.

Layout under <run>/checkpoints/:
  step00000040/            DeepSpeed's files (model, optimizer shards, LR scheduler, client
                           state with the step) + rank<r>.pt (that rank's RNG and its own
                           state: loader position, the objective's per-rank state)
                           + manifest.json (every file of the checkpoint with its size)
  latest                   the tag of the newest *complete* checkpoint, replaced atomically

`manifest.json` and then `latest` are written by rank 0 only after every rank has finished
writing (a barrier), each via a temporary file and os.replace, so `latest` always names a
complete checkpoint. DeepSpeed's own `latest` is turned off because it is written without that
guarantee.

A checkpoint can still be damaged after it was written (a full disk during a copy, a
filesystem that lost a file). Before loading, the ranks check the candidate together against
its manifest (sizes, and the CRCs of the zip archives torch writes, each file read by one
rank) and agree on the result; a damaged one is reported, set aside as `<tag>.damaged`, and the
previous complete checkpoint is loaded instead.

A file that cannot be written (a full disk) ends the save on every rank together: the ranks
agree on it where they met before, the partial checkpoint is removed so that its space comes
back, `latest` stays on the last complete one, and a full disk raises UserError with the fix.
"""
import errno
import json
import os
import random
import re
import shutil
import traceback
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

from engine import dist
from engine.errors import UserError
from engine.files import write_atomic
from engine.plan.disk import KEEP_LAST, free_bytes, show_bytes
from engine.train import reshard

MANIFEST = "manifest.json"
TAG = re.compile(r"step\d{8}")


@dataclass(frozen=True)
class Restored:
    step: int
    rank_state: dict
    tag: str
    eval_pending: bool  # the run stopped during this step's evaluation: run it first


def _tag(step: int) -> str:
    return f"step{step:08d}"


def _barrier() -> None:
    if dist.world_size() > 1:
        torch_dist.barrier()


def rng_state() -> dict:
    # CUDA: this rank's own device only. Every visible device's state would not restore on a
    # node that sees fewer GPUs, and a rank would take another device's stream after a restart
    # on another layout.
    device = dist.local_device()
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    device, cuda = dist.local_device(), state["cuda"]
    if isinstance(cuda, (list, tuple)):  # saved before 2026-12-02: one state per visible device
        cuda = cuda[device.index] if device.type == "cuda" and device.index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


def save(engine, checkpoint_dir: Path, step: int, rank_state: dict, *,
         eval_pending: bool = False, before_complete=None, expected_bytes: int = 0) -> list[str]:
    """Every rank calls this (DeepSpeed shards optimizer states across ranks). `rank_state` is
    what this rank alone knows (data position, e.g. a per-rank queue), restored by load().
    `before_complete`, if given, runs on every rank after its files are written and before the
    checkpoint is declared complete (fault drills kill a rank there). `expected_bytes`: the
    plan's estimate of the checkpoint, named when a full disk stops the save.

    A file that cannot be written (a full disk) fails the save on every rank together: the
    partial checkpoint is removed, `latest` keeps naming the last complete one, and a full
    disk raises UserError with what to change.

    Returns the files (paths under `checkpoint_dir`) this rank copies when the run lives in an
    object store (each file by one rank)."""
    tag = _tag(step)
    failure = None
    try:
        (checkpoint_dir / tag).mkdir(parents=True, exist_ok=True)  # on every node's own disk too
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, save_latest=False,
                               client_state={"step": step, "eval_pending": eval_pending,
                                             **reshard.optimizer_param_names(engine)})
    except (OSError, RuntimeError) as error:
        if not _write_failed(error):
            raise
        failure = _release(error)
        # DeepSpeed's save meets the other ranks before its first write and once more after its
        # last (a barrier), with no collective in between: a rank whose write raised skipped
        # only that last barrier, and takes it here, so the ranks stay at the same collective.
        _barrier()
    if failure is None:
        own = {"rng": rng_state(), "state": rank_state}
        try:
            write_atomic(checkpoint_dir / tag / f"rank{dist.rank()}.pt", lambda p: torch.save(own, p))
        except (OSError, RuntimeError) as error:
            if not _write_failed(error):
                raise
            failure = _release(error)
    if before_complete is not None:
        before_complete()
    _end_together(checkpoint_dir, tag, failure, expected_bytes)
    folder = checkpoint_dir / tag
    # The files each rank sees: on nodes without a shared disk each node holds its own ranks'
    # files only, and the manifest is their union.
    seen = dist.gather_to_all(_files(folder))
    files = {name: size for own in seen for name, size in own.items()}
    if dist.rank() == 0:
        try:
            write_atomic(folder / MANIFEST, json.dumps({"files": dict(sorted(files.items()))}, indent=1))
            write_atomic(checkpoint_dir / "latest", tag)
        except OSError as error:
            failure = error
    _end_together(checkpoint_dir, tag, failure, expected_bytes)
    if dist.local_rank() == 0:  # each node's own disk (one node's is everyone's when shared)
        _prune(checkpoint_dir, keep=tag)
    return uploads(sorted(files), seen, tag, dist.rank())


def _files(folder: Path) -> dict[str, int]:
    """The checkpoint's files in `folder` on this rank's disk, with their sizes."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST and ".tmp" not in p.name}


def uploads(names: list[str], seen: list[dict[str, int]], tag: str, rank: int) -> list[str]:
    """The files `rank` copies to the store (engine/train/run_store.py), `seen` being the files
    each rank sees: each file once, by one of the ranks that see it, spread over them; the
    manifest last, by rank 0."""
    mine = []
    for i, name in enumerate(names):
        seers = [r for r, own in enumerate(seen) if name in own]
        if seers[i % len(seers)] == rank:
            mine.append(f"{tag}/{name}")
    return mine + ([f"{tag}/{MANIFEST}"] if rank == 0 else [])


# What torch's zip writer raises when a write fails: a RuntimeError without the errno.
_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "PytorchStreamWriter", "iostream error")


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _release(error: BaseException) -> BaseException:
    """`error` without the locals of its frames: they hold the failed writer's open file, which
    keeps the partial file's space taken, even once removed, until the process ends."""
    for e in _chain(error):
        traceback.clear_frames(e.__traceback__)
    return error


def _write_failed(error: BaseException) -> bool:
    """Whether `error` is a file that could not be written, not some other failure (a lost
    peer's collective, a CUDA error), which must not be taken for one."""
    return any(isinstance(e, OSError) or any(p in str(e) for p in _TORCH_WRITE_FAILED) for e in _chain(error))


def _disk_full(error: BaseException, folder: Path, expected_bytes: int) -> bool:
    """A write failed for want of space: ENOSPC or EDQUOT in the exception's chain, or torch's
    errno-less RuntimeError while the file system has less room left than the checkpoint
    (read before the partial files are removed). A quota hidden behind torch's error is not
    seen (statvfs does not show quotas): that one stays a plain write failure."""
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _chain(error)):
        return True
    from_torch = any(p in str(e) for e in _chain(error) for p in _TORCH_WRITE_FAILED)
    return from_torch and free_bytes(folder) < max(expected_bytes, 1)


# Outcomes of a save on one rank, agreed as the maximum over the ranks.
_SAVED, _FAILED, _DISK_FULL = 0, 1, 2


def _end_together(checkpoint_dir: Path, tag: str, failure: BaseException | None, expected_bytes: int) -> None:
    """Where the ranks meet after writing: every rank learns whether any rank's write failed and
    then raises together, rank 0 having removed the partial checkpoint so its space comes back."""
    outcome = _SAVED if failure is None else (
        _DISK_FULL if _disk_full(failure, checkpoint_dir, expected_bytes) else _FAILED)
    if dist.world_size() > 1:
        # On the rank's device: NCCL, the default group on GPUs, takes no CPU tensor.
        flag = torch.tensor([outcome], dtype=torch.int32, device=dist.local_device())
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
        outcome = int(flag.item())
    if outcome == _SAVED:
        return
    previous = _complete_before(checkpoint_dir, tag)
    size = _size(checkpoint_dir / previous[-1]) if previous else expected_bytes
    if dist.rank() == 0 and latest_tag(checkpoint_dir) != tag:  # never a complete one
        shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)
    if outcome == _DISK_FULL:
        latest = latest_tag(checkpoint_dir)
        kept = (f"Nothing is lost: the last complete checkpoint, of step {int(latest[4:])}, is kept in "
                f"{checkpoint_dir}" if latest else "This run has no complete checkpoint yet")
        raise UserError(
            f"no space left for the checkpoint of step {int(tag[4:])} (about {show_bytes(size)}) under "
            f"{checkpoint_dir}: its file system has {show_bytes(free_bytes(checkpoint_dir))} free once the "
            f"partial checkpoint is removed, and a run needs room for {KEEP_LAST + 1} checkpoints at once "
            f"(the last {KEEP_LAST} and the one being written). {kept}. Free space there, or move the run "
            "directory to a larger disk and give that as --out, then run the same command again: it "
            + ("resumes from the last complete checkpoint." if latest else "starts from the first step."))
    if failure is not None:
        raise failure
    raise RuntimeError(f"another rank could not write its part of checkpoint {checkpoint_dir / tag} "
                       "(its error is above); the last complete checkpoint is kept")


def _size(folder: Path) -> int:
    """A complete checkpoint's bytes, as its manifest lists them."""
    try:
        return sum(json.loads((folder / MANIFEST).read_text())["files"].values())
    except (OSError, ValueError, KeyError):
        return 0


def _prune(checkpoint_dir: Path, keep: str) -> None:
    complete = [t for t in _tags(checkpoint_dir) if t <= keep]
    for old in complete[:-KEEP_LAST]:
        shutil.rmtree(checkpoint_dir / old, ignore_errors=True)


def _tags(checkpoint_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpoint_dir.glob("step*") if p.is_dir() and TAG.fullmatch(p.name))


def latest_tag(checkpoint_dir: Path) -> str | None:
    pointer = checkpoint_dir / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def restore_order(checkpoint_dir: Path) -> list[str]:
    """Tags to try, newest first: `latest`, then older ones that were completed (manifest)."""
    latest = latest_tag(checkpoint_dir)
    if latest is None:
        return []
    return [latest, *reversed(_complete_before(checkpoint_dir, latest))]


def _complete_before(checkpoint_dir: Path, tag: str) -> list[str]:
    """Tags older than `tag` whose save completed (they have a manifest), oldest first."""
    return [t for t in _tags(checkpoint_dir) if t < tag and (checkpoint_dir / t / MANIFEST).exists()]


def damage(folder: Path, share: int, shares: int) -> str | None:
    """What is wrong with the checkpoint in `folder`, or None. Every caller checks that each
    listed file exists with its size; caller `share` of `shares` also reads its share of the
    zip archives end to end (their CRCs), so that together the ranks read each file once."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        # Written before manifests existed (or `latest` edited by hand): trust `latest`.
        return None if folder.is_dir() else f"{folder} is missing"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError) as error:
        return f"{manifest_path} is unreadable ({error})"
    for i, (name, size) in enumerate(sorted(files.items())):
        path = folder / name
        try:
            actual = path.stat().st_size
        except OSError:
            return f"{path} is missing"
        if actual != size:
            return f"{path} has {actual:,} bytes, {size:,} when written"
        if i % shares == share and zipfile.is_zipfile(path):
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except (OSError, zipfile.BadZipFile) as error:
                return f"{path} is unreadable ({error})"
            if bad is not None:
                return f"{path} is corrupt (entry {bad} fails its CRC)"
    return None


def _agree_intact(problem: str | None) -> str | None:
    """A checkpoint one rank finds damaged is damaged for all: every rank gets a problem (its
    own words, or a pointer to the rank that saw it) or None together."""
    if dist.world_size() == 1:
        return problem
    # On the rank's device: NCCL, the default group on GPUs, takes no CPU tensor.
    flag = torch.tensor([0 if problem is None else 1], dtype=torch.int32, device=dist.local_device())
    torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
    return problem or ("another rank found this checkpoint damaged" if flag.item() else None)


def load(engine, checkpoint_dir: Path) -> Restored | None:
    """Restore the newest intact checkpoint; None when there is none (a fresh run)."""
    candidates = restore_order(checkpoint_dir)
    for tag in candidates:
        problem = _agree_intact(damage(checkpoint_dir / tag, dist.rank(), dist.world_size()))
        if problem is not None:
            if dist.rank() == 0:
                print(f"warning: checkpoint {checkpoint_dir / tag} is damaged ({problem}); "
                      "setting it aside and resuming from the one before it", flush=True)
                _set_aside(checkpoint_dir, tag)
            _barrier()
            continue
        folder = checkpoint_dir / tag
        saved_ranks = len(list(folder.glob("rank*.pt")))
        stage = engine.zero_optimization_stage()
        # Another precision too: DeepSpeed's loader looks for its own precision's files (bf16_
        # prefixed or not) and, without ZeRO, for its own optimizer wrapper's state.
        same_precision = reshard.saved_weight_dtype(folder) == reshard.weight_dtype(engine)
        same_layout = (saved_ranks == dist.world_size() and reshard.has_zero_shards(folder) == (stage > 0)
                       and reshard.is_stage3(folder) == (stage == 3))
        if not (same_layout and same_precision):
            return _load_resharded(engine, checkpoint_dir, tag, saved_ranks, same_precision)
        _, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
        own = torch.load(folder / f"rank{dist.rank()}.pt", weights_only=False)
        set_rng_state(own["rng"])
        return Restored(client_state["step"], own["state"], tag,
                        bool(client_state.get("eval_pending", False)))
    if candidates:
        raise RuntimeError(f"no intact checkpoint in {checkpoint_dir} (tried {', '.join(candidates)}): "
                           "start a new run with another --out, or restore the files")
    return None


def _set_aside(checkpoint_dir: Path, tag: str) -> None:
    """Rename a damaged checkpoint out of the way (kept for inspection; a later save of the
    same step must not mix with its files) and point `latest` at the previous complete one."""
    damaged = checkpoint_dir / f"{tag}.damaged"
    shutil.rmtree(damaged, ignore_errors=True)
    if (checkpoint_dir / tag).exists():
        os.replace(checkpoint_dir / tag, damaged)
    previous = _complete_before(checkpoint_dir, tag)
    if previous:  # else `latest` keeps naming the damaged tag: every later resume says so
        write_atomic(checkpoint_dir / "latest", previous[-1])


def _load_resharded(engine, checkpoint_dir: Path, tag: str, saved_ranks: int, same_precision: bool) -> Restored:
    """A checkpoint of another number of ranks (or another ZeRO partitioning, or precision): the
    engine's states are resharded (engine/train/reshard.py); the per-rank files must agree on
    what is not per rank (the data position is the same on every rank by construction)."""
    folder = checkpoint_dir / tag
    owns = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(saved_ranks)]
    states = [own["state"] for own in owns]
    same_ranks = saved_ranks == dist.world_size()  # another ZeRO layout only: each rank keeps its own
    for key in [] if same_ranks else states[0]:
        if any(not _same(states[0][key], other[key]) for other in states[1:]):
            raise UserError(f"{folder}: the ranks kept different '{key}' state (e.g. DeCLIP's "
                            f"--enqueue rank keeps one queue per rank), which cannot move to "
                            f"another number of ranks: resume on {saved_ranks} rank(s)")
    saved = f"{saved_ranks} rank(s) {_layout(folder)} in {_precision(reshard.saved_weight_dtype(folder))}"
    if dist.rank() == 0:
        print(f"resharding {folder}: written by {saved}, resumed on {dist.world_size()} "
              f"{_layout(engine.zero_optimization_stage())} in {_precision(reshard.weight_dtype(engine))}",
              flush=True)
    if reshard.has_zero_shards(folder) or engine.zero_optimization_stage() > 0 or not same_precision:
        if engine.zero_use_cpu_optimizer():
            raise UserError(f"{folder} was written by {saved}; resharding into an optimizer offloaded "
                            "to the CPU is not supported: resume it on that layout, or without --offload")
        full = reshard.read_full_state(folder)
        reshard.apply_full_state(engine, full)
        client_state = full["client_state"]
    else:  # no ZeRO on either side: DeepSpeed's files hold whole states
        _, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    # RNG streams are per rank: a rank that existed keeps its own; a new one starts from a
    # stream derived from rank 0's and its rank, the same on every rerun.
    if dist.rank() < saved_ranks:
        set_rng_state(owns[dist.rank()]["rng"])
    else:
        derived = int(torch.randint(2**62, (1,), generator=torch.Generator().set_state(
            owns[0]["rng"]["torch"])).item()) + dist.rank()
        random.seed(derived)
        np.random.seed(derived % 2**32)
        torch.manual_seed(derived)
    return Restored(client_state["step"], states[dist.rank() if same_ranks else 0], tag,
                    bool(client_state.get("eval_pending", False)))


def _layout(where) -> str:
    """How a checkpoint folder, or an engine's ZeRO stage, partitions the states."""
    if isinstance(where, Path):  # the files tell ZeRO-3 apart, not stage 1 from 2
        where = "3" if reshard.is_stage3(where) else "1/2" if reshard.has_zero_shards(where) else 0
    return "without ZeRO" if where == 0 else f"at ZeRO-{where}"


def _precision(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b
