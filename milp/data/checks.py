"""Validation shared by every data loader: record fields, data settings, gold leaks.

Each check raises a one-line `MilpError` that starts with `where` (the file and record,
or the config key), so a malformed record is refused while loading, before any model
is built.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from milp.data.users import User
from milp.errors import MilpError


def _shown(value: object, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def record_id(where: str, value: object, key: str = "id") -> str:
    """An id read from a data file, as a string.

    Ids are non-empty strings or integers; `null`, lists, objects and booleans are
    refused, since `str()` of them would silently merge or invent ids.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MilpError(f"{where}: {key!r} must be a string or an integer, got {_shown(value)}")
    if isinstance(value, str) and not value.strip():
        raise MilpError(f"{where}: {key!r} is an empty string")
    return str(value)


def record_text(where: str, value: object, key: str) -> str:
    """A text field of a data record: a string with at least one non-space character."""
    if not isinstance(value, str):
        raise MilpError(f"{where}: {key!r} must be a string, got {_shown(value)}")
    if not value.strip():
        raise MilpError(f"{where}: {key!r} is an empty string")
    return value


def setting_int(key: str, value: object, minimum: int, none_means: str | None = None) -> int | None:
    """An integer setting that must be >= `minimum`.

    `none_means` documents what `null` stands for (e.g. "all"); without it `null` is
    refused. Booleans are refused although Python counts them as integers.
    """
    if value is None and none_means is not None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (f" or null ({none_means})" if none_means else "")
        raise MilpError(f"{key} must be {allowed}, got {_shown(value)}")
    return value


def normalize(text: str) -> str:
    """Text compared without regard to case or whitespace."""
    return " ".join(text.split()).casefold()


@dataclass(frozen=True)
class GoldLeaks:
    """Queries whose gold output appears verbatim in the same user's history.

    The history is what the memory is trained on and what retrieval-in-prompt draws
    from, so such a query is answered from a copy of its own gold.
    """

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The form written to metrics.json."""
        return {"count": self.count, "examples": self.examples}


def find_gold_leaks(users: Iterable[User], max_examples: int = 3) -> GoldLeaks:
    """Queries whose gold equals (see `normalize`) a target or source of their user's history."""
    count, examples = 0, []
    for user in users:
        seen = {normalize(t) for pair in user.history for t in (pair.target, pair.source) if t}
        for query in user.queries:
            if query.gold is not None and normalize(query.gold) in seen:
                count += 1
                if len(examples) < max_examples:
                    examples.append(
                        f"user {user.user_id!r} query {query.id!r} gold {_shown(query.gold)}"
                    )
    return GoldLeaks(count, examples)
