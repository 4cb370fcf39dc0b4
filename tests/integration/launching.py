"""Running the launcher as a user does, and reading what a run leaves behind."""
import json
import os
import subprocess
import sys
from pathlib import Path

from engine.dist import free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "launchers" / "pretrain.py"
# The `deepspeed` command of the interpreter running the tests, so that a suite started as
# `venv/bin/python -m pytest` without activating the venv launches that venv's DeepSpeed.
_BESIDE = Path(sys.executable).with_name("deepspeed")
DEEPSPEED = str(_BESIDE) if _BESIDE.exists() else "deepspeed"


def launch(args, env, ranks=None, timeout=600) -> subprocess.CompletedProcess:
    """`deepspeed [--num_gpus N] launchers/pretrain.py ARGS` or, without ranks, plain python."""
    if ranks is None:
        return subprocess.run([sys.executable, str(LAUNCHER), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    port = free_port()
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(port), str(LAUNCHER), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    # Every run, finished or refused, must give back DeepSpeed's shared memory (engine/dist.py).
    # Matched by port alone: the ranks' MASTER_ADDR, part of the name, is the launcher's to choose.
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    for path in leaked:
        path.unlink()
    assert not leaked, f"the run left DeepSpeed's all-reduce workspace in shared memory: {leaked}"
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"


def tensorboard_scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar series TensorBoard would show for the run, read from its event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
