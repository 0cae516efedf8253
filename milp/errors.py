"""The one exception type users should ever see from milp.

Every problem with user input (a data file, a record, a config key) is raised as a
`MilpError` whose message is a single line naming the file, record or key, so the
entrypoints can print it without a traceback (`exit_with`).
"""

import sys
from typing import NoReturn


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
