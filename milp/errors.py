"""The one exception type users should ever see from milp.

Every problem with user input (a data file, a record, a config key) is raised as a
`MilpError` whose message is a single line naming the file, record or key, so the
entrypoints can print it without a traceback (`exit_with`).
"""

import sys
from typing import NoReturn


class MilpError(Exception):
    """A user-facing error: bad data, bad config, or a missing resource."""


def exit_with(err: MilpError) -> NoReturn:
    """End a command on a user error: its one line on stderr, exit status 2."""
    print(f"milp: error: {err}", file=sys.stderr)
    sys.exit(2)
