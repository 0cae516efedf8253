"""Every module imports on its own, as the first import of a fresh interpreter: no
import cycle hides behind the order in which other modules happen to load."""

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
