"""The package is a stack of floors (docs/architecture.md): its import graph, read with ast, has no circle, no import
that goes up a floor, no import written inside a function, and no module that imports a command.

    python tests/test_architecture.py      # prints the figures: modules, imports, circles, upward and late imports
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
# floor of each part, lowest first; every other top-level module is a command (the top floor)
FLOORS = {"errors": 0, "mlp": 1, "schedules": 2, "config": 3, "planning": 4, "runtime": 5, "training": 6}
COMMAND_FLOOR = 7
STDLIB = set(sys.stdlib_module_names)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def floor(module: str) -> int:
    part = module.split(".")[1] if module.count(".") else ""
    return FLOORS.get(part, COMMAND_FLOOR)


def _targets(node: ast.AST, known: set[str]) -> list[str]:
    """The pipeline modules one import statement reaches (`from pipeline.training import checkpoint` reaches
    pipeline.training.checkpoint; `from pipeline.training.setup import load_data`, pipeline.training.setup)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "pipeline"]
    if not isinstance(node, ast.ImportFrom) or node.level or not node.module or node.module.split(".")[0] != "pipeline":
        return []
    found = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
    return found if len(found) == len(node.names) else [node.module, *found]


def imports() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module -> the pipeline modules it imports at its top level, [(module, line, target)] of imports inside a
    function or class)."""
    trees = modules()
    known = set(trees)
    graph: dict[str, set[str]] = {name: set() for name in trees}
    late: list[tuple[str, int, str]] = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            for target in _targets(node, known):
                graph[name].add(target)
        for scope in ast.walk(tree):
            if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                late += [(name, n.lineno, t) for n in ast.walk(scope) for t in _targets(n, known)]
    return graph, late


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself), by Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a module to one on a higher floor, or to a command."""
    return [(a, b) for a, targets in graph.items() for b in sorted(targets)
            if b != "pipeline" and (floor(b) > floor(a) or (floor(b) == COMMAND_FLOOR and a != b))]


def third_party(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names - STDLIB - {"pipeline"}


def test_no_circle_no_upward_import_no_late_import():
    graph, late = imports()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the graph was read at all
    assert circles(graph) == []
    assert upward(graph) == []
    assert late == []


def test_the_checker_sees_circles_and_upward_imports():
    """The checks can fail: a made-up graph with a circle and an import from mlp up to training."""
    graph = {"pipeline.mlp.a": {"pipeline.training.b"}, "pipeline.training.b": {"pipeline.mlp.a"},
             "pipeline.training.c": {"pipeline.train"}, "pipeline.train": set()}
    assert circles(graph) == [["pipeline.mlp.a", "pipeline.training.b"]]
    assert upward(graph) == [("pipeline.mlp.a", "pipeline.training.b"), ("pipeline.training.c", "pipeline.train")]
    tree = ast.parse("def f():\n    from pipeline.training import checkpoint\n")
    assert _targets(tree.body[0].body[0], {"pipeline.training.checkpoint"}) == ["pipeline.training.checkpoint"]


def test_each_floor_is_a_subpackage_whose_init_only_says_what_it_is_for():
    for part in (p for p in FLOORS if (PACKAGE / p).is_dir()):
        tree = ast.parse((PACKAGE / part / "__init__.py").read_text())
        doc = ast.get_docstring(tree)
        assert doc and "import" in doc, f"pipeline/{part}/__init__.py must say what the layer may import"
        assert len(tree.body) == 1, f"pipeline/{part}/__init__.py holds its docstring only"


def test_schedules_are_pure_python():
    """Schedules are data: nothing in schedules/ imports torch, numpy or anything outside the standard library."""
    trees = modules()
    assert {name: third_party(tree) for name, tree in trees.items() if floor(name) == FLOORS["schedules"]
            and third_party(tree)} == {}


def test_only_config_and_the_chooser_spell_a_transport_name():
    """pipeline.transport's names live in config (the vocabulary) and runtime.distributed maps them to transports
    through config's constants: no other module compares a string with a transport's name ("auto", which
    dist.device and dist.backend also take, aside)."""
    from pipeline.config import AUTO, TRANSPORTS

    names = set(TRANSPORTS) - {AUTO}
    spelled = {name for name, tree in modules().items()
               for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in names}
    assert spelled == {"pipeline.config"}


def test_every_transport_name_has_one_transport_and_every_transport_the_whole_interface():
    from pipeline.config import TRANSPORTS
    from pipeline.runtime import distributed
    from pipeline.runtime.inprocess import InProcessTransport
    from pipeline.runtime.p2p import P2PTransport
    from pipeline.runtime.shm import ShmTransport
    from pipeline.runtime.transport import Transport

    assert set(distributed._TRANSPORTS) == set(TRANSPORTS)
    interface = {name for name in vars(Transport) if not name.startswith("_")}
    assert interface == {"send", "post", "can_recv", "recv", "flush", "pending_sends", "close"}
    for transport in (P2PTransport, InProcessTransport, ShmTransport):
        assert interface <= {name for name in vars(transport) if callable(getattr(transport, name))}, transport


def test_only_the_placement_computes_the_looped_rule():
    """Placement is data: `s % p` is written once, in schedules/placement.py; every other module asks a Placement."""
    modulo = {name for name, tree in modules().items() for node in ast.walk(tree)
              if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod)
              and any(isinstance(side, ast.Name) and side.id in ("num_ranks", "p") for side in (node.right,))
              and isinstance(node.left, ast.Name) and node.left.id in ("s", "stage", "stage_index")}
    assert modulo == {"pipeline.schedules.placement"}


def test_every_command_is_a_console_script_too():
    """pyproject.toml declares `pipeline-NAME = "pipeline.NAME:main"` for every command module, and nothing else."""
    import importlib
    import re

    text = (PACKAGE.parent / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    scripts = dict(re.findall(r'^(pipeline-[\w-]+) = "([\w.:]+)"', section, re.M))
    commands = {name for name in modules() if floor(name) == COMMAND_FLOOR and name != "pipeline"}
    assert scripts == {f"pipeline-{name.split('.')[1]}": f"{name}:main" for name in commands}
    for name in commands:
        assert callable(importlib.import_module(name).main)


def summary() -> str:
    graph, late = imports()
    by_floor: dict[int, int] = {}
    for name in (n for n in graph if n != "pipeline"):  # the root __init__ is the package's face, not a command
        by_floor[floor(name)] = by_floor.get(floor(name), 0) + 1
    floors = ", ".join(f"{part} {by_floor.get(level, 0)}" for part, level in [*FLOORS.items(), ("commands", COMMAND_FLOOR)])
    return (f"modules {len(graph)} ({floors}); imports {sum(map(len, graph.values()))}; circles {len(circles(graph))}; "
            f"upward imports {len(upward(graph))}; late imports {len(late)}")


if __name__ == "__main__":
    print(summary())
