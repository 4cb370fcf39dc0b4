"""Method name -> objective class. The one place that lists the built-in methods.

A method is one file in engine/objectives/ declaring everything the engine needs of it
(engine/objectives/base.py), plus one line here. An objective from elsewhere needs no line:

  --method package.module:Class           imported by that path
  entry point group "clipzero.objectives"  a package's `name = package.module:Class`

The plan records the name as given, so a resumed run or `launchers/evaluate.py` finds the same
class again.
"""
from __future__ import annotations

from engine import plugins
from engine.errors import UserError
from engine.objectives.base import Objective

DEFAULT_METHOD = "clip"
BUILT_IN = {
    "clip": "engine.objectives.clip:ClipObjective",
    "declip": "engine.objectives.declip:DeclipObjective",
    "clip-lite": "engine.objectives.clip_lite:ClipLiteObjective",
    "siglip": "engine.objectives.siglip:SiglipObjective",
}
ENTRY_POINT_GROUP = "clipzero.objectives"


def method_names() -> list[str]:
    """Every method available by name: built in, then installed by other packages."""
    return plugins.names(BUILT_IN, ENTRY_POINT_GROUP)


def objective_class(method: str) -> type:
    """The objective class `method` names (a registered name or `package.module:Class`)."""
    return plugins.load_class(method, built_in=BUILT_IN, group=ENTRY_POINT_GROUP, base=Objective,
                              flag="--method", kind="objective")


def declared_dials(method: str | None) -> dict:
    """name -> (Option, [methods declaring it]) of the command-line options over every
    registered method and `method`; a method that does not import is left to the planner,
    which says why."""
    methods = method_names() + ([method] if method and method not in method_names() else [])
    declared: dict = {}
    for name in methods:
        try:
            cls = objective_class(name)
        except UserError:
            continue
        for option in cls.options:
            if option.dial:
                declared.setdefault(option.name, (option, []))[1].append(name)
    return declared


def methods_declaring(option_name: str) -> list[str]:
    """The built-in methods that take `--<option_name>` on the command line."""
    return [method for method in BUILT_IN
            if any(o.name == option_name and o.dial for o in objective_class(method).options)]
