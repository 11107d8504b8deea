"""The import rule of docs/architecture.md: each room imports only from its own room and the rooms
below it, and no module imports itself back through others (imports inside functions count)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

import bdfast

PACKAGE = Path(bdfast.__file__).resolve().parent

# The rooms, bottom up (docs/architecture.md). A module belongs to the longest prefix listed.
ROOMS = {
    "bdfast._version": 0, "bdfast._utils": 0, "bdfast.reference": 0, "bdfast.hooks": 0,
    "bdfast.loaders": 0,
    "bdfast.ops": 1,
    "bdfast.defenses": 2,
    "bdfast.lab": 3,
    "bdfast.interop": 4,
    "bdfast": 5, "bdfast.cli": 5, "bdfast.__main__": 5,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> Dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def level(module: str) -> int:
    prefix = max((p for p in ROOMS if module == p or module.startswith(p + ".")), key=len)
    return ROOMS[prefix]


def imports(module: str, path: Path, known: Set[str]) -> Set[str]:
    """The bdfast modules that ``module`` imports anywhere in its source: ``from pkg import name``
    counts as an import of ``pkg.name`` when that is a module, else of ``pkg``."""
    found: Set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "bdfast")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "bdfast":
                continue
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.add(name if name in known else base)
    return {name for name in found if name != module and name in known}


def graph() -> Dict[str, Set[str]]:
    known = modules()
    return {name: imports(name, path, set(known)) for name, path in known.items()}


def upward_imports(edges: Dict[str, Set[str]]) -> List[str]:
    return sorted(f"{a} (room {level(a)}) imports {b} (room {level(b)})"
                  for a, targets in edges.items() for b in targets if level(b) > level(a))


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    found: List[List[str]] = []

    def visit(node: str, trail: List[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                found.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    return found


def test_every_module_is_in_a_room():
    names = modules()
    assert "bdfast.defenses.medic" in names and "bdfast.lab.trainer" in names
    assert {level(name) for name in names} == set(ROOMS.values())


def test_no_room_imports_from_a_room_above_it():
    assert upward_imports(graph()) == []


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_the_checks_find_what_they_look_for():
    # The checks above pass on an empty answer, so show that they can give another one.
    edges = graph()
    edges["bdfast.defenses.medic"] = edges["bdfast.defenses.medic"] | {"bdfast.lab.trainer"}
    edges["bdfast.ops._extension"] = edges["bdfast.ops._extension"] | {"bdfast.ops.selftest"}
    assert upward_imports(edges) == ["bdfast.defenses.medic (room 2) imports bdfast.lab.trainer "
                                     "(room 3)"]
    assert ["bdfast.ops._extension", "bdfast.ops.selftest", "bdfast.ops._extension"] in [
        cycle[-3:] for cycle in cycles(edges)]


@pytest.mark.parametrize("source, expected", [
    ("from bdfast.lab import models", {"bdfast.lab.models"}),
    ("from bdfast.lab import backdoored", {"bdfast.lab"}),
    ("def f():\n    import bdfast.cli", {"bdfast.cli"}),
    ("from . import medic", {"bdfast.defenses.medic"}),
    ("from .medic import medic_clone", {"bdfast.defenses.medic"}),
])
def test_the_rule_sees_every_form_of_import(tmp_path, source, expected):
    # A rule that missed a form (inside a function, relative, a submodule by name) would pass
    # whatever the code did.
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert imports("bdfast.defenses.probe", path, set(modules())) == expected
