"""Files that readers never see half-written: write to a temporary sibling, then rename.

`atomic_write_text` (`atomic_write_bytes`) for one file, `publish_dir` for a directory
built once (a cache that parallel processes may race to build), `replace_dir` for a
directory that replaces an earlier copy (a user's memory saved again).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that readers see the old content or the new, never a mix."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`atomic_write_text` for binary content (an image)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextmanager
def publish_dir(directory: str | Path, marker: str) -> Iterator[Path]:
    """Build a directory in a temporary sibling, then rename it into place.

    Readers never see a half-written `directory`. If another process (a parallel sweep
    trial) published it first, its copy, recognised by `marker`, is kept.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        yield staging
        try:
            os.rename(staging, directory)
        except OSError:
            if not (directory / marker).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def replace_dir(directory: str | Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling, then swap it in for `directory`.

    Readers see the previous copy (if any) or the complete new one, never a mix; a crash
    while building leaves the previous copy exactly as it was.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        yield staging
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=".old-", dir=directory.parent))
            os.rename(directory, old / "x")
            os.rename(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
