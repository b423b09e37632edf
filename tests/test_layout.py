"""The package's shape: imports go one way (no cycle; the techniques never import the course's tooling),
no module grows into two ideas, and the cross-check marker finds the tests that compare with a library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import calls_reference_library

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "course_lib"
MAX_LINES = 450  # past ~400 lines a module is two ideas (DESIGN.md); 450 leaves room for a docstring


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> set[str]:
    """The course_lib modules an import statement in module ``importer`` loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            package = importer if MODULES[importer].name == "__init__.py" else importer.rsplit(".", 1)[0]
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        # `from package import submodule` loads the submodule; `from module import name` the module.
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    found = set()
    for name in names:
        while name and name not in MODULES:  # `import course_lib.x.y` of a name inside a module
            name = name.rpartition(".")[0]
        if name.startswith("course_lib"):
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Every import in every module, at the top or inside a function (a lazy import is still a dependency)."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= resolve(name, node)
        graph[name] = edges - {name, "course_lib"}  # the package's __init__ only holds its docstring
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None: depth-first search with colours."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_cycle_finder_finds_a_hand_made_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_resolver_reads_relative_and_package_imports():
    graph = import_graph()
    assert "course_lib.lora" in graph["course_lib.export"]  # `from . import lora`
    assert "course_lib.budget.configs" in graph["course_lib.budget.estimate"]


def test_package_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_techniques_never_import_the_course_tooling():
    graph = import_graph()
    offenders = {m: sorted(d for d in deps if d.startswith("course_lib.tooling"))
                 for m, deps in graph.items()
                 if not m.startswith("course_lib.tooling") and m != "course_lib.cli"}
    assert not {m: d for m, d in offenders.items() if d}, "only the command line and the tooling use tooling"


# DESIGN.md's grouping: the infrastructure every chapter shares never imports a technique.
INFRASTRUCTURE = {f"course_lib.{m}" for m in ("models", "data", "train", "retrieval", "instruct", "memory",
                                              "generation", "surgery", "checks", "atomic_files", "cli", "progress",
                                              "stats")}


def test_infrastructure_never_imports_a_technique():
    graph = import_graph()
    infrastructure = INFRASTRUCTURE | {m for m in MODULES if m.startswith("course_lib.budget")}
    assert infrastructure <= set(MODULES), sorted(infrastructure - set(MODULES))
    techniques = {m for m in MODULES if m not in infrastructure and not m.startswith("course_lib.tooling")}
    techniques.discard("course_lib")
    assert {"course_lib.lora", "course_lib.quant", "course_lib.gradcache"} <= techniques
    wrong = {m: sorted(graph[m] & techniques) for m in infrastructure if graph[m] & techniques}
    assert not wrong, f"infrastructure importing a technique: {wrong}"


def test_budget_imports_go_configs_then_estimate_then_planner():
    graph = import_graph()
    assert not {d for d in graph["course_lib.budget.configs"] if d.startswith("course_lib.budget")}
    assert "course_lib.budget.planner" not in graph["course_lib.budget.estimate"]


@pytest.mark.parametrize("name", sorted(MODULES), ids=str)
def test_module_is_one_idea(name):
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines: split it into two modules, one idea each"


def test_crosscheck_marker_finds_library_comparisons():
    def compares_with_peft():
        from peft import LoraConfig  # noqa: F401

    def compares_with_nothing():
        return 1 + 1

    assert calls_reference_library(compares_with_peft)
    assert not calls_reference_library(compares_with_nothing)
