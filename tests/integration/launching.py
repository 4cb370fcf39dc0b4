"""Running the launcher as a user does, and reading what a run leaves behind."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from engine.dist import free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "launchers" / "pretrain.py"
def _beside_python(name: str) -> str:
    """The command `name` of the interpreter running the tests, so that a suite started as
    `venv/bin/python -m pytest` without activating the venv launches that venv's."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


DEEPSPEED, TORCHRUN = _beside_python("deepspeed"), _beside_python("torchrun")
DEFAULT_THREADS = torch.get_num_threads()   # read before any test changes it


def command(args, ranks=None, port=None, launcher="torchrun") -> list[str]:
    """`ranks` processes of launchers/pretrain.py ARGS, or one plain python process (None).

    launcher "deepspeed" is the README's `deepspeed --num_gpus N launchers/pretrain.py`;
    "torchrun" starts the same ranks with the same environment (engine/launcher_env.py reads both
    alike) without the two interpreters importing DeepSpeed that the deepspeed launcher starts
    first. Tests of what the user's command does use "deepspeed"; the others save the seconds."""
    if ranks is None:
        return [sys.executable, str(LAUNCHER), *args]
    if launcher == "deepspeed":
        return [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(port), str(LAUNCHER), *args]
    return [TORCHRUN, "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(port),
            str(LAUNCHER), *args]


def rank_environment(env: dict, launcher: str) -> dict:
    """torchrun gives each rank one OpenMP thread unless told otherwise; the deepspeed launcher,
    srun and a plain process leave torch's default. Runs that tests compare to within 1e-5 must
    multiply with the same threads (another count rounds matrix products differently), so
    torchrun's ranks get torch's default too."""
    if launcher != "torchrun" or "OMP_NUM_THREADS" in env:
        return env
    return {**env, "OMP_NUM_THREADS": str(DEFAULT_THREADS)}


def launch(args, env, ranks=None, timeout=600, port=None, launcher="torchrun") -> subprocess.CompletedProcess:
    """Run the launcher to its end (`ranks`: that many processes, started by `launcher`)."""
    port = port or free_port()
    result = subprocess.run(command(args, ranks, port, launcher), cwd=ROOT, env=rank_environment(env, launcher),
                            capture_output=True, text=True, timeout=timeout)
    if ranks is not None:
        check_shared_memory_given_back(port)
    return result


def check_shared_memory_given_back(port: int) -> None:
    """Every run, finished or refused, must give back DeepSpeed's shared memory (engine/dist.py).
    Matched by port alone: the ranks' MASTER_ADDR, part of the name, is the launcher's to choose."""
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    for path in leaked:
        path.unlink()
    assert not leaked, f"the run left DeepSpeed's all-reduce workspace in shared memory: {leaked}"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> logged loss; a step logged twice (redone after a resume) fails the test."""
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


# A short 2-rank run that crosses an epoch of neither: the reference that interrupted, killed,
# two-host and elastic runs of the same dials must equal step for step.
REFERENCE_DIALS = ["--global-batch", "32", "--steps", "16", "--log-every", "1", "--eval-every", "8",
                   "--checkpoint-every", "4"]


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


def tensorboard_scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar series TensorBoard would show for the run, read from its event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def samples_by_step(folder: Path, global_batch: int) -> dict[tuple[int, int], list[int]]:
    """(epoch, step in epoch) -> the sample ids every rank took for it, from CLIPZERO_SAMPLE_LOG."""
    steps: dict[tuple[int, int], list[int]] = {}
    for log in sorted(folder.glob("rank*.jsonl")):
        for line in log.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault((row["epoch"], row["sample_in_epoch"] // global_batch), []).extend(row["ids"])
    return steps


def processes_of(out: Path) -> list[psutil.Process]:
    """Every live process of the run writing to `out`: ranks and their forked data workers."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if str(out) in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def rank_process(out: Path, rank: int) -> psutil.Process:
    """The rank itself (its data workers are forks with the same command line)."""
    for proc in processes_of(out):
        parent = proc.parent()
        if f"--local_rank={rank}" in proc.cmdline() and parent and "deepspeed.launcher.launch" in " ".join(parent.cmdline()):
            return proc
    raise AssertionError(f"rank {rank} of {out} is not running")


def wait_for(check_fn, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not check_fn():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
