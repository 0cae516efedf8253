"""The run directory: each finished user's adapters, answers and metrics, written safely.

Layout under the run's output dir:
    adapters/<user>/memory_<i>/...   peft adapters of the user's memory
    users/<user>.json                the user's answers and metrics (written last: the
                                     marker that the user is done)
    predictions.jsonl, metrics.json  rebuilt from users/ after every user
Every file is written to a temporary name and renamed, so a crash or Ctrl-C leaves
finished users intact, and a re-run with the same directory skips them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from milp.data.users import User, user_slug
from milp.errors import MilpError
from milp.files import atomic_write_text


def adapters_root(path: str | Path, key: str) -> Path:
    """The adapters/ directory of a run directory (or `path` itself if it holds the users'
    memories directly); `key` names the setting in the error."""
    path = Path(path)
    root = path / "adapters" if (path / "adapters").is_dir() else path
    if not root.is_dir():
        raise MilpError(f"{key}={path}: no such directory")
    return root


def config_fingerprint(config: dict[str, Any]) -> str:
    """A short hash of the settings that decide a user's results."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunStore:
    """Reads and writes one run's per-user results under `root`."""

    def __init__(self, root: str | Path, fingerprint: str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / "fingerprint.txt"
        if marker.is_file() and marker.read_text().strip() != fingerprint:
            raise MilpError(
                f"{self.root}: holds results of a different configuration; use a new output "
                "directory (hydra.run.dir=...) or delete this one"
            )
        if not marker.is_file():
            atomic_write_text(marker, fingerprint + "\n")

    def adapter_dir(self, user: User) -> Path:
        return self.root / "adapters" / user.slug

    def _result_path(self, user_id: str) -> Path:
        return self.root / "users" / f"{user_slug(user_id)}.json"

    def is_done(self, user: User) -> bool:
        """Whether this user's results were written by an earlier (possibly crashed) run."""
        return self._result_path(user.user_id).is_file()

    def load_result(self, user: User) -> dict[str, Any]:
        return json.loads(self._result_path(user.user_id).read_text())

    def save_result(self, result: dict[str, Any]) -> None:
        atomic_write_text(self._result_path(result["user_id"]), json.dumps(result, indent=1))

    def write_outputs(self, results: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        """Rewrite the run-level files from the per-user results gathered so far."""
        lines = [json.dumps(p) for r in results for p in r["predictions"]]
        atomic_write_text(self.root / "predictions.jsonl", "\n".join(lines) + "\n" if lines else "")
        atomic_write_text(self.root / "metrics.json", json.dumps(summary, indent=2))
