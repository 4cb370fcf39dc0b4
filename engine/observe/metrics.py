"""Where numbers go: TensorBoard (<run>/tensorboard/) and JSON lines (<run>/metrics.jsonl).

Only rank 0 writes; other ranks get a writer that drops everything, so call sites need no
rank checks.
"""
import json
import os
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None):
        """`resume_step`: the step of the checkpoint this run resumed from. What an earlier run
        logged after it (work lost with a killed run, redone now) is dropped from both
        records, so that every step appears once."""
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                          purge_step=None if resume_step is None else resume_step + 1)
        path = run_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            _drop_lines_after(path, resume_step)
        # Appending keeps the history of a resumed run in one file.
        self._jsonl = open(path, "a", buffering=1)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, step)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._jsonl.close()


def _drop_lines_after(path: Path, step: int) -> None:
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):
            pass  # a line torn by a kill mid-write
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)
