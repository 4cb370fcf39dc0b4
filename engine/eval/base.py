"""What every evaluation declares, as objectives declare themselves (engine/objectives/base.py):
its options, where it may run, and how it opens its inputs and scores a model. Its name is the
one it is registered under, or the `package.module:Class` it is given as:
--task NAME (launchers/evaluate.py), --eval NAME:PATH (training).

  options           EvalOption each: --<name with dashes> standalone, name=value after --eval's
                    path; the first is the path itself (--eval NAME:PATH gives it)
  during_training   may be dialled with --eval and scored at every evaluation step
  standalone        may be run by launchers/evaluate.py on a loaded run
  open(options)     the inputs checked, nothing decoded (UserError saying what to give)
  load(size, ranks) what must be in memory before the first score (default: nothing)
  score(model, ...) a Result: its metrics, and what the standalone table and JSON show

An evaluation is registered by name in engine/eval/registry.py, or given as
`package.module:Class` from the user's own package, or by an entry point "clipzero.evaluations".
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from engine.eval.benchmark import ModelToScore, Result
from engine.eval.shard import ALONE, Ranks


@dataclass(frozen=True)
class EvalOption:
    """An input an evaluation takes: `--<name with dashes> VALUE` in launchers/evaluate.py,
    `,name=VALUE` after `--eval NAME:PATH` (the first option is the PATH)."""
    name: str
    help: str
    metavar: str = "VALUE"
    required: bool = False
    default: str | None = None       # the value when not given (None: the evaluation decides)


class Evaluation(ABC):
    """One evaluation of a two-tower model on one set, opened once and scored many times (at
    every evaluation step of a run, or once by launchers/evaluate.py). `given` holds its options
    by name, defaults filled in; the first is `path`."""
    options: tuple[EvalOption, ...] = ()
    during_training = True
    standalone = True

    def __init__(self, options: dict[str, str | None]):
        """`options`: every declared option by name, the default where not given."""
        self.given = options

    @classmethod
    def with_defaults(cls, given: dict[str, str | None]) -> dict[str, str | None]:
        return {o.name: given[o.name] if given.get(o.name) is not None else o.default for o in cls.options}

    @classmethod
    def open(cls, given: dict[str, str | None]) -> "Evaluation":
        """Check the inputs without decoding them (UserError with the fix); subclasses check more."""
        return cls(cls.with_defaults(given))

    @property
    def path(self) -> str:
        return str(self.given[self.options[0].name])

    @property
    def set_name(self) -> str:
        """The evaluated set's short name, for eval/<set>/<metric> in training (default: the path's last part)."""
        return Path(self.path).resolve().name

    def load(self, image_size: int, ranks: Ranks = ALONE) -> None:
        """What must be in memory before the first score; every rank calls it (a collective when split)."""

    @abstractmethod
    def score(self, model: ModelToScore, device: torch.device | str = "cpu",
              interrupted: Callable[[], bool] | None = None, ranks: Ranks = ALONE) -> Result:
        """Score `model` (split over `ranks`, every one of which calls it: the same forwards on each)."""
