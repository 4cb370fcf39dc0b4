"""Faults injected on purpose (CLIPZERO_DRILL), to show what the engine does with them: the
tests and the fault table of launchers/slurm/README.md run them."""
import os
import signal
import time

from engine import dist
from engine.errors import UserError
from engine.train.stop_signals import StopSignals


class Drills:
    """Faults injected on purpose, to show what the engine does with them (the tests and the
    fault table of launchers/slurm/README.md). Read from CLIPZERO_DRILL, comma-separated:

      nonfinite:S[-E]            the loss of steps S..E is NaN (its gradients with it)
      pause_eval:S               evaluation after step S waits (up to 120 s) for a stop signal
      kill_in_checkpoint:S[:R]   rank R (every rank if absent) kills itself with SIGKILL while
                                 writing the checkpoint of step S, after its own files
    """

    def __init__(self, spec: str = ""):
        self.nonfinite: set[int] = set()
        self.pause_eval: set[int] = set()
        self.kill_in_checkpoint: dict[int, int | None] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, where = item.partition(":")
            try:
                if name == "nonfinite":
                    first, _, last = where.partition("-")
                    self.nonfinite.update(range(int(first), int(last or first) + 1))
                elif name == "pause_eval":
                    self.pause_eval.add(int(where))
                elif name == "kill_in_checkpoint":
                    step, _, rank = where.partition(":")
                    self.kill_in_checkpoint[int(step)] = int(rank) if rank else None
                else:
                    raise ValueError(name)
            except ValueError:
                raise UserError(f"CLIPZERO_DRILL item {item!r} is not one of nonfinite:S[-E], "
                                "pause_eval:S, kill_in_checkpoint:S[:R]") from None

    @classmethod
    def from_environment(cls) -> "Drills":
        return cls(os.environ.get("CLIPZERO_DRILL", ""))

    def __bool__(self) -> bool:
        return bool(self.nonfinite or self.pause_eval or self.kill_in_checkpoint)

    def poison(self, step: int) -> bool:
        return step in self.nonfinite

    def wait_in_eval(self, step: int, stop: StopSignals | None) -> None:
        if step not in self.pause_eval or stop is None:
            return
        print(f"drill: evaluation after step {step} waits for a stop signal", flush=True)
        for _ in range(1200):
            if stop.received:
                return
            time.sleep(0.1)

    def in_checkpoint(self, step: int):
        """A callable for checkpoint.save(before_complete=...), or None."""
        if step not in self.kill_in_checkpoint:
            return None
        rank = self.kill_in_checkpoint[step]
        if rank is not None and rank != dist.rank():
            return None
        return lambda: os.kill(os.getpid(), signal.SIGKILL)
