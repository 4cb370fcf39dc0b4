"""--wandb PROJECT: the run's scalars in Weights & Biases too, as a loop hook (engine/observe/hooks.py).

Rank 0 logs every scalar line of metrics.jsonl (the log lines and the evaluations) at its step,
under the same names; a step's lines land in one W&B history row. The plan (plan.json's dict) is
the W&B run's config. wandb's own files go under RUN/wandb/.

The W&B run id is kept in RUN/wandb_run_id, so that a resumed run (the same --out) continues the
same W&B run from the step after its checkpoint. W&B takes the steps of a run in increasing
order only: after a killed run, the steps it logged past its last checkpoint keep the values it
logged then, and the resumed run's values for them are left out (metrics.jsonl holds those).

wandb's environment applies as usual: WANDB_MODE=offline keeps the run on this machine (upload it
later with `wandb sync RUN/wandb/offline-run-*`), WANDB_ENTITY picks the team, WANDB_API_KEY logs in.
W&B is a copy of metrics.jsonl: if wandb fails mid-run (its service stopped by the SIGTERM that
SLURM sends every process of a job, the network gone), the run says so once and trains on.
"""
from __future__ import annotations

import sys
from pathlib import Path

from engine.errors import UserError
from engine.files import write_atomic
from engine.observe.hooks import LoopHook
from engine.plan.resolve import WANDB_RUN_ID_FILE

INSTALL = "pip install 'clipzero[wandb]'"


def import_wandb():
    """The wandb module; a UserError that names the extra to install when it is missing."""
    try:
        import wandb  # an optional extra: imported only when --wandb is given
    except ImportError as error:
        raise UserError(f"--wandb needs the wandb package ({error}): {INSTALL}, or leave out --wandb") from None
    return wandb


class WandbLog(LoopHook):
    def __init__(self, run_dir: Path, project: str, config: dict):
        """Starts (or resumes) the W&B run of `run_dir`. On rank 0 only."""
        wandb = import_wandb()
        id_file = run_dir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else None  # None: wandb draws one
        try:
            self.run = wandb.init(project=project, id=run_id, resume="allow", dir=str(run_dir), config=config)
        except wandb.errors.Error as error:
            raise UserError(f"--wandb {project}: W&B did not start ({error}). Log in with `wandb login` "
                            "(or set WANDB_API_KEY), or set WANDB_MODE=offline to log on this machine") from None
        if run_id is None:
            write_atomic(id_file, self.run.id + "\n")

    def logged(self, step: int, values: dict[str, float]) -> None:
        self._send(lambda: self.run.log(values, step=step))

    def evaluated(self, step: int, metrics: dict[str, float]) -> None:
        self._send(lambda: self.run.log(metrics, step=step))

    def closing(self) -> None:
        self._send(lambda: self.run.finish())

    def _send(self, call) -> None:
        if self.run is None:
            return
        try:
            call()
        except Exception as error:  # any failure of wandb's: the run goes on, metrics.jsonl is whole
            print(f"wandb: stopped logging to W&B ({type(error).__name__}: {error}); metrics.jsonl has "
                  "every value", file=sys.stderr, flush=True)
            self.run = None
