"""The ``sweep`` config group of milp's apps, read from the top-level ``sweeps/`` folder.

``conf/train.yaml`` lists ``milp-sweeps://sweeps`` in ``hydra.searchpath``; this module
registers that scheme with Hydra (a ``ConfigSource`` plugin, found by Hydra's plugin scan).
The source shows the folder's ``*.yaml`` files as the group ``sweep``, so
``+sweep=milp_bo`` selects ``sweeps/milp_bo.yaml`` from any working directory, without a
``conf/sweep`` link (links break on Windows and in zip checkouts).

Where the folder is: an absolute path is used as is; a relative one (``sweeps``) is
relative to the directory holding the ``milp`` package, i.e. the checkout root of an
editable install (``make install``), whatever the working directory. A non-editable
install (``pip install .``) ships the packages ``milp`` and ``hydra_plugins`` only, not
``conf/`` nor ``sweeps/``: milp's configs, these included, are read from a checkout. A
missing folder makes Hydra warn that the source is not available.

Import-cheap on purpose (Hydra imports every module under ``hydra_plugins`` in every app):
Hydra and OmegaConf only, and no ``from __future__ import annotations``.
"""

import importlib.util
import os
from pathlib import Path

from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from omegaconf import OmegaConf

#: The config group the folder's files form.
GROUP = "sweep"


def checkout_root() -> Path | None:
    """The directory holding the ``milp`` package (found without importing it)."""
    spec = importlib.util.find_spec("milp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve().parent


class SweepsConfigSource(ConfigSource):
    """``milp-sweeps://<folder>``: the folder's configs as the group ``sweep``."""

    def __init__(self, provider: str, path: str) -> None:
        super().__init__(provider=provider, path=path)
        folder = Path(self.path)
        root = checkout_root()
        if not folder.is_absolute() and root is not None:
            folder = root / folder
        self.folder = folder

    @staticmethod
    def scheme() -> str:
        """The URL scheme of ``hydra.searchpath`` entries this source reads."""
        return "milp-sweeps"

    def _target(self, config_path: str) -> Path | None:
        """The file or folder that ``config_path`` names; None outside the group."""
        parts = [p for p in config_path.split("/") if p]
        if not parts or parts[0] != GROUP:
            return None
        return self.folder.joinpath(*parts[1:])

    def available(self) -> bool:
        """True if the folder exists."""
        return self.folder.is_dir()

    def is_group(self, config_path: str) -> bool:
        """The root (holding the group) and ``sweep`` (and any sub-folder) are groups."""
        if not [p for p in config_path.split("/") if p]:
            return self.available()
        target = self._target(config_path)
        return target is not None and target.is_dir()

    def is_config(self, config_path: str) -> bool:
        """``sweep/<name>`` is a config if ``<folder>/<name>.yaml`` is a file."""
        target = self._target(self._normalize_file_name(config_path))
        return target is not None and target.is_file()

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        """Groups and configs under ``config_path`` (the root lists just ``sweep``)."""
        if not [p for p in config_path.split("/") if p]:
            wanted = results_filter in (None, ObjectType.GROUP)
            return [GROUP] if wanted and self.available() else []
        target = self._target(config_path)
        if target is None or not target.is_dir():
            return []
        files: list[str] = []
        for name in os.listdir(target):
            self._list_add_result(
                files=files,
                file_path=f"{config_path.rstrip('/')}/{name}",
                file_name=name,
                results_filter=results_filter,
            )
        return sorted(set(files))

    def load_config(self, config_path: str) -> ConfigResult:
        """The YAML file behind ``sweep/<name>``, with its ``# @package`` header."""
        target = self._target(self._normalize_file_name(config_path))
        if target is None or not target.is_file():
            raise ConfigLoadError(f"Config not found : {target or config_path}")
        text = target.read_text(encoding="utf-8")
        return ConfigResult(
            config=OmegaConf.create(text),
            path=f"{self.scheme()}://{self.folder}",
            provider=self.provider,
            header=ConfigSource._get_header_dict(text[:512]),
        )
