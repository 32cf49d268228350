"""Layers point one way: `machinery` (the generic watch machinery) imports nothing of
fabric_operator outside itself, so the LLMBackend controller builds on it and never the
reverse."""

from __future__ import annotations

import ast
from pathlib import Path

import fabric_operator.autoscaler
import fabric_operator.machinery

MACHINERY = Path(fabric_operator.machinery.__file__).parent


def imported(path: Path) -> set[str]:
    """Modules a file imports from, relative imports resolved (the package is
    fabric_operator.machinery: `..x` is fabric_operator.x)."""
    package = ["fabric_operator", "machinery"]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package[: len(package) + 1 - node.level] if node.level else []
            base = ".".join([*parts, *([node.module] if node.module else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_machinery_imports_nothing_of_the_operator_outside_itself() -> None:
    modules = sorted(MACHINERY.glob("*.py"))
    assert len(modules) > 5
    upward = {
        f"{path.name}: {name}"
        for path in modules
        for name in imported(path)
        if name.split(".")[0] == "fabric_operator"
        and not name.startswith("fabric_operator.machinery")
    }
    assert not upward, upward


# The autoscaler's decision is pure, so that every rule is tested with a fake clock.
PURE_AUTOSCALER = ("policy.py", "window.py")
IO_MODULES = ("kubernetes", "kopf", "aiohttp", "httpx", "asyncio", "socket", "time")


def test_the_autoscaling_decision_does_no_io() -> None:
    package = Path(fabric_operator.autoscaler.__file__).parent
    found = {
        f"{name}: {module}"
        for name in PURE_AUTOSCALER
        for module in imported(package / name)
        if module.split(".")[0] in IO_MODULES
        or module.startswith(("fabric_operator.controller", "fabric_operator.machinery"))
        or module.startswith("fabric_operator.gateway")
    }
    assert not found, found
