"""The package's floors: each module imports only modules on its own floor or below (the layering
the package docstring and ../shared/design/round-loop.md describe), so the readable algorithm never
depends on the machinery around it. Checked from the source, statically."""

from __future__ import annotations

import ast
from pathlib import Path

import fedlib

PACKAGE = Path(fedlib.__file__).parent
FLOORS = {
    1: ["version", "params", "seeds", "models", "runtime", "files"],
    2: ["data", "partition", "client", "shakespeare", "metrics"],
    3: ["strategies", "privacy", "config"],
    4: ["server"],
    5: ["backends", "engine"],
    6: ["runner", "checkpoint", "reproduce"],
    7: ["cli", "flower", "plotting", "lessons", "__main__"],
}
FLOOR = {name: floor for floor, names in FLOORS.items() for name in names}


def top(module: str) -> str:
    """fedlib.engine.local -> engine; fedlib.server -> server."""
    return module.removeprefix("fedlib.").split(".")[0]


def imports(path: Path) -> set[str]:
    """The fedlib modules a file imports (absolute and relative)."""
    return imports_of(path.read_text(), ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]))


def imports_of(source: str, package: str) -> set[str]:
    """The fedlib modules ``source``, a module of ``package``, imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("fedlib.")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base == "fedlib":
                found |= {f"fedlib.{alias.name}" for alias in node.names}
            elif base.startswith("fedlib."):
                found.add(base)
    return found


def test_every_module_has_a_floor():
    modules = {top(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
    assert modules - {"__init__"} <= set(FLOOR), f"give these a floor: {sorted(modules - set(FLOOR))}"


def upward(own: str, modules: set[str]) -> list[str]:
    """The imports of module ``own`` that reach a floor above its own."""
    return [f"{own} (floor {FLOOR[own]}) imports {m} (floor {FLOOR[top(m)]})" for m in sorted(modules)
            if FLOOR.get(top(m), 0) > FLOOR[own]]


def test_no_module_imports_from_a_floor_above_its_own():
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue                                    # the package root re-exports from every floor
        found += upward(top(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)), imports(path))
    assert not found, "\n".join(found)


def test_the_check_sees_absolute_relative_and_package_imports():
    source = "from fedlib.runner import run\nfrom ..server import rounds\nfrom fedlib import cli\nimport fedlib.reproduce\n"
    modules = imports_of(source, "fedlib.engine")
    assert modules == {"fedlib.runner", "fedlib.server", "fedlib.cli", "fedlib.reproduce"}
    assert len(upward("engine", modules)) == 3 and upward("cli", modules) == []
