"""Classes named on the command line: objectives (--method) and evaluations (--task, --eval).

A name is looked up among the built-in ones, then among installed packages' entry points of the
plug-in's group, and `package.module:Class` imports that class from the user's own package. The
registries (engine/objectives/registry.py, engine/eval/registry.py) hold the built-in names.
"""
import importlib
from importlib.metadata import entry_points

from engine.errors import UserError


def installed(group: str) -> dict[str, str]:
    """name -> package.module:Class of every installed package's entry point in `group`."""
    return {entry.name: entry.value for entry in entry_points(group=group)}


def names(built_in: dict[str, str], group: str) -> list[str]:
    """Every name available: built in, then installed by other packages."""
    return [*built_in, *(name for name in installed(group) if name not in built_in)]


def load_class(name: str, *, built_in: dict[str, str], group: str, base: type, flag: str, kind: str) -> type:
    """The subclass of `base` that `name` names (a registered name or package.module:Class);
    UserError naming `flag` and the choices otherwise. `kind`: "objective", "evaluation"."""
    path = built_in.get(name) or installed(group).get(name) or (name if ":" in name else None)
    if path is None:
        raise UserError(f"unknown {flag} {name!r}: use one of {', '.join(names(built_in, group))}, or your own "
                        f"{kind} as package.module:Class")
    module_name, _, class_name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise UserError(f"{flag} {name}: cannot import {path} ({error}); is its package on PYTHONPATH?") from error
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise UserError(f"{flag} {name}: {path} is not a subclass of {base.__module__}.{base.__name__}")
    return cls
