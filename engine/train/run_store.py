"""A run that lives in an object store (`--out s3://bucket/prefix`): written on each node's own
disk (the plan's `staging_dir`), copied to the store in the background, read back from it by a
resume on machines that never saw the run.

In the store, under the URL, the run has the layout of a local run directory:
  plan.json, ds_config.json, metrics.jsonl, tensorboard/, visuals/, ...   copied by rank 0
  checkpoints/stepNNNNNNNN/<files> + manifest.json                       each file by one rank

Objects appear whole or not at all, so a checkpoint in the store is complete when its
manifest and every file the manifest lists are there. Rank 0 uploads the manifest after its own
files; the other ranks' may still be on their way, or lost with a killed node. A resume takes
the newest complete checkpoint, downloads it on every node and checks it as a local one is
checked (sizes and the zip archives' CRCs, engine/train/checkpoint.damage); a damaged one is
reported and the one before it is taken, as locally. Nothing in the store is renamed: a
damaged checkpoint stays until a newer one replaces it or pruning removes it.

Only one upload runs at a time: a checkpoint waits for the previous one's upload first. A run
that ends, stops or is requeued waits for its last upload and says how long it took.
"""
import json
import os
import shutil
import socket
import threading
import time

import torch
import torch.distributed as torch_dist

from engine import dist
from engine.errors import UserError
from engine.files import write_atomic
from engine.observe.hooks import LoopHook
from engine.observe.metrics import MetricsWriter
from engine.plan.disk import KEEP_LAST, show_bytes
from engine.store import ObjectStore
from engine.train.checkpoint import MANIFEST, TAG, damage

CHECKPOINTS = "checkpoints"
# What a resumed run reads back of its own files: the plan it must match, the log it appends to,
# the W&B run it continues. Events, pictures and evaluations are only ever added to.
RESUMED_FILES = ("plan.json", "ds_config.json", "metrics.jsonl", "wandb_run_id")


def pull_run_files(store: ObjectStore) -> None:
    """Each node's first rank, before the resume check: the store's copies of the run's files
    replace the staging folder's (the store is the run; a staging folder may be left from an
    older one)."""
    for name in RESUMED_FILES:
        try:
            store.get(name)
        except FileNotFoundError:
            (store.local_root / name).unlink(missing_ok=True)


def complete_checkpoints(store: ObjectStore) -> list[tuple[str, dict[str, int]]]:
    """(tag, files of its manifest), newest first, of the checkpoints whose every file is in the store."""
    keys = set(store.keys(f"{CHECKPOINTS}/"))
    tags = sorted({k.split("/")[1] for k in keys if k.count("/") >= 2 and TAG.fullmatch(k.split("/")[1])},
                  reverse=True)
    found = []
    for tag in tags:
        if f"{CHECKPOINTS}/{tag}/{MANIFEST}" not in keys:
            continue
        files = _manifest(store, tag)
        if files is not None and all(f"{CHECKPOINTS}/{tag}/{name}" in keys for name in files):
            found.append((tag, files))
    return found


def _manifest(store: ObjectStore, tag: str) -> dict[str, int] | None:
    target = store.local_root / ".manifests" / f"{tag}.json"
    try:
        store.get(f"{CHECKPOINTS}/{tag}/{MANIFEST}", target)
        files = json.loads(target.read_text())["files"]
        return files if isinstance(files, dict) else None  # None: being replaced (StoreUpload)
    except (FileNotFoundError, ValueError, KeyError):
        return None
    finally:
        target.unlink(missing_ok=True)


def push_unfinished_checkpoint(store: ObjectStore) -> None:
    """On each node's first rank, before a resume chooses: a checkpoint complete on this disk
    but not in the store (its copy was cut short: the store failed, the job was killed while
    copying) is copied now, so that it is not lost. Only where this node holds all its files
    (one node, or a shared staging disk)."""
    if not _same_run(store):
        return
    local = store.local_root / CHECKPOINTS
    tags = sorted((p.name for p in local.glob("step*") if p.is_dir() and TAG.fullmatch(p.name)), reverse=True)
    newest = next((t for t in tags if (local / t / MANIFEST).exists() and damage(local / t, 0, 1) is None), None)
    in_store = [tag for tag, _ in complete_checkpoints(store)]
    if newest is None or (in_store and in_store[0] >= newest):
        return
    print(f"checkpoint {newest} is complete in {local} but not in {store.url}: copying it there first", flush=True)
    files = json.loads((local / newest / MANIFEST).read_text())["files"]
    for name in files:
        store.put(f"{CHECKPOINTS}/{newest}/{name}")
    store.put(f"{CHECKPOINTS}/{newest}/{MANIFEST}")
    for name in RESUMED_FILES:  # this disk's log reaches that checkpoint; the store's may not
        if (store.local_root / name).is_file():
            store.put(name)


