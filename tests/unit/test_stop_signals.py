"""Stop signals, their agreement across ranks, the requeue decision, skipped-step counting and
fault drills (engine/train/stop_signals.py, nonfinite.py, drills.py)."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch.multiprocessing as mp

from engine.dist import free_port
from engine.errors import UserError
from engine.train.drills import Drills
from engine.train.nonfinite import NonFiniteSteps, SkippedSteps
from engine.train.stop_signals import StopSignals, requeue


@pytest.fixture
def stop():
    signals = StopSignals(timeout_s=30)
    yield signals
    signals.close()


def test_a_signal_only_sets_a_flag_and_usr1_alone_asks_for_a_requeue(stop):
    assert not stop.agreed()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.received == {"SIGUSR1"} and stop.agreed() and stop.wants_requeue
    os.kill(os.getpid(), signal.SIGTERM)  # a cancel as well: never requeue over it
    assert stop.agreed() and not stop.wants_requeue


def test_requeue_decisions(stop):
    os.kill(os.getpid(), signal.SIGUSR1)
    stop.agreed()
    assert requeue(None, 0, 10, stop) == (False, "not a SLURM job: run the same command again to "
                                                 "continue from this checkpoint")
    requeued, message = requeue("42", 3, 3, stop)
    assert not requeued and "--max-requeues" in message
    path = os.environ["PATH"]
    os.environ["PATH"] = "/nonexistent"
    try:
        requeued, message = requeue("42", 0, 3, stop)  # no scontrol here: says how to go on
    finally:
        os.environ["PATH"] = path
    assert not requeued and "submit the same command again" in message


def test_a_second_sigterm_ends_the_process_at_once():
    script = textwrap.dedent("""
        import os, signal, time
        from engine.train.stop_signals import StopSignals
        stop = StopSignals(timeout_s=30)
        os.kill(os.getpid(), signal.SIGTERM)
        print("first:", sorted(stop.received), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("still running", flush=True)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert result.returncode == -signal.SIGTERM
    assert "first: ['SIGTERM']" in result.stdout and "still running" not in result.stdout


def _rank(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from engine import dist

    dist.init_distributed(timeout_s=60)
    stop = StopSignals(timeout_s=60)
    first = stop.agreed()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    out[rank] = (first, stop.agreed(), sorted(stop.agreed_names))
    stop.close()
    dist.close_distributed()


def test_ranks_agree_on_a_signal_only_one_of_them_got():
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(2, free_port(), out), nprocs=2)
    assert dict(out) == {0: (False, True, ["SIGUSR1"]), 1: (False, True, ["SIGUSR1"])}


def test_skipped_steps_in_a_row_stop_the_run():
    skipped = SkippedSteps(limit=3)
    for step, was_skipped in enumerate([True, True, False, True, True], start=1):
        skipped.record(was_skipped, step, "advice")
    with pytest.raises(NonFiniteSteps, match=r"steps 4\.\.6 .* \(3 in a row\).*advice"):
        skipped.record(True, 6, "advice")


def test_drills_are_parsed_and_bad_ones_refused():
    drills = Drills("nonfinite:5-7, pause_eval:8,kill_in_checkpoint:12:1")
    assert [drills.poison(s) for s in (4, 5, 7, 8)] == [False, True, True, False]
    assert drills.pause_eval == {8} and drills.kill_in_checkpoint == {12: 1}
    assert drills.in_checkpoint(12) is None  # rank 1's drill, this is rank 0
    assert not Drills("") and Drills("pause_eval:3")
    with pytest.raises(UserError, match="CLIPZERO_DRILL"):
        Drills("explode:3")
