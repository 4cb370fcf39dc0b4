"""The DataLoader's worker processes: forked cheaply, never outliving the rank that forked them.

A rank forks its data workers every epoch (they learn the epoch at start). Three things about
them matter at scale: a fork must not hand the child the parent's uncollected DALI pipelines
(start_workers), a worker must die with its rank whatever kills the rank, and keep serving
while its rank handles a stop signal (worker_dies_with_its_rank), and a rank that exits on an
error must not wait forever for its workers (_kill_leftover_workers). An epoch's workers are
stopped when it ends, however it ends (stop_workers).
"""
import atexit
import ctypes
import gc
import logging
import multiprocessing
import os
import signal
import tempfile

from torch.utils.data import DataLoader
from torch.utils.data._utils import signal_handling

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # prctl option: a signal the kernel sends this process when its parent dies


# multiprocessing's Unix socket for passing a worker's batch to its rank is
# TMPDIR/pymp-<8 random characters>/listener-<8 random characters>: 32 characters beyond
# TMPDIR, and a socket path holds at most 107 bytes (sun_path, with its terminating NUL).
SOCKET_PATH_MAX, SOCKET_NAME_BEYOND_TMPDIR = 107, 32


def temp_dir_problem(workers: int) -> str | None:
    """Why DataLoader workers could not hand their batches to the rank from this TMPDIR (a path
    too long for a Unix socket: the workers would fail and the run stall), or None."""
    temp = tempfile.gettempdir()
    if workers == 0 or len(temp.encode()) + SOCKET_NAME_BEYOND_TMPDIR <= SOCKET_PATH_MAX:
        return None
    return (f"TMPDIR {temp} is {len(temp.encode())} characters long: the data workers pass their batches "
            f"through Unix sockets made under it, whose paths may hold {SOCKET_PATH_MAX} bytes, so TMPDIR may "
            f"have at most {SOCKET_PATH_MAX - SOCKET_NAME_BEYOND_TMPDIR}. Set TMPDIR to a shorter folder "
            "(e.g. export TMPDIR=/tmp).")


def worker_dies_with_its_rank(rank_pid: int, _worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn` (bind `rank_pid=os.getpid()` in the rank): a data worker
    must never outlive the rank that forked it.

    A rank killed with SIGKILL cannot stop its workers; left alone they stay blocked forever as
    orphans, each holding its memory and every socket inherited through fork, rank 0's
    rendezvous port included, so the next run on that port fails. PR_SET_PDEATHSIG makes the
    kernel kill the worker when the rank dies. Stop signals are the rank's business: a worker
    ignores them (SLURM signals every process of a step), so it keeps serving batches while
    the rank writes its stop checkpoint, and dies with it.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this data worker may outlive "
                       "a killed rank", ctypes.get_errno())
    for signum in (signal.SIGUSR1, signal.SIGTERM):  # engine/train/stop_signals.py's signals
        signal.signal(signum, signal.SIG_IGN)
    if os.getppid() != rank_pid:  # the rank died before prctl took effect
        os._exit(1)


def _kill_leftover_workers() -> None:
    """At exit, before multiprocessing's own exit handler (registered earlier, so run later):
    that one SIGTERMs daemonic children and joins them, but data workers ignore SIGTERM (see
    worker_dies_with_its_rank) and wait for work forever. They are only left when the rank
    exits on an error (a collective timed out, a peer died) with its DataLoader still open;
    on a normal end they have stopped already."""
    # The DataLoader's SIGCHLD handler raises when a worker dies by a signal: not now.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    leftover = [child for child in multiprocessing.active_children() if child.daemon]
    for child in leftover:
        child.kill()
    for child in leftover:
        child.join(timeout=5)


atexit.register(_kill_leftover_workers)


def start_workers(loader: DataLoader):
    """Fork the workers with every existing object frozen out of their garbage collector.

    A forked worker inherits the parent's objects, uncollected garbage included. Were it to
    collect a dead DALI pipeline, the finalizer would join threads that exist only in the
    parent and crash the worker (a segfault). Frozen objects are never collected in the child;
    in the parent, unfreezing hands them back to the collector. No gc.collect() first: a full
    collection of a training process took ~0.5 s at every epoch boundary (CLIP, 117 steps on
    150 pairs, one batch per epoch, 2 CPU cores: 157 s with it, 94 s without).
    """
    if loader.num_workers == 0:
        return iter(loader)
    gc.freeze()
    try:
        return iter(loader)  # forks every worker before returning
    finally:
        gc.unfreeze()


def stop_workers(batches, killed: bool = False) -> None:
    """Stop a DataLoader iterator's workers now (a no-op without workers, or if already stopped).

    Dropping the last reference stops them, but an error raised through the DataLoader keeps one
    in its traceback for as long as the error lives; the workers were then stopped only when the
    garbage collector reached the iterator.

    `killed`: the epoch ends on an error, which ends the run. A worker may then be stuck (in a
    stalled read), and torch's shutdown waits 5 s for it, sends a SIGTERM it ignores (see
    worker_dies_with_its_rank) and waits 5 s more: such workers are killed first, once torch no
    longer watches them (its SIGCHLD handler would raise for a worker killed by a signal). Not
    on a normal end: a worker killed while it updates streaming's shared state could leave a
    shard marked as being prepared for the next epoch's workers."""
    # torch internals: if a release renames them, this falls back to torch's slow shutdown.
    unwatch = getattr(signal_handling, "_remove_worker_pids", None)
    if killed and unwatch is not None and getattr(batches, "_worker_pids_set", False):
        unwatch(id(batches))
        batches._worker_pids_set = False
        for worker in batches._workers:
            if worker.is_alive():
                worker.kill()
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
