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

import fcntl
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from milp.data.users import User, user_slug
from milp.errors import MilpError
from milp.files import atomic_write_text


class WritableRunDir(Callback):
    """Hydra callback (`hydra.callbacks` in conf/): before Hydra writes its config and log
    into the run directory, check that files can be created there, so a read-only or
    misplaced `hydra.run.dir` is one `milp: error:` line (exit 1), not a traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        directory = Path(str(OmegaConf.select(config, "hydra.run.dir")))
        try:
            directory.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(prefix=".probe-", dir=directory)
            os.close(handle)
            os.unlink(probe)
        except OSError as err:
            print(
                f"milp: error: hydra.run.dir={directory}: cannot write there "
                f"({err.strerror or err})",
                file=sys.stderr,
            )
            sys.exit(1)


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


LOCK_FILE = "run.lock"


def _take(path: Path, mode: int, root: Path) -> int:
    """`mode` (LOCK_EX or LOCK_SH) on `path` without waiting, then our pid in the file;
    refused with the holder's pid. The kernel drops the lock when its process ends, so
    the file of a killed run blocks nothing."""
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(handle, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(handle, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(handle)
        raise MilpError(
            f"{root}: another milp run (pid {holder}) is writing to this run directory; "
            "wait for it to end or use another hydra.run.dir"
        ) from None
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
    return handle


@contextmanager
def run_lock(root: str | Path, rank: int = 0, world_size: int = 1) -> Iterator[None]:
    """Hold the run directory for one run: `run.lock` exclusively (`fcntl.flock`), or,
    for the processes of one distributed run, shared, plus `run.lock.<rank>` exclusively
    (so a second launch is refused at its first rank and a single process at any)."""
    root = Path(root)
    handles = []
    try:
        if world_size > 1:
            handles.append(_take(root / LOCK_FILE, fcntl.LOCK_SH, root))
            handles.append(_take(root / f"{LOCK_FILE}.{rank}", fcntl.LOCK_EX, root))
        else:
            handles.append(_take(root / LOCK_FILE, fcntl.LOCK_EX, root))
        yield
    finally:
        for handle in handles:
            os.close(handle)  # closing the last descriptor releases the lock


class RunStore:
    """Reads and writes one run's per-user results under `root`."""

    def __init__(self, root: str | Path, fingerprint: str) -> None:
        """Open `root` for a run with this fingerprint; writes nothing (see `begin`)."""
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.marker = self.root / "fingerprint.txt"
        stored = self.marker.read_text().strip() if self.marker.is_file() else None
        # A fingerprint without any finished user protects nothing: a run that failed
        # before its first result must not block the corrected command.
        if stored not in (None, fingerprint) and any((self.root / "users").glob("*.json")):
            raise MilpError(
                f"{self.root}: holds results of a different configuration; use a new output "
                "directory (hydra.run.dir=...) or delete this one"
            )

    def begin(self) -> None:
        """Record the run's fingerprint, before its first result is written."""
        if not self.marker.is_file() or self.marker.read_text().strip() != self.fingerprint:
            atomic_write_text(self.marker, self.fingerprint + "\n")

    def adapter_dir(self, user: User) -> Path:
        return self.root / "adapters" / user.slug

    def _result_path(self, user_id: str) -> Path:
        return self.root / "users" / f"{user_slug(user_id)}.json"

    def is_done(self, user: User) -> bool:
        """Whether this user's results were written by an earlier (possibly crashed) run."""
        return self._result_path(user.user_id).is_file()

    def load_result(self, user: User) -> dict[str, Any]:
        path = self._result_path(user.user_id)
        result = json.loads(path.read_text())
        if result.get("user_id") != user.user_id:  # a name shared by two ids, never reused
            raise MilpError(f"{path}: holds user {result.get('user_id')!r}, not {user.user_id!r}")
        return result

    def save_result(self, result: dict[str, Any]) -> None:
        atomic_write_text(self._result_path(result["user_id"]), json.dumps(result, indent=1))

    def write_outputs(self, results: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        """Rewrite the run-level files from the per-user results gathered so far."""
        lines = [json.dumps(p) for r in results for p in r["predictions"]]
        atomic_write_text(self.root / "predictions.jsonl", "\n".join(lines) + "\n" if lines else "")
        atomic_write_text(self.root / "metrics.json", json.dumps(summary, indent=2))