def _same_run(store: ObjectStore) -> bool:
    """Whether the staging folder holds the store's run (its plan.json is the store's), not an
    older run of the same URL whose store folder was emptied."""
    local = store.local_root / "plan.json"
    if not local.is_file():
        return False
    try:
        stored = store.get("plan.json", store.local_root / ".manifests" / "plan.json")
    except FileNotFoundError:
        return False
    same = stored.read_bytes() == local.read_bytes()
    stored.unlink()
    return same


def pull_checkpoint(store: ObjectStore) -> str | None:
    """On each node's first rank: the newest checkpoint that is complete in the store and intact
    once downloaded, as the staging folder's only checkpoint and its `latest`; None when the
    store has none. Files already staged with their listed size are not downloaded again."""
    local = store.local_root / CHECKPOINTS
    chosen = None
    for tag, files in complete_checkpoints(store):
        problem, reused = _fetch(store, tag, files)
        if problem is not None and reused:  # a stale staged file, perhaps: once more, all from the store
            shutil.rmtree(local / tag)
            problem, _ = _fetch(store, tag, files)
        if problem is None:
            chosen = tag
            break
        print(f"warning: checkpoint {store.url}/{CHECKPOINTS}/{tag} is damaged in the store ({problem}); "
              "resuming from the one before it", flush=True)
    if local.is_dir():
        for old in local.iterdir():
            if old.name != chosen:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    if chosen is not None:
        write_atomic(local / "latest", chosen)
    return chosen


def _fetch(store: ObjectStore, tag: str, files: dict[str, int]) -> tuple[str | None, bool]:
    """Download checkpoint `tag` into the staging folder: what is wrong with it (or None), and
    whether a file already staged with its listed size was kept rather than downloaded."""
    folder = store.local_root / CHECKPOINTS / tag
    reused = False
    try:
        for name, size in files.items():
            path = folder / name
            if path.is_file() and path.stat().st_size == size:
                reused = True
            else:
                store.get(f"{CHECKPOINTS}/{tag}/{name}", path)
        store.get(f"{CHECKPOINTS}/{tag}/{MANIFEST}", folder / MANIFEST)
    except FileNotFoundError as missing:  # removed between the listing and now
        return str(missing), reused
    return damage(folder, 0, 1), reused


def agree_on_checkpoint(tag: str | None) -> None:
    """Every node must resume from the same checkpoint: the node leaders' choices, compared."""
    leaders = [(rank, host, t) for rank, (t, leader, host) in
               enumerate(dist.gather_to_all((tag, dist.local_rank() == 0, socket.gethostname()))) if leader]
    if len({t for _, _, t in leaders}) > 1:
        found = ", ".join(f"rank {rank} on {host}: {t or 'none'}" for rank, host, t in leaders)
        raise RuntimeError(f"the nodes found different newest intact checkpoints in the store ({found}): a "
                           "download failed or was damaged on some node; run the same command again")


