"""The import layers of DESIGN.md, checked on the source: every module parsed with `ast`.

- hal/ and sim/ never import lockerd: the daemon sits on the hal, never the other way.
- lockerd/core/ is pure: no services, store, cli or trust, and no library that does I/O or
  crypto; from the hal it takes only the small module of value types it shares with it.
- In lockerd/, only the lockerd/dev/ tools (demo, provisioning) import the simulator.

Every import counts, wherever it is written (inside a function, under TYPE_CHECKING): a
layer is about what a module depends on, not only what it loads at startup.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hal", "sim", "lockerd")

CORE = "lockerd/core/"
DEV = "lockerd/dev/"
# What the core may not depend on: the daemon's I/O layers and the libraries that do I/O or
# crypto (importing a core module must not load cryptography, cbor2 or base45).
CORE_FORBIDDEN = (
    "lockerd.services", "lockerd.store", "lockerd.cli", "lockerd.trust",
    "aiomqtt", "sqlite3", "serial", "cryptography", "cbor2", "base45",
    "hal",
)
# The one hal module the core may import: the pure value types both share (DoorState, ...).
CORE_MAY_IMPORT_FROM_HAL = ("hal.values",)



@dataclass(frozen=True)
class Violation:
    path: str  # relative to the repository, with forward slashes
    line: int
    module: str  # the module imported that the rule forbids
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: imports {self.module} ({self.rule})"


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _module_of(path: str) -> str:
    """`lockerd/core/deposit.py` -> `lockerd.core.deposit`; a package's __init__ is the
    package."""
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(path: str, tree: ast.AST) -> Iterator[tuple[int, list[str]]]:
    """Each import statement as (line, the modules it may name): for `from a import b`, both
    `a` and `a.b` (b may be a submodule); relative imports resolved against `path`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, [alias.name]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _module_of(path).split(".")
                if not path.endswith("__init__.py"):
                    package.pop()
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            yield node.lineno, [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _forbidden(path: str, module: str) -> str | None:
    """The rule `path` breaks by importing `module`, or None."""
    if path.startswith(("hal/", "sim/")) and _within(module, "lockerd"):
        return "hal and sim never import lockerd"
    if path.startswith(CORE):
        for banned in CORE_FORBIDDEN:
            if _within(module, banned) and not any(
                _within(module, allowed) for allowed in CORE_MAY_IMPORT_FROM_HAL
            ):
                return f"lockerd/core is pure: no {banned}"
    if path.startswith("lockerd/") and not path.startswith(DEV) and _within(module, "sim"):
        return "only lockerd/dev imports sim"
    return None


def violations_in(path: str, source: str) -> list[Violation]:
    """What the module at `path` (relative, forward slashes) imports against the layers."""
    found: list[Violation] = []
    for line, candidates in _imported(path, ast.parse(source, filename=path)):
        for module in candidates:
            rule = _forbidden(path, module)
            if rule is not None:
                found.append(Violation(path, line, module, rule))
                break  # `from a import b` breaks a rule once, named by the first match
    return found


def all_violations() -> list[Violation]:
    found: list[Violation] = []
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            path = file.relative_to(ROOT).as_posix()
            found += violations_in(path, file.read_text(encoding="utf-8"))
    return found


def test_every_package_is_scanned() -> None:
    for package in PACKAGES:
        assert (ROOT / package / "__init__.py").is_file()
    assert (ROOT / CORE / "__init__.py").is_file()


def test_no_module_imports_across_the_layers() -> None:
    found = all_violations()
    assert found == [], "imports that break the layers:\n" + "\n".join(map(str, found))


# -- the checker itself, on made-up modules ---------------------------------------------------


@pytest.mark.parametrize(("path", "source", "module"), [
    ("hal/gpio/lines.py", "from lockerd.config import Config\n", "lockerd.config"),
    ("sim/world.py", "import lockerd.store.db as db\n", "lockerd.store.db"),
    ("sim/world.py", "from lockerd import ids\n", "lockerd"),
    ("lockerd/core/bank.py", "import sqlite3\n", "sqlite3"),
    ("lockerd/core/bank.py", "def f():\n    import cryptography.hazmat\n",
     "cryptography.hazmat"),
    ("lockerd/core/bank.py",
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from aiomqtt import Client\n",
     "aiomqtt"),
    ("lockerd/core/bank.py", "from lockerd import services\n", "lockerd.services"),
    ("lockerd/core/bank.py", "from ..store import events\n", "lockerd.store"),
    ("lockerd/core/bank.py", "from .. import trust\n", "lockerd.trust"),
    ("lockerd/core/bank.py", "from hal.registry import HalContext\n", "hal.registry"),
    ("lockerd/core/bank.py", "from hal import DoorState\n", "hal"),
    ("lockerd/core/bank.py", "import serial\n", "serial"),
    ("lockerd/core/bank.py", "import cbor2, base45\n", "cbor2"),
    ("lockerd/services/controller.py", "from sim.world import SimWorld\n", "sim.world"),
    ("lockerd/demo.py", "import sim\n", "sim"),
])
def test_the_checker_finds_each_kind_of_violation(path: str, source: str, module: str) -> None:
    found = violations_in(path, source)
    assert found and found[0].module == module


@pytest.mark.parametrize(("path", "source"), [
    ("lockerd/core/bank.py", "from hal.values import DoorState\n"),
    ("lockerd/core/bank.py", "from lockerd.core.actions import Record\nimport re\n"),
    ("lockerd/core/bank.py", "from . import messages\nfrom .access import Reason\n"),
    ("lockerd/core/bank.py", "from lockerd.ids import COMPARTMENT_ID\n"),
    ("lockerd/dev/demo.py", "from sim.world import SimWorld\n"),
    ("lockerd/services/controller.py", "from hal.base import LockDriver\n"),
    ("sim/backend.py", "from hal.base import LockDriver\n"),
    ("hal/registry.py", "import importlib\n"),
])
def test_the_checker_lets_the_allowed_imports_through(path: str, source: str) -> None:
    assert violations_in(path, source) == []
