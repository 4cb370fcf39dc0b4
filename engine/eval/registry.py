"""Evaluation name -> class. The one place that lists the built-in evaluations.

An evaluation is one file in engine/eval/tasks/ declaring its options and where it runs
(engine/eval/base.py), plus one line here. One from elsewhere needs no line:

  --task / --eval package.module:Class     imported by that path
  entry point group "clipzero.evaluations"  a package's `name = package.module:Class`
"""
from __future__ import annotations

from engine import plugins
from engine.errors import UserError
from engine.eval.base import Evaluation

BUILT_IN = {
    "zeroshot": "engine.eval.tasks.zeroshot:ZeroShot",
    "retrieval": "engine.eval.tasks.retrieval:Retrieval",
    "linear-probe": "engine.eval.tasks.linear_probe:LinearProbe",
    "voc07-svm": "engine.eval.tasks.voc07_svm:Voc07Svm",
    "heldout": "engine.eval.tasks.heldout:HeldOutSplit",
}
HELD_OUT = "heldout"   # the one training adds itself when it has a held-out split
ENTRY_POINT_GROUP = "clipzero.evaluations"


def evaluation_names() -> list[str]:
    """Every evaluation available by name: built in, then installed by other packages."""
    return plugins.names(BUILT_IN, ENTRY_POINT_GROUP)


def is_registered(name: str) -> bool:
    return name in evaluation_names()


def evaluation_class(name: str, flag: str = "--task") -> type[Evaluation]:
    """The evaluation class `name` names (a registered name or `package.module:Class`); `flag`
    names the option in messages."""
    cls = plugins.load_class(name, built_in=BUILT_IN, group=ENTRY_POINT_GROUP, base=Evaluation,
                             flag=flag, kind="evaluation")
    if not cls.options:
        raise UserError(f"{flag} {name}: {cls.__module__}:{cls.__name__} declares no options; its first is "
                        f"the path it evaluates")
    return cls


def evaluations(where: str, extra: str | None = None) -> dict[str, type[Evaluation]]:
    """name -> class of every registered evaluation that runs `where` ("standalone" or
    "during_training"), and `extra` (a plug-in given by path) when it does; one that does not
    import is left out here, and refused with its reason when named."""
    found = {}
    for name in evaluation_names() + ([extra] if extra and not is_registered(extra) else []):
        try:
            cls = evaluation_class(name)
        except UserError:
            continue
        if getattr(cls, where):
            found[name] = cls
    return found
