"""The import graph between engine's units, and the imports made inside functions (issue 29).

A *unit* of a package folder (engine/) is each sub-folder (engine/data: all its modules, recursively)
and each top-level module file (engine/model_with_loss.py is unit "task"). The package's own __init__.py is no
unit: it is not read, and an import of the bare package maps to nothing.

Every import statement of every .py file is read with ast, wherever it stands (module level, functions,
methods, classes); relative imports are resolved against the file's package. `from engine import x`
maps to the unit of engine/x, `from engine.plan.memory import GB` to "plan". Unit A has an edge to
unit B (A != B) when a module of A imports a module of B; each edge keeps its witnesses (file, line,
imported module). Imports under `if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:` never run: they are
no edges and are not counted (their `else:` branch is). importlib.import_module is not seen.

The module-level graph keeps only the imports that run when a module is imported: those outside any
function (class bodies included). Its cycles are the ones that can fail at import time.

An import *inside a function* is a statement whose nearest enclosing scope is a function or method (a
class defined in a function is a scope of its own). One statement counts once, whatever it imports,
so one in a nested function counts once. `python tests/import_graph.py` prints the report; exit 0.

LAYERS is engine's rule: a unit may import only units of lower layers (docs/ARCHITECTURE.md), so
the graph has no cycle by construction; tests/unit/test_import_graph.py holds engine to it.
"""
import ast
import sys
from collections import Counter, deque
from pathlib import Path

Witness = tuple[str, int, str]  # (file relative to the repository root, line, imported module)
Graph = dict[str, dict[str, list[Witness]]]

FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)

# engine's units, lowest first. Units of one layer do not import each other.
LAYERS = (
    ("errors", "files", "host_memory"),   # no engine imports
    ("dist", "plugins", "store"),         # processes and collectives; classes named by flags; object stores
    ("launcher_env", "models", "data"),   # where the ranks come from; towers; samples
    ("objectives", "model_with_loss"),    # methods (objective, recipe, data needs); what DeepSpeed wraps
    ("plan",),                            # every decision, with its reason
    ("observe",),                         # metrics, charts, hooks
    ("train",),                           # step, loop, checkpoints, faults
    ("eval",),                            # evaluations, a run loaded back
    ("export",),                          # a trained model in other libraries' layouts
    ("init_weights",),                    # --init: weights from those layouts (export's mapping backwards)
    ("training_run",),                    # prepare() and run(): everything, in order
)
# Imports that may stay inside functions in engine/, each saying why (a heavy library deferred).
MAX_FUNCTION_IMPORTS = 40


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_imports(node: ast.AST, in_function=False, type_checking=False):
    """Yield (statement, in_function, under_type_checking) for each import statement under node."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node, in_function, type_checking
        return
    if isinstance(node, FUNCTIONS):
        in_function = True
    elif isinstance(node, ast.ClassDef):
        in_function = False
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        children = [(child, True) for child in node.body] + [(child, type_checking) for child in node.orelse]
    else:
        children = [(child, type_checking) for child in ast.iter_child_nodes(node)]
    for child, child_type_checking in children:
        yield from _walk_imports(child, in_function, child_type_checking)


def _imports_of(path: Path):
    return _walk_imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))


def _module_name(path: Path, top: Path) -> list[str]:
    """engine/data/loader.py -> [engine, data, loader]; engine/data/__init__.py -> [engine, data]."""
    parts = list(path.relative_to(top).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported_modules(statement: ast.Import | ast.ImportFrom, path: Path, top: Path) -> list[str]:
    """The absolute names of the modules a statement imports (`from pkg import x` names pkg.x)."""
    if isinstance(statement, ast.Import):
        return [alias.name for alias in statement.names]
    base = statement.module.split(".") if statement.module else []
    if statement.level:
        package = _module_name(path, top)
        if path.name != "__init__.py":
            package = package[:-1]
        base = package[:len(package) - (statement.level - 1)] + base
    if len(base) == 1:  # `from engine import x` (or `from .. import x` landing there): x is the module
        return [".".join(base + [alias.name]) for alias in statement.names]
    return [".".join(base)]


def _unit_of_module(module: str, root: Path) -> str | None:
    parts = module.split(".")
    if parts[0] != root.name or len(parts) < 2:
        return None
    name = parts[1]
    return name if (root / name).is_dir() or (root / f"{name}.py").is_file() else None


def _unit_of_file(path: Path, root: Path) -> str | None:
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else None if path.name == "__init__.py" else path.stem


def _sources(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*.py") if "__pycache__" not in path.parts)


def unit_graph(root: Path, *, module_level_only=False) -> Graph:
    """{unit: {imported unit: [witnesses]}} for the package folder root; every unit is a key."""
    top = root.parent
    graph: Graph = {}
    for path in _sources(root):
        unit = _unit_of_file(path, root)
        if unit is None:
            continue
        edges = graph.setdefault(unit, {})
        for statement, in_function, type_checking in _imports_of(path):
            if type_checking or (module_level_only and in_function):
                continue
            for module in _imported_modules(statement, path, top):
                target = _unit_of_module(module, root)
                if target is not None and target != unit:
                    edges.setdefault(target, []).append((path.relative_to(top).as_posix(), statement.lineno, module))
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components of more than one unit (Tarjan), each sorted, sorted."""
    nodes = sorted(set(graph) | {target for edges in graph.values() for target in edges})
    index: dict[str, int] = {}  # visiting order
    low: dict[str, int] = {}  # the lowest index reachable through the stack
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, {}):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = stack[stack.index(node):]
            del stack[stack.index(node):]
            if len(component) > 1:
                components.append(sorted(component))

    for node in nodes:
        if node not in index:
            connect(node)
    return sorted(components)


