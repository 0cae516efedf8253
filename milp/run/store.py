"""The run directory: each finished user's adapters, answers and metrics, written safely.

Layout under the run's output dir:
    fingerprint.txt                  what the results were made with: the configuration,
                                     the base model's files, the users' data (hashes)
    adapters/<user>/memory_<i>/...   peft adapters of the user's memory
    task_memory/                     the task memory (memory.init=task, attribution)
    .hydra/config.yaml               the configuration (Hydra writes it)
    users/<user>.json                the user's answers and metrics, the hashes of its
                                     inputs and of its memory's files (written last: the
                                     marker that the user is done)
    predictions.jsonl, metrics.json  rebuilt from users/ after every user
    attribution.json, attribution.png  does each memory know its owner (milp.attribute)
Every file is written to a temporary name and renamed, so a crash or Ctrl-C leaves
finished users intact. A re-run with the same directory reuses a user's result only while
its inputs hash as recorded and its memory's files hash as recorded; any other user is
trained again. Results of another configuration or base model are refused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
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
from milp.memory.adapters import is_saved_memory, verify_memory
from milp.run.files import atomic_write_text, remove_leftovers

log = logging.getLogger("milp")


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


ADAPTERS, TASK_MEMORY, FINGERPRINT = "adapters", "task_memory", "fingerprint.txt"
RESULTS, METRICS, PREDICTIONS = "users", "metrics.json", "predictions.jsonl"
ATTRIBUTION, ATTRIBUTION_PLOT = "attribution.json", "attribution.png"


def metrics_file(run_dir: str | Path) -> Path:
    """The run's metrics over the users finished so far."""
    return Path(run_dir) / METRICS


def predictions_file(run_dir: str | Path) -> Path:
    """Every finished user's answers, one JSON line each."""
    return Path(run_dir) / PREDICTIONS


def attribution_files(run_dir: str | Path) -> tuple[Path, Path]:
    """The attribution summary (JSON) and its heatmap (PNG) of a run."""
    return Path(run_dir) / ATTRIBUTION, Path(run_dir) / ATTRIBUTION_PLOT


def result_file(run_dir: str | Path, user_id: str) -> Path:
    """A user's result record (written last: the marker that the user is done)."""
    return Path(run_dir) / RESULTS / f"{user_slug(user_id)}.json"


def read_run_file(path: Path) -> dict[str, Any]:
    """One of a run's JSON records (metrics, attribution, a user's result); the error
    names the file when it is missing, is not JSON or holds no JSON object."""
    if not path.is_file():
        raise MilpError(f"{path}: missing (the run did not finish this part)")
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise MilpError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise MilpError(f"{path}: not a JSON object")
    return record


