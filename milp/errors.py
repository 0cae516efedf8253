"""The one exception type users should ever see from milp.

Every problem with user input (a data file, a record, a config key) is raised as a
`MilpError` whose message is a single line naming the file, record or key, so the
entrypoints can print it without a traceback.
"""


class MilpError(Exception):
    """A user-facing error: bad data, bad config, or a missing resource."""
