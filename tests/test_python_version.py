"""course_lib runs on Python 3.10, the oldest version pyproject.toml accepts (``requires-python``).

Each module is parsed with the 3.10 grammar (``except*``, PEP 695 generics and other newer syntax
fail), and its imports are checked against the names the standard library added in 3.11 or later,
which the grammar cannot see. The list is short and explicit, one reason per name; the CI's
Python is newer than 3.10, so without this test such an import would pass everywhere but a learner's
older Python.
"""

import ast
from pathlib import Path

import pytest

import course_lib

NEW_IN_311_OR_LATER = {
    "typing": {
        "Self": "3.11 (PEP 673); annotate with the class name under `from __future__ import annotations`",
        "Never": "3.11; use NoReturn",
        "LiteralString": "3.11 (PEP 675)",
        "assert_never": "3.11", "assert_type": "3.11", "reveal_type": "3.11",
        "Required": "3.11 (PEP 655)", "NotRequired": "3.11 (PEP 655)",
        "TypeVarTuple": "3.11 (PEP 646)", "Unpack": "3.11 (PEP 646)",
        "dataclass_transform": "3.11 (PEP 681)", "get_overloads": "3.11", "clear_overloads": "3.11",
        "override": "3.12 (PEP 698)", "TypeAliasType": "3.12 (PEP 695)", "ReadOnly": "3.13 (PEP 705)",
        "TypeIs": "3.13 (PEP 742)",
    },
    "enum": {"StrEnum": "3.11", "ReprEnum": "3.11", "EnumCheck": "3.11", "verify": "3.11", "member": "3.11",
             "nonmember": "3.11", "global_enum": "3.11"},
    "datetime": {"UTC": "3.11; use datetime.timezone.utc"},
    "asyncio": {"TaskGroup": "3.11", "timeout": "3.11", "Runner": "3.11"},
    "contextlib": {"chdir": "3.11"},
}
NEW_MODULES = {"tomllib": "3.11; read TOML with the tomli package on 3.10"}
MODULES = sorted(Path(course_lib.__file__).parent.rglob("*.py"))


def problems(source: str, filename: str = "<source>") -> list[str]:
    """What in ``source`` needs Python 3.11 or later: a syntax error under the 3.10 grammar, or an
    import (or ``module.name`` use) of a name from `NEW_IN_311_OR_LATER` / `NEW_MODULES`."""
    try:
        tree = ast.parse(source, filename, feature_version=(3, 10))
    except SyntaxError as error:
        return [f"{filename}:{error.lineno}: not Python 3.10 syntax: {error.msg}"]
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in NEW_MODULES:
                    found.append(f"{filename}:{node.lineno}: import {alias.name} ({NEW_MODULES[alias.name]})")
                if alias.name in NEW_IN_311_OR_LATER:
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            if node.module in NEW_MODULES:
                found.append(f"{filename}:{node.lineno}: from {node.module} ({NEW_MODULES[node.module]})")
            new = NEW_IN_311_OR_LATER.get(node.module, {})
            found += [f"{filename}:{node.lineno}: from {node.module} import {a.name} (new in {new[a.name]})"
                      for a in node.names if a.name in new]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            module = aliases[node.value.id]
            if node.attr in NEW_IN_311_OR_LATER[module]:
                found.append(f"{filename}:{node.lineno}: {module}.{node.attr} "
                             f"(new in {NEW_IN_311_OR_LATER[module][node.attr]})")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_module_runs_on_python_3_10(path):
    assert problems(path.read_text(encoding="utf-8"), path.name) == []


@pytest.mark.parametrize("source", [
    "from typing import Self",
    "import typing\ndef f() -> typing.Self: ...",
    "from enum import StrEnum",
    "import datetime as dt\nnow = dt.UTC",
    "import tomllib",
    "try:\n    pass\nexcept* ValueError:\n    pass",
])
def test_the_check_finds_what_3_10_lacks(source):
    assert problems(source)
