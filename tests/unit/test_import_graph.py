"""The import-graph report of issue 29 (tests/import_graph.py), on tiny packages written into tmp_path."""
from pathlib import Path
from textwrap import dedent

from tests.import_graph import (MAX_FUNCTION_IMPORTS, cycles, function_imports, layer_violations,
                                unexplained_function_imports, unit_graph)

ENGINE = Path(__file__).resolve().parents[2] / "engine"


def package(tmp_path: Path, files: dict[str, str]) -> Path:
    """Write engine/<name> for each file (an empty __init__.py in every folder) and return engine/."""
    root = tmp_path / "engine"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dedent(text))
    for folder in [root, *(path for path in root.rglob("*") if path.is_dir())]:
        (folder / "__init__.py").touch()
    return root


def test_a_cycle_through_an_import_inside_a_function_is_no_module_level_cycle(tmp_path):
    root = package(tmp_path, {
        "a/one.py": "from engine.b.two import B\n",
        "b/two.py": """\
            B = 2

            def late():
                from engine.a.one import A
                return A
            """,
    })
    graph = unit_graph(root)
    assert cycles(graph) == [["a", "b"]]
    assert graph["a"]["b"] == [("engine/a/one.py", 1, "engine.b.two")]
    assert graph["b"]["a"] == [("engine/b/two.py", 4, "engine.a.one")]
    module_level = unit_graph(root, module_level_only=True)
    assert cycles(module_level) == []
    assert module_level["b"] == {}


def test_imports_inside_functions_count_each_statement_once(tmp_path):
    root = package(tmp_path, {
        "a/one.py": """\
            import os
            from typing import TYPE_CHECKING

            if TYPE_CHECKING:
                from engine.b.two import B

            class Holder:
                import json

                def method(self):
                    import math, sys

            def outer():
                from engine.b import two

                def inner():
                    import re
                    from engine.c import three

                    def innermost():
                        import json

                class Local:  # nearest scope: the class, not the function
                    import json
                return inner
            """,
        "b/two.py": "import os\n",
        "c/three.py": "",
    })
    # method: 1 (two modules, one statement); outer: 1; inner: 2; innermost: 1. The module-level, class-body
    # and TYPE_CHECKING imports do not count, nor do nested functions count again in the function around them.
    assert function_imports(root) == {"engine/a/one.py": 5}
    assert function_imports(root / "b") == {}
    graph = unit_graph(root)
    assert graph["a"] == {"b": [("engine/a/one.py", 14, "engine.b")],
                          "c": [("engine/a/one.py", 18, "engine.c")]}
    assert unit_graph(root, module_level_only=True)["a"] == {}  # TYPE_CHECKING adds no edge


def test_an_import_under_type_checking_adds_no_edge_but_its_else_branch_does(tmp_path):
    root = package(tmp_path, {
        "a/one.py": """\
            import typing

            if typing.TYPE_CHECKING:
                from engine.b.two import B
            else:
                from engine.c.three import C
            """,
        "b/two.py": "from engine.a import one\n",
        "c/three.py": "C = 3\n",
    })
    graph = unit_graph(root)
    assert graph["a"] == {"c": [("engine/a/one.py", 6, "engine.c.three")]}
    assert cycles(graph) == []


def test_relative_imports_resolve_against_the_files_package(tmp_path):
    root = package(tmp_path, {
        "a/__init__.py": "from .one import A\n",
        "a/one.py": "from . import helper\nfrom ..b import two\nA = 1\n",
        "a/helper.py": "",
        "a/deep/inner.py": "from ...c.three import C\nfrom .. import one\nfrom ... import d\n",
        "b/two.py": "from ..a.one import A\n",
        "c/three.py": "C = 3\n",
        "d.py": "",
    })
    graph = unit_graph(root)
    assert graph["a"] == {"b": [("engine/a/one.py", 2, "engine.b")],
                          "c": [("engine/a/deep/inner.py", 1, "engine.c.three")],
                          "d": [("engine/a/deep/inner.py", 3, "engine.d")]}
    assert graph["b"] == {"a": [("engine/b/two.py", 1, "engine.a.one")]}
    assert cycles(graph) == [["a", "b"]]


def test_top_level_module_files_are_units_of_their_own(tmp_path):
    root = package(tmp_path, {
        "__init__.py": "from engine.task import Task\n",  # the package's __init__ is no unit
        "task.py": "from engine import dist\nimport engine\nTask = 1\n",
        "dist.py": "from engine.plan.memory import GB\n",
        "plan/memory.py": "from engine import task, missing\nGB = 2**30\n",
    })
    graph = unit_graph(root)
    assert graph == {
        "dist": {"plan": [("engine/dist.py", 1, "engine.plan.memory")]},
        "plan": {"task": [("engine/plan/memory.py", 1, "engine.task")]},
        "task": {"dist": [("engine/task.py", 1, "engine.dist")]},
    }
    assert cycles(graph) == [["dist", "plan", "task"]]


def test_the_real_engine_graph_is_built():
    graph = unit_graph(ENGINE)
    assert "plan" in graph
    assert "__init__" not in graph


def test_an_import_inside_a_function_is_explained_by_a_comment_on_its_line_or_above(tmp_path):
    root = package(tmp_path, {
        "a/one.py": """\
            import json

            def said_above():
                # DeepSpeed takes seconds to import: only the training process needs it
                import deepspeed

            def said_beside():
                import torch  # deferred: start-up time

            def unsaid():
                x = 1
                from engine.b import two
                return two
            """,
    })
    assert unexplained_function_imports(root) == [("engine/a/one.py", 12, "engine.b")]


def test_an_import_of_the_same_or_a_higher_layer_or_an_unlisted_unit_is_a_violation(tmp_path):
    root = package(tmp_path, {
        "low.py": "",
        "mid/one.py": "from engine import low\nfrom engine.side import x\n",
        "side.py": "x = 1\n",
        "top.py": "from engine.mid import one\nfrom engine import low\n",
        "stray.py": "",
    })
    layers = (("low",), ("mid", "side"), ("top",))
    assert layer_violations(unit_graph(root), layers) == [
        ("stray", "", ("", 0, "")),
        ("mid", "side", ("engine/mid/one.py", 2, "engine.side")),
    ]
    ordered = (("low",), ("mid",), ("side",), ("top",), ("stray",))
    assert layer_violations(unit_graph(root), ordered) == [
        ("mid", "side", ("engine/mid/one.py", 2, "engine.side")),  # side sits above mid
    ]
    assert layer_violations(unit_graph(root), (("low",), ("side",), ("mid",), ("top",), ("stray",))) == []


def test_engine_keeps_its_import_rules():
    """Issue 29: no cycle between engine's units (imports inside functions counted), each unit
    importing only lower layers, and few imports inside functions, each saying why."""
    graph = unit_graph(ENGINE)
    assert cycles(graph) == []
    assert layer_violations(graph) == []
    assert sum(function_imports(ENGINE).values()) <= MAX_FUNCTION_IMPORTS
    assert unexplained_function_imports(ENGINE) == []
