"""The one exception type users should ever see from milp.

Every problem with user input (a data file, a record, a config key) is raised as a
`MilpError` whose message is a single line naming the file, record or key, so the
entrypoints can print it without a traceback (`exit_with`).
"""

import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

T = TypeVar("T")


class MilpError(Exception):
    """A user-facing error: bad data, bad config, or a missing resource."""

    exit_code = 2


class EnvironmentFault(MilpError):
    """The machine, not the input, stopped the run: a run directory that cannot be
    written (read-only, full, not a directory). Exit status 1."""

    exit_code = 1


def exit_with(err: MilpError) -> NoReturn:
    """End a command on a user error: its one line on stderr, exit status 2 (1 for an
    `EnvironmentFault`)."""
    print(f"milp: error: {err}", file=sys.stderr)
    sys.exit(err.exit_code)


def os_fault(err: OSError) -> EnvironmentFault:
    """An operating-system error of a file operation as one line naming the file."""
    where = f"{err.filename}: " if err.filename else ""
    return EnvironmentFault(f"{where}{err.strerror or err}")


def run_command(command: Callable[[], T], *, reraise: bool = False) -> T:
    """Run a command's body: an unwritable output becomes an `EnvironmentFault`, and a
    user error ends the command as one line (`exit_with`), or is raised on with
    `reraise` (a search trial, which the sweeper records as failed)."""
    try:
        try:
            return command()
        except OSError as err:  # an output that cannot be written (read-only, full)
            raise os_fault(err) from err
    except MilpError as err:
        if reraise:
            raise
        exit_with(err)
