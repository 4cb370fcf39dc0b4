"""What a run does when it is told to stop, and when its own processes must not outlive it.

Stop signals. SLURM's warning before a time limit (`#SBATCH --signal=USR1@N`), a preemption
and `scancel` (SIGTERM) only set a flag here: a handler that checkpoints would run at an
arbitrary point of one rank, possibly inside a collective the other ranks never reach. The
ranks agree on the flags with one small all-reduce at each step boundary and between
evaluation batches (the same points on every rank), then write one checkpoint together and
exit. After SIGUSR1, rank 0 first asks SLURM to requeue the job (`requeue()`). After SIGTERM
it does not: `scancel` sends SIGTERM too, and a task that requeues its job then undoes the
user's cancel (seen on SLURM 22.05); a preempted job is requeued by SLURM itself when its
partition's PreemptMode says so. A second SIGTERM ends the process at once.

The flags' all-reduce runs on a gloo group: on a GPU it then needs no device sync.
"""
import os
import signal
import subprocess
from datetime import timedelta
from multiprocessing import resource_tracker

import torch
import torch.distributed as torch_dist

from engine import dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # data workers ignore them (data/workers.py)
EXIT_STOPPED = 3  # stopped early with a checkpoint and not requeued: run the same command again


class StopSignals:
    """Catches the stop signals of this rank; `agreed()` tells every rank whether any got one,
    and leaves in `agreed_names` which ones the ranks got between them."""

    def __init__(self, timeout_s: float):
        self.received: set[str] = set()
        self.agreed_names: set[str] = set()
        self._group = None
        if dist.world_size() > 1 and torch_dist.get_backend() != "gloo":
            # Created by every rank at the same point (here), as new_group requires.
            self._group = torch_dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        _start_resource_tracker_deaf_to(STOP_SIGNALS)
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM and name in self.received:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        self.received.add(name)

    def agreed(self) -> bool:
        """True on every rank once any rank has received a stop signal. A collective: every
        rank calls it at the same points of the run."""
        flags = torch.tensor([s.name in self.received for s in STOP_SIGNALS], dtype=torch.int32)
        if dist.world_size() > 1:
            torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX, group=self._group)
        self.agreed_names = {s.name for s, flag in zip(STOP_SIGNALS, flags.tolist()) if flag}
        return bool(self.agreed_names)

    @property
    def wants_requeue(self) -> bool:
        """The time-limit warning alone: a SIGTERM (a cancel, a preemption) never requeues."""
        return self.agreed_names == {"SIGUSR1"}

    def ignore_further(self) -> None:
        """After the stop checkpoint: a requeue makes SLURM send SIGTERM again, and the ranks
        must still finish exiting together."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        self._previous = {}  # ignored until the process exits

    def close(self) -> None:
        """Give the signals back their previous handlers (unless ignoring them for good)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _start_resource_tracker_deaf_to(signals) -> None:
    """Start multiprocessing's resource tracker (streaming's shared memory registers with it)
    now, with `signals` ignored, which it inherits through exec. SLURM signals every process
    of a job step: a tracker killed by SIGUSR1 (it ignores only SIGINT and SIGTERM itself) is
    relaunched, then fails on every unregistration it never saw, and leaks what it tracked."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signals}
    try:
        resource_tracker.ensure_running()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def requeue(job_id: str | None, restarts: int, max_requeues: int, stop: StopSignals) -> tuple[bool, str]:
    """On rank 0, after the stop checkpoint: ask SLURM to put this job back in the queue when
    the stop was its time-limit warning. Returns (requeued, a line for the log that says what
    happens next)."""
    if job_id is None:
        return False, "not a SLURM job: run the same command again to continue from this checkpoint"
    if not stop.wants_requeue:
        return False, ("SIGTERM (scancel, a preemption or the time limit) does not requeue: SLURM "
                       "requeues a preempted job itself where the partition says so; else submit "
                       "the same command again (same --out) to continue")
    if restarts >= max_requeues:
        return False, (f"SLURM job {job_id} was requeued {restarts} time(s), the --max-requeues cap: "
                       "not requeued; submit the same command again (same --out) to continue")
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, f"scontrol requeue {job_id} failed ({error}): submit the same command again to continue"
    if result.returncode != 0:
        return False, (f"scontrol requeue {job_id} failed: {result.stderr.strip() or result.returncode}; "
                       "submit the same command again (same --out) to continue")
    return True, f"requeued SLURM job {job_id}: it resumes from this checkpoint when it starts again"
