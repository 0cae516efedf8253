"""Files that readers never see half-written: write to a temporary sibling, then rename.

`atomic_write_text` (`atomic_write_bytes`) for one file, `publish_dir` for a directory
built once (a cache that parallel processes may race to build), `replace_dir` for a
directory that replaces an earlier copy (a user's memory saved again). Temporaries are
named `.tmp-*` (`.old-*` for a copy being replaced), so `remove_leftovers` finds those a
killed process left. `file_sha256` is the content hash a run directory's checks use.

`fault_point` marks each step of these writes. It does nothing unless the environment
names a point (`MILP_TEST_KILL_AT`): the fault-injection test (tests/test_faults.py) then
kills the process there with SIGKILL, as a power cut or the OOM killer would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIXES = (".tmp-", ".old-")
KILL_AT = "MILP_TEST_KILL_AT"  # "N" or "N:prefix": SIGKILL at the Nth (matching) point
POINT_LOG = "MILP_TEST_POINT_LOG"  # a file each point's name is appended to
_points_seen = 0


def fault_point(name: str) -> None:
    """A step of a write where a crash must leave the run directory consistent; kills
    this process here when `MILP_TEST_KILL_AT` selects it (tests only)."""
    global _points_seen
    spec, log = os.environ.get(KILL_AT), os.environ.get(POINT_LOG)
    if log:
        with open(log, "a") as out:
            out.write(name + "\n")
    if not spec:
        return
    count, _, prefix = spec.partition(":")
    if name.startswith(prefix):
        _points_seen += 1
        if _points_seen == int(count):
            os.kill(os.getpid(), signal.SIGKILL)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_sha256(paths: Iterable[str | Path], cache: str | Path | None) -> dict[Path, str]:
    """`file_sha256` of each path, remembered in the JSON file `cache` by (real path, size,
    modification time), so a large file is read once, not at every run's start."""
    known: dict[str, str] = {}
    if cache is not None and Path(cache).is_file():
        try:
            known = json.loads(Path(cache).read_text())
        except ValueError:  # a damaged cache only costs hashing again
            known = {}
        known = known if isinstance(known, dict) else {}
    hashes, added = {}, False
    for path in map(Path, paths):
        real = os.path.realpath(path)
        stat = os.stat(real)
        key = f"{real}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in known:
            known[key], added = file_sha256(real), True
        hashes[path] = known[key]
    if cache is not None and added:
        try:
            atomic_write_text(cache, json.dumps(known, indent=0, sort_keys=True))
        except OSError:  # a read-only cache only costs hashing again
            pass
    return hashes


def remove_leftovers(directory: str | Path) -> None:
    """Delete the temporaries (`.tmp-*`, `.old-*`) a killed writer left in `directory`;
    only safe while no other process writes there (the run directory's lock)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name.startswith(TEMP_PREFIXES):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _name(err: BaseException, path: Path) -> None:
    """Let an OS error that names no file (a full disk on write) name the one written."""
    if isinstance(err, OSError) and not err.filename:
        err.filename = str(path)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _publishable(path: Path, directory: bool = False) -> None:
    """Give a temporary file or folder, and a folder's contents (some writers, such as
    safetensors, make their files private), the mode a plainly created one would have."""
    mask = _umask()
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)
    if directory:
        for parent, folders, files in os.walk(path):
            for name in folders:
                os.chmod(os.path.join(parent, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(parent, name), 0o666 & ~mask)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a mix."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`atomic_write_text` for binary content (an image)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        _publishable(Path(temporary))
        fault_point(f"write {path.name}")
        os.replace(temporary, path)
    except BaseException as err:
        Path(temporary).unlink(missing_ok=True)
        _name(err, path)
        raise


@contextmanager
def publish_dir(directory: str | Path, marker: str) -> Iterator[Path]:
    """Build a directory in a temporary sibling, then rename it into place.

    Readers never see a half-written `directory`. If another process (a parallel sweep
    trial) published it first, its copy, recognised by `marker`, is kept.
    """
    directory = Path(directory)
    with _staging(directory) as staging:
        yield staging
        _publishable(staging, directory=True)
        fault_point(f"publish {directory.name}")
        try:
            os.rename(staging, directory)
        except OSError:
            if not (directory / marker).is_file():
                raise


@contextmanager
def replace_dir(directory: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling, then swap it in for `directory`.

    Readers see the previous copy (if any) or the complete new one, never a mix; a crash
    while building leaves the previous copy exactly as it was.
    """
    directory = Path(directory)
    with _staging(directory) as staging:
        try:
            yield staging
            _publishable(staging, directory=True)
            fault_point(f"replace {directory.name}")
            if directory.exists():
                old = Path(tempfile.mkdtemp(prefix=".old-", dir=directory.parent))
                os.rename(directory, old / "x")
                fault_point(f"swap {directory.name}")  # neither copy in place
                os.rename(staging, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(staging, directory)
        except OSError as err:
            _name(err, directory)
            raise


@contextmanager
def _staging(directory: Path) -> Iterator[Path]:
    """A temporary sibling of `directory` to build it in (removed after, whatever
    happened: a renamed one is gone already)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