def _lower_priority() -> None:
    """The copying thread (and the client's transfer threads it starts, which inherit it) yields
    the CPU to training: on a machine whose cores the step keeps busy, the copy takes longer
    rather than the steps. Linux sets a niceness per thread; elsewhere nothing changes."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class StoreUpload(LoopHook):
    """Each checkpoint's files copied to the store in a background thread, each by one rank; on
    rank 0 also the run's other files (metrics, events, pictures), then old checkpoints removed
    from the store beyond the last KEEP_LAST complete ones (where the store's client can delete)."""

    def __init__(self, store: ObjectStore, writer: MetricsWriter | None):
        self.store = store
        self.writer = writer            # rank 0's, flushed before its files are copied
        self.is_main = dist.rank() == 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._step = 0
        self._started = 0.0
        self._seconds = 0.0
        self._bytes = 0
        self._synced: dict[str, tuple[int, int]] = {}
        self._finished = False
        self._finished_copies: list[float] = []  # seconds, since the last log line
        self._told_no_delete = False

    def checkpointed(self, step: int, files: list[str]) -> None:
        waited = time.perf_counter()
        failed = self._wait()
        waited = time.perf_counter() - waited
        if waited > 1 and self.is_main:
            print(f"step {step}: waited {waited:.1f} s for the copy of the checkpoint of step {self._step} to "
                  f"{self.store.url} (it took {self._seconds:.1f} s): checkpoints come faster than the store takes "
                  "them; a larger --checkpoint-every keeps training from waiting", flush=True)
        if self.is_main and not failed and not self._invalidate(files[-1]):
            failed, self._step = True, step
        # Every rank is here together: they agree whether any upload failed and stop together.
        if dist.world_size() > 1:
            flag = torch.tensor([1 if failed else 0], dtype=torch.int32, device=dist.local_device())
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
            if flag.item() and not failed:
                raise UserError(f"another rank could not copy its part of the checkpoint of step {self._step} "
                                f"to {self.store.url} (its error is above)")
        if failed:
            raise UserError(f"the checkpoint of step {self._step} did not reach {self.store.url}: {self._error}")
        if self.writer is not None:
            self.writer.flush()
        self._step, self._started, self._error = step, time.perf_counter(), None
        self._thread = threading.Thread(target=self._upload, args=(files,), name="checkpoint-upload", daemon=True)
        self._thread.start()

    def _invalidate(self, manifest: str) -> bool:
        """Rank 0, before any rank copies: a checkpoint of this step already in the store (a
        resume that went back past a damaged one, and trains that step again) loses its
        manifest's list first, so that a copy cut short never mixes its files with the old ones.
        Overwritten rather than deleted: every store's client can write."""
        try:
            if f"{CHECKPOINTS}/{manifest}" in self.store.keys(f"{CHECKPOINTS}/{manifest.split('/')[0]}/"):
                self.store.put_text(f"{CHECKPOINTS}/{manifest}", json.dumps({"files": None}))
        except Exception as error:  # reported as a failed upload: the ranks stop together
            self._error = error
            return False
        return True

    def scalars(self, step: int) -> dict[str, float]:
        """On the log line: whether this rank's copy of a checkpoint was still going on at this
        step (the steps it overlaps), and how long a copy that finished since the last line took."""
        values = {"perf/upload_in_flight": float(self._thread is not None and self._thread.is_alive())}
        if self._finished_copies:
            values["time/upload_s"] = self._finished_copies[-1]
            self._finished_copies.clear()
        return values

    def _upload(self, files: list[str]) -> None:
        _lower_priority()
        try:
            self._bytes = 0
            for name in files:  # the manifest last (rank 0)
                self._bytes += (self.store.local_root / CHECKPOINTS / name).stat().st_size
                self.store.put(f"{CHECKPOINTS}/{name}")
            self._seconds = time.perf_counter() - self._started
            self._finished_copies.append(self._seconds)
            if self.is_main:
                self.sync_run_files()
                self._prune()
        except BaseException as error:  # reported by the main thread (_wait)
            self._error = error

    def sync_run_files(self) -> None:
        """Rank 0: the run's files outside the checkpoints that changed since the last copy."""
        root = self.store.local_root
        for path in sorted(root.rglob("*")):
            name = path.relative_to(root).as_posix()
            if not path.is_file() or name.startswith((f"{CHECKPOINTS}/", ".")) or ".tmp" in path.name \
                    or ".download" in path.name:
                continue
            stamp = (path.stat().st_size, path.stat().st_mtime_ns)
            if self._synced.get(name) != stamp:
                self.store.put(name)
                self._synced[name] = stamp

    def _prune(self) -> None:
        complete = [tag for tag, _ in complete_checkpoints(self.store)]
        if len(complete) < KEEP_LAST:
            return
        oldest_kept = complete[KEEP_LAST - 1]
        old = [k for k in self.store.keys(f"{CHECKPOINTS}/") if k.split("/")[1] < oldest_kept]
        if not old:
            return
        if not self.store.can_delete:
            if not self._told_no_delete:
                print(f"note: checkpoints before {oldest_kept} stay in {self.store.url}: this store's client "
                      "cannot delete; remove them by hand when the run is done", flush=True)
                self._told_no_delete = True
            return
        self.store.delete(old)

    def _wait(self) -> bool:
        """Wait for the upload in flight; whether it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self._error is not None

    def finish(self) -> None:
        """Every rank, once the loop has ended (done, stopped or requeued): the last checkpoint
        and the run's files in the store before the process exits. Rank 0 says how long the last
        checkpoint took to get there (the slowest rank's copy)."""
        self._finished = True
        failed = self._wait()
        seconds = torch.tensor([self._seconds, 1.0 if failed else 0.0], dtype=torch.float64,
                               device=dist.local_device())
        if dist.world_size() > 1:
            torch_dist.all_reduce(seconds, op=torch_dist.ReduceOp.MAX)
        if failed:
            raise UserError(f"the checkpoint of step {self._step} did not reach {self.store.url}: {self._error}. "
                            f"It is complete in the staging folder {self.store.local_root}: copy it there by hand, "
                            "or fix the store and run the same command again on this machine")
        if seconds[1].item():
            raise UserError(f"another rank could not copy its part of the checkpoint of step {self._step} to "
                            f"{self.store.url} (its error is above)")
        if self.is_main:
            self.sync_run_files()
            if self._step:
                print(f"checkpoint of step {self._step} reached {self.store.url} {seconds[0].item():.1f} s after it "
                      f"was written (rank 0's part: {show_bytes(self._bytes)}, copied while training went on)",
                      flush=True)

    def closing(self) -> None:
        """However the loop ended, an upload in flight is finished: a complete checkpoint is not
        left half copied when an error ends the run. finish() reports on the normal paths."""
        if not self._finished:
            self._wait()
