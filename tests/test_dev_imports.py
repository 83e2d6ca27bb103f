"""The daemon package stays free of the simulator: only lockerd/dev/ may import `sim`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

LOCKERD = Path(__file__).resolve().parent.parent / "lockerd"
DEV = LOCKERD / "dev"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module an `import` or `from ... import` names in a file, with its line."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def is_sim(module: str) -> bool:
    return module == "sim" or module.startswith("sim.")


def test_only_the_dev_package_imports_sim() -> None:
    offenders = [
        f"{path.relative_to(LOCKERD.parent)}:{line} imports {module}"
        for path in sorted(LOCKERD.rglob("*.py"))
        if DEV not in path.parents
        for line, module in imported_modules(path)
        if is_sim(module)
    ]
    assert offenders == []


def test_the_dev_package_is_where_sim_is_used() -> None:
    # The check above would pass vacuously if the scan found nothing at all.
    uses = [module for path in DEV.rglob("*.py") for _line, module in imported_modules(path)]
    assert any(is_sim(module) for module in uses)