def user_results(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every finished user's result record, in file-name order."""
    return [read_run_file(p) for p in sorted((Path(run_dir) / RESULTS).glob("*.json"))]


def adapters_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its users' memories."""
    return Path(run_dir) / ADAPTERS


def task_memory_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its task memory."""
    return Path(run_dir) / TASK_MEMORY


def user_memory(adapters: str | Path, user_id: str) -> Path | None:
    """The saved memory of `user_id` under a run's adapters/ directory, or None."""
    directory = Path(adapters) / user_slug(user_id)
    return directory if is_saved_memory(directory) else None


def run_config(run_dir: str | Path) -> DictConfig | None:
    """The configuration a run was made with (its Hydra-saved config; `run_dir` may be
    the run's adapters/ directory), if present."""
    run_dir = Path(run_dir)
    for directory in (run_dir, run_dir.parent):
        candidate = directory / ".hydra" / "config.yaml"
        if candidate.is_file():
            return OmegaConf.load(candidate)
    return None


def run_fingerprint(run_dir: str | Path) -> dict[str, str]:
    """The parts of a run's fingerprint.txt ({} where it has none)."""
    return read_fingerprint(Path(run_dir) / FINGERPRINT)


def adapters_root(path: str | Path, key: str) -> Path:
    """The adapters/ directory of a run directory (or `path` itself if it holds the users'
    memories directly); `key` names the setting in the error."""
    path = Path(path)
    root = adapters_dir(path) if adapters_dir(path).is_dir() else path
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


# What fingerprint.txt records (one "<part> <hash>" line each), and what a difference in
# each part means: a configuration or base model of its own refuses the run directory;
# the data only retrains the users whose data changed (their records say which).
FINGERPRINT_PARTS = ("config", "model", "data")
REFUSED_PARTS = {"config": "a different configuration", "model": "a different base model"}


def read_fingerprint(path: Path) -> dict[str, str]:
    """The parts of a fingerprint.txt ({} where there is none or it is not one)."""
    if not path.is_file():
        return {}
    pairs = [line.split(" ", 1) for line in path.read_text().splitlines() if line.strip()]
    return {p[0]: p[1].strip() for p in pairs if len(p) == 2 and p[0] in FINGERPRINT_PARTS}


class RunStore:
    """Reads and writes one run's per-user results under `root`."""

    def __init__(self, root: str | Path, fingerprint: dict[str, str]) -> None:
        """Open `root` for a run with this fingerprint (a hash per `FINGERPRINT_PARTS`);
        writes nothing (see `begin`)."""
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.marker = self.root / FINGERPRINT
        stored = read_fingerprint(self.marker) if self.marker.is_file() else None
        # A fingerprint without any finished user protects nothing: a run that failed
        # before its first result must not block the corrected command.
        if stored is not None and any((self.root / RESULTS).glob("*.json")):
            for part, what in REFUSED_PARTS.items():
                if stored.get(part) != fingerprint[part]:
                    raise MilpError(
                        f"{self.root}: holds results of {what}; use a new output directory "
                        "(hydra.run.dir=...) or delete this one"
                    )
        blob = json.dumps({p: fingerprint[p] for p in REFUSED_PARTS}, sort_keys=True)
        # The part of every user's inputs that all users share.
        self.run_hash = hashlib.sha256(blob.encode()).hexdigest()

    @classmethod
    def reopen(cls, root: str | Path, model: str) -> RunStore:
        """A run's store for a command that adds to its results (`milp.attribute`): the
        configuration and data it recorded, and `model` (a `model_identity`), which must
        be the base model its results were made with."""
        stored = run_fingerprint(root)
        return cls(root, {p: stored.get(p, "") for p in FINGERPRINT_PARTS} | {"model": model})

    def begin(self) -> None:
        """Record the run's fingerprint, before its first result is written."""
        text = "".join(f"{part} {self.fingerprint[part]}\n" for part in FINGERPRINT_PARTS)
        if not self.marker.is_file() or self.marker.read_text() != text:
            atomic_write_text(self.marker, text)

    def remove_leftovers(self) -> None:
        """Delete the temporaries a killed run left (only while holding the run alone)."""
        for directory in (self.root, self.root / RESULTS, adapters_dir(self.root)):
            remove_leftovers(directory)

    def adapter_dir(self, user: User) -> Path:
        return adapters_dir(self.root) / user.slug

    def _result_path(self, user_id: str) -> Path:
        return result_file(self.root, user_id)

    def is_done(self, user: User) -> bool:
        """Whether this user's results were written by an earlier (possibly crashed) run."""
        return self._result_path(user.user_id).is_file()

    def load_result(self, user: User) -> dict[str, Any]:
        """The user's stored result record."""
        path = self._result_path(user.user_id)
        result = read_run_file(path)
        if result.get("user_id") != user.user_id:  # a name shared by two ids, never reused
            raise MilpError(f"{path}: holds user {result.get('user_id')!r}, not {user.user_id!r}")
        return result

    def inputs(self, user: User, data: str, start_memory: str | None) -> dict[str, Any]:
        """What a user's result is made from, as its record stores it: the run (config and
        base model), the user's data (`user_hash`), the memory it starts from (its
        `memory_digest`; None: fresh modules)."""
        return {"run": self.run_hash, "data": data, "start_memory": start_memory}

    def reusable(self, user: User, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """The user's stored result where it can stand for training the user again: made
        from these `inputs`, with a memory whose files all hash as recorded; else None,
        with one log line saying why the user is trained again."""
        path = self._result_path(user.user_id)
        if not path.is_file():
            return None
        if _read_record(path) is None:
            log.warning("user %s: %s is not a result record; training it again", user.user_id, path)
            return None
        result = self.load_result(user)
        stored = result.get("inputs") or {}
        changed = [key for key in inputs if stored.get(key) != inputs[key]]
        if changed:
            log.info(
                "user %s: its %s changed since its stored result; training it again",
                user.user_id,
                " and ".join(changed),
            )
            return None
        if result.get("memory_sha256") is not None:
            try:
                verify_memory(self.adapter_dir(user), result["memory_sha256"])
            except MilpError as err:
                log.warning("user %s: %s; training it again", user.user_id, err)
                return None
        return result

    def save_result(self, result: dict[str, Any]) -> None:
        """Write a user's result record (the marker that the user is done)."""
        atomic_write_text(self._result_path(result["user_id"]), json.dumps(result, indent=1))

    def write_outputs(self, results: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        """Rewrite the run-level files from the per-user results gathered so far."""
        lines = [json.dumps(p) for r in results for p in r["predictions"]]
        text = "\n".join(lines) + "\n" if lines else ""
        atomic_write_text(predictions_file(self.root), text)
        atomic_write_text(metrics_file(self.root), json.dumps(summary, indent=2))


def recorded_memory(adapters: Path, user_id: str) -> dict[str, str] | None:
    """The SHA-256 of a user's memory files as their run's result record lists them, for
    a reader of `adapters` (a run's adapters/ directory); None where there is no record."""
    if adapters.name != ADAPTERS:
        return None
    path = result_file(adapters.parent, user_id)
    if not path.is_file():
        return None
    result = read_run_file(path)
    hashes = result.get("memory_sha256")
    return hashes if isinstance(hashes, dict) else None


def _read_record(path: Path) -> dict[str, Any] | None:
    """A result record's JSON object; None where the file holds none."""
    try:
        result = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    return result if isinstance(result, dict) else None
