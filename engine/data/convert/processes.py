"""The conversion's worker processes (writer.py's "Workers"): block b goes to worker b mod W (in a
split part, see writer.write_blocks), each
writing into its own part folder; the main process hands out blocks through one small queue per
worker and takes in their news. A worker that fails or is killed ends the run: the others are
stopped, and the queues are not waited for at exit (a block queued for a dead worker is never
read). Workers die with the main process, kill -9 included."""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import signal
import traceback
from pathlib import Path
from typing import Callable, Iterable

from engine.data.convert import failures
from engine.data.convert.report import Progress, Ticker

# write(worker number, block id, pairs, tick): one block into that worker's part folder
WriteBlock = Callable[[int, int, list, Callable[[bool], None]], None]


def write_in_workers(todo: Iterable, numbers: list[int], worker_of: Callable[[int], int], write: WriteBlock,
                     progress: Callable[[], Progress], work: Path) -> int:
    """Write the blocks of `todo` in one process per worker number; returns how many ran."""
    # fork: the workers inherit the source's code as loaded (and a test's patches); they start
    # before any thread (the progress bar's, the queues' feeders) that could hold a lock at the fork.
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    tasks = {n: context.Queue(maxsize=1) for n in numbers}
    processes = {n: context.Process(target=_worker, name=f"convert-{n}", daemon=True,
                                    args=(n, write, tasks[n], results, os.getpid()))
                 for n in numbers}
    for process in processes.values():
        process.start()
    bar = progress()
    pump = _Pump(processes, results, bar, work)
    try:
        for block_id, pairs in todo:
            pump.send(tasks[worker_of(block_id)], (block_id, pairs))
        for task_queue in tasks.values():
            pump.send(task_queue, None)
        while pump.finished < len(processes):
            pump.drain(wait=True)
    finally:
        bar.close()
        for process in processes.values():
            if process.is_alive():
                process.kill()
            process.join()
        # After a failure a queue's feeder thread may be stuck writing a block (larger than the
        # pipe's buffer) for a worker that is gone; multiprocessing joins feeder threads at exit,
        # which would then never come. After success nothing is left in them to wait for.
        for task_queue in (*tasks.values(), results):
            task_queue.cancel_join_thread()
            task_queue.close()
    return len(processes)


class _Pump:
    """The main process's side of the workers: hand out blocks, take in their news, notice a failure."""

    def __init__(self, processes: dict, results, bar: Progress, work: Path):
        self.processes, self.results, self.bar, self.work = processes, results, bar, work
        self.finished = 0

    def send(self, task_queue, task) -> None:
        while True:
            try:
                task_queue.put(task, timeout=0.2)
                return
            except queue.Full:
                self.drain(wait=False)

    def drain(self, wait: bool) -> None:
        while True:
            try:
                message = self.results.get(timeout=0.2) if wait else self.results.get_nowait()
            except queue.Empty:
                for number, process in self.processes.items():
                    if process.exitcode not in (None, 0):
                        raise failures.worker_died(number, process.exitcode, self.work)
                return
            wait = False
            if message[0] == "tick":
                self.bar.add(message[1], message[2])
            elif message[0] == "done":
                self.finished += 1
            elif message[0] == "interrupted":  # a full disk, say: the worker's message says what to do
                raise failures.Interrupted(message[2])
            else:
                raise RuntimeError(f"convert worker {message[1]} failed (rerun the same command to resume):\n"
                                   f"{message[2]}")


def _worker(number: int, write: WriteBlock, tasks, results, parent: int) -> None:
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the main process, which stops us
    ticker = Ticker(lambda processed, written: results.put(("tick", processed, written)))
    try:
        while True:
            try:
                task = tasks.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:  # orphaned where PR_SET_PDEATHSIG is missing
                    return
                continue
            if task is None:
                break
            write(number, task[0], task[1], ticker)
            ticker.flush()
        results.put(("done", number))
    except failures.Interrupted as error:
        results.put(("interrupted", number, str(error)))
    except BaseException:
        results.put(("error", number, traceback.format_exc()))


def _die_with(parent: int) -> None:
    """Ask Linux to kill this worker when the main process dies (kill -9 included)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the worker notices the orphaning between tasks instead
    if os.getppid() != parent:  # the main process died before the request took effect
        os._exit(1)
