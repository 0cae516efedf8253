"""Every module imports on its own, as the first import of a fresh interpreter: no
import cycle hides behind the order in which other modules happen to load. And the
layout tells commands from library: `milp/`'s top level holds the commands and the
error type, and no library module imports a command."""

import ast
import subprocess
import sys

import pytest
from conftest import ROOT

MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for package in ("milp", "hydra_plugins")
    for path in (ROOT / package).rglob("*.py")
)


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_module_imports_first(module):
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


COMMANDS = {"train", "attribute", "generate"}


def test_top_level_holds_the_commands_and_the_error_type():
    top = {path.stem for path in (ROOT / "milp").glob("*.py")}
    assert top == COMMANDS | {"__init__", "errors"}


def _imported(path):
    """Every module a file imports, as dotted names (`from a import b` gives a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_library_module_imports_a_command():
    commands = {f"milp.{name}" for name in COMMANDS}
    library = [
        path
        for folder in ("milp", "hydra_plugins", "experiments")
        for path in (ROOT / folder).rglob("*.py")
        if path.parent != ROOT / "milp" or path.stem not in COMMANDS
    ]
    importing = {
        str(path.relative_to(ROOT)): sorted(_imported(path) & commands)
        for path in library
        if _imported(path) & commands
    }
    assert importing == {}
