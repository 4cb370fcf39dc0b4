"""Data workers never outlive their rank (engine/data/workers.py): they ignore the stop signals
SLURM sends every process of a step, die when the rank is killed, and do not hold up a rank
that exits on an error with its DataLoader open."""
import os
import signal
import subprocess
import sys
import textwrap
import time

from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]

RANK_SCRIPT = textwrap.dedent("""
    import functools, os, sys, time, torch
    from torch.utils.data import DataLoader, Dataset
    from engine.data.workers import start_workers, worker_dies_with_its_rank

    class Slow(Dataset):
        def __len__(self):
            return 10**6
        def __getitem__(self, index):
            time.sleep(0.05)
            return torch.tensor(index)

    loader = DataLoader(Slow(), batch_size=2, num_workers=2, multiprocessing_context="fork",
                        worker_init_fn=functools.partial(worker_dies_with_its_rank, os.getpid()))
    batches = start_workers(loader)
    next(batches)
    print("ready", flush=True)
    if sys.argv[1] == "error":
        raise RuntimeError("a collective timed out")  # exits with the DataLoader still open
    time.sleep(600)
""")


def _rank(tmp_path, mode: str) -> tuple[subprocess.Popen, list[psutil.Process]]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    rank = subprocess.Popen([sys.executable, str(script), mode], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert rank.stdout.readline().strip() == "ready", rank.stderr.read()
    return rank, psutil.Process(rank.pid).children()


def _gone(processes, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes):
            return True
        time.sleep(0.1)
    return False


def test_workers_ignore_stop_signals_and_die_with_a_killed_rank(tmp_path):
    rank, workers = _rank(tmp_path, "wait")
    try:
        assert len(workers) == 2
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
            worker.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
        rank.kill()
        rank.wait()
        assert _gone(workers), "the workers outlived their killed rank"
    finally:
        rank.kill()
        for worker in workers:
            if worker.is_running():
                worker.kill()


def test_a_rank_that_fails_with_its_dataloader_open_exits_at_once(tmp_path):
    rank, workers = _rank(tmp_path, "error")
    try:
        assert rank.wait(timeout=30) == 1
        assert "a collective timed out" in rank.stderr.read()
        assert _gone(workers)
    finally:
        rank.kill()
