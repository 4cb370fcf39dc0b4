"""Where numbers go: TensorBoard (<run>/tensorboard/) and JSON lines (<run>/metrics.jsonl).

Only rank 0 writes; other ranks get a writer that drops everything, so call sites need no
rank checks.
"""
import json
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        # Appending keeps the history of a resumed run in one file.
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)

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
