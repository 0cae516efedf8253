"""Validation shared by every data loader and setting: strict JSON, record fields,
numeric settings, gold leaks.

Each check raises a one-line `MilpError` that starts with `where` (the file and record,
or the config key), so a malformed record is refused while loading, before any model
is built.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from json.decoder import JSONObject, scanstring
from json.scanner import py_make_scanner
from typing import Any

from milp.data.users import User
from milp.errors import MilpError


def _shown(value: object, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _HugeInteger(ValueError):
    def __init__(self, digits: int) -> None:
        super().__init__(digits)
        self.digits = digits


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return record


def _integer(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > sys.get_int_max_str_digits():
        raise _HugeInteger(digits)
    return int(text)


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _duplicate_offset(text: str) -> int:
    """Where the first duplicate key (in parse order) starts in `text`. Only called once
    a duplicate is known to exist: it parses again with the pure-Python scanner, which
    lets each object walk its own members with their positions."""

    def parse_object(s_and_end, strict, scan_once, object_hook, pairs_hook, memo=None):
        s, start = s_and_end
        pairs, end = JSONObject(s_and_end, strict, scan_once, None, list, memo)
        if len({k for k, _ in pairs}) != len(pairs):
            seen: set[str] = set()
            position = _WHITESPACE.match(s, start).end()
            while True:  # the members again, to find where the repeated key is
                key, after = scanstring(s, position + 1, strict)
                if key in seen:
                    raise _DuplicateKey(str(position))
                seen.add(key)
                after = _WHITESPACE.match(s, after).end() + 1  # the ':'
                _, after = scan_once(s, _WHITESPACE.match(s, after).end())
                after = _WHITESPACE.match(s, after).end() + 1  # the ','
                position = _WHITESPACE.match(s, after).end()
        return dict(pairs), end

    decoder = json.JSONDecoder()
    decoder.parse_object = parse_object
    decoder.scan_once = py_make_scanner(decoder)
    try:
        decoder.decode(text)
    except _DuplicateKey as found:
        return int(found.key)
    return 0


def parse_json(text: str, where: str, lines: bool = True) -> Any:
    """Parse JSON strictly: a key repeated within an object (JSON parsers keep the last
    one and drop the rest silently), nesting too deep to parse and integers too long to
    convert are refused with one line starting with `where` (and, with `lines`, the line
    of the text). Syntax errors raise `json.JSONDecodeError` for the caller to place."""
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs, parse_int=_integer)
    except _DuplicateKey as duplicate:
        line = text.count("\n", 0, _duplicate_offset(text)) + 1
        at = f"{where}: line {line}" if lines else where
        raise MilpError(f"{at}: duplicate key {duplicate.key!r} in one object") from None
    except _HugeInteger as huge:
        raise MilpError(
            f"{where}: an integer of {huge.digits} digits (at most "
            f"{sys.get_int_max_str_digits()}); write long ids as strings"
        ) from None
    except RecursionError:
        raise MilpError(f"{where}: nested too deeply to parse (lists and objects)") from None


def known_keys(where: str, record: dict, allowed: Collection[str], what: str) -> None:
    """Refuse a key that is not one of `allowed`: a misspelled optional key (`responce`)
    would otherwise be ignored and change what the record means without a word."""
    for key in record:
        if key not in allowed:
            raise MilpError(
                f"{where}: unknown key {_shown(key)} (a {what} has {', '.join(allowed)})"
            )


def _valid_unicode(where: str, value: str, key: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise MilpError(
            f"{where}: {key!r} holds a lone surrogate ({value[err.start]!r} at character "
            f"{err.start}); text must be valid Unicode"
        ) from None


def record_id(where: str, value: object, key: str = "id") -> str:
    """An id read from a data file, as a string.

    Ids are non-empty strings or integers; `null`, lists, objects and booleans are
    refused, since `str()` of them would silently merge or invent ids.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MilpError(f"{where}: {key!r} must be a string or an integer, got {_shown(value)}")
    if isinstance(value, str) and not value.strip():
        raise MilpError(f"{where}: {key!r} is an empty string")
    if isinstance(value, str):
        _valid_unicode(where, value, key)
    return str(value)


def record_text(where: str, value: object, key: str) -> str:
    """A text field of a data record: a string with at least one non-space character."""
    if not isinstance(value, str):
        raise MilpError(f"{where}: {key!r} must be a string, got {_shown(value)}")
    if not value.strip():
        raise MilpError(f"{where}: {key!r} is an empty string")
    _valid_unicode(where, value, key)
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


def setting_number(
    key: str,
    value: object,
    minimum: float,
    maximum: float = math.inf,
    *,
    above_minimum: bool = False,
    integer: bool = False,
    none_means: str | None = None,
) -> float | int | None:
    """A finite number setting in [minimum, maximum] (`above_minimum`: (minimum, maximum]);
    `integer` refuses fractions (2.5, but 2.0 is 2). NaN, infinities, booleans and
    strings are refused; `none_means` allows `null` as `setting_int` does."""
    if value is None and none_means is not None:
        return None
    kind = "an integer" if integer else "a number"
    low, high = (int(b) if float(b).is_integer() else b for b in (minimum, maximum))
    if maximum == math.inf:
        allowed = f"{kind} {'>' if above_minimum else '>='} {low}"
    else:
        allowed = f"{kind} in {'(' if above_minimum else '['}{low}, {high}]"
    allowed += f" or null ({none_means})" if none_means else ""
    number_ok = isinstance(value, int | float) and not isinstance(value, bool)
    if (
        not number_ok
        or not math.isfinite(value)
        or (integer and value % 1)
        or value < minimum
        or (above_minimum and value == minimum)
        or value > maximum
    ):
        raise MilpError(f"{key} must be {allowed}, got {_shown(value)}")
    return int(value) if integer else value


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