def example_cycle(graph: Graph, component: list[str]) -> list[str]:
    """A shortest cycle through the component's first unit, as [a, b, ..., a] (breadth-first)."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for target in sorted(graph.get(node, {})):
            if target == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return path[::-1] + [start]
            if target in members and target not in came_from:
                came_from[target] = node
                queue.append(target)
    return []


def layer_violations(graph: Graph, layers=LAYERS) -> list[tuple[str, str, Witness]]:
    """(unit, imported unit, first witness) of each edge that does not go to a lower layer, and
    (unit, "", no witness) for a unit no layer lists."""
    layer = {unit: depth for depth, units in enumerate(layers) for unit in units}
    found = [(unit, "", ("", 0, "")) for unit in sorted(graph) if unit not in layer]
    for unit, edges in sorted(graph.items()):
        for target, witnesses in sorted(edges.items()):
            if unit in layer and layer.get(target, len(layers)) >= layer[unit]:
                found.append((unit, target, witnesses[0]))
    return found


def function_imports(folder: Path) -> dict[str, int]:
    """{file relative to folder's parent: import statements inside functions}, files with none left out."""
    counts = {}
    for path in _sources(folder):
        count = sum(1 for _, in_function, type_checking in _imports_of(path) if in_function and not type_checking)
        if count:
            counts[path.relative_to(folder.parent).as_posix()] = count
    return counts


def unexplained_function_imports(folder: Path) -> list[Witness]:
    """(file, line, first imported module) of each import inside a function with no comment on
    its own line or the line above: issue 29 asks each one to say why it is deferred."""
    found = []
    for path in _sources(folder):
        lines = path.read_text(encoding="utf-8").splitlines()
        for statement, in_function, type_checking in _imports_of(path):
            if not in_function or type_checking:
                continue
            own, above = lines[statement.lineno - 1], lines[statement.lineno - 2] if statement.lineno > 1 else ""
            if "#" not in own and not above.lstrip().startswith("#"):
                module = _imported_modules(statement, path, folder.parent)[0]
                found.append((path.relative_to(folder.parent).as_posix(), statement.lineno, module))
    return found


def _print_graph(title: str, graph: Graph) -> None:
    components = cycles(graph)
    edges = sum(len(targets) for targets in graph.values())
    print(f"\n{title}: {len(graph)} units, {edges} edges, {len(components)} cycle(s)")
    for component in components:
        print(f"  SCC of {len(component)} units: {', '.join(component)}")
    if components:
        path = example_cycle(graph, max(components, key=len))
        print(f"  example cycle in the biggest SCC: {' -> '.join(path)}")
        for source, target in zip(path, path[1:]):
            file, line, module = graph[source][target][0]
            print(f"    {source} -> {target}: {file}:{line} imports {module} "
                  f"({len(graph[source][target])} witness(es))")


def main() -> int:
    repo = Path(__file__).resolve().parent.parent
    engine = repo / "engine"
    per_folder = {name: function_imports(repo / name) for name in ("engine", "launchers", "kernels")}
    print("Import statements inside functions (nearest scope a function; TYPE_CHECKING excluded):")
    for name, counts in per_folder.items():
        print(f"  {name + '/':11} {sum(counts.values()):4}  in {len(counts)} files")
    unexplained = unexplained_function_imports(engine)
    print(f"  of engine/'s, {len(unexplained)} without a comment saying why (on their line or the one above):")
    for file, line, module in unexplained:
        print(f"    {file}:{line} {module}")
    print("\nTop 15 files of engine/ by imports inside functions:")
    for file, count in Counter(per_folder["engine"]).most_common(15):
        print(f"  {count:4}  {file}")
    _print_graph("Full unit graph (all imports that run)", unit_graph(engine))
    _print_graph("Module-level unit graph (imports outside functions)", unit_graph(engine, module_level_only=True))
    violations = layer_violations(unit_graph(engine))
    print(f"\nImports against LAYERS (a unit importing its own layer or one above): {len(violations)}")
    for unit, target, (file, line, module) in violations:
        print(f"  {unit} -> {target}: {file}:{line} imports {module}" if target else f"  {unit}: in no layer")
    print("\nImports under TYPE_CHECKING (no edges):")
    for path in _sources(engine):
        for statement, _, type_checking in _imports_of(path):
            if type_checking:
                names = ", ".join(_imported_modules(statement, path, repo))
                print(f"  {path.relative_to(repo).as_posix()}:{statement.lineno} {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
