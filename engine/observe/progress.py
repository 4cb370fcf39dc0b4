"""Progress bar with ETA on rank 0; silent elsewhere."""
import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         file=sys.stdout, disable=not enabled, mininterval=1.0)

    def show(self, loss: float) -> None:
        """The latest logged loss (mean since the previous log), shown beside the bar."""
        self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def update(self) -> None:
        self._bar.update(1)

    def write(self, line: str) -> None:
        if self.enabled:  # tqdm.write prints even when the bar is disabled
            self._bar.write(line)

    def close(self) -> None:
        self._bar.close()
