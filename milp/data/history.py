"""The generic user-history format: one JSON object per line, one line per user.

```json
{"user_id": "alice",
 "history": [{"prompt": "How was your weekend?", "response": "Grand, went climbing!"}],
 "queries": [{"id": "q1", "prompt": "Any plans tonight?", "response": "Climbing, obviously."}]}
```

`history` is what the memory is trained on (oldest first); `queries` are answered and,
where they carry a `response` (a non-empty string; `null` or absent: not scored),
scored. Ids are opaque strings (or integers), unique within the file; a query without an
`id` is `<user_id>/<index>`. Files are UTF-8.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from milp.data.checks import known_keys, parse_json, record_id, record_text, setting_int
from milp.data.users import HistoryPair, Query, User
from milp.errors import MilpError

# The keys each level of a line may have; any other key is refused (a misspelled
# `response` would leave its query silently unscored).
USER_KEYS = ("user_id", "history", "queries")
ITEM_KEYS = {"history": ("prompt", "response"), "queries": ("id", "prompt", "response")}


def _items(where: str, items: object, key: str) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise MilpError(f"{where}: '{key}' must be a non-empty list")
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise MilpError(f"{where}: {key}[{index}] needs a 'prompt' string")
        known_keys(f"{where}: {key}[{index}]", item, ITEM_KEYS[key], f"{key} item")
        record_text(f"{where}: {key}[{index}]", item["prompt"], "prompt")
    return items


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """The file's lines, numbered from 1, each decoded as UTF-8 (strictly)."""
    with path.open("rb") as lines:
        for line_number, raw in enumerate(lines, start=1):
            try:
                yield line_number, raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise MilpError(
                    f"{path}: line {line_number}: not valid UTF-8 (column {err.start + 1}); "
                    "history files are UTF-8 JSON lines"
                ) from None


def _queries(
    path: Path, line_number: int, user_id: str, items: list[dict], seen: dict[str, str]
) -> list[Query]:
    """The line's queries; `seen` maps the query ids of earlier lines to where they are."""
    queries = []
    for index, item in enumerate(items):
        location = f"line {line_number}: queries[{index}]"
        item_where = f"{path}: {location}"
        query_id = record_id(item_where, item["id"]) if "id" in item else f"{user_id}/{index}"
        if query_id in seen:
            raise MilpError(
                f"{item_where}: duplicate query id {query_id!r} (also {seen[query_id]}); "
                "query ids are unique within the file"
            )
        seen[query_id] = location
        response = item.get("response")
        if response is not None:
            record_text(item_where, response, "response")
        queries.append(Query(query_id, item["prompt"], response))
    return queries


def load_history_users(
    path: str | Path, max_history: int | None = None, max_users: int | None = None
) -> list[User]:
    """Read users from a JSONL history file, validating every line.

    `max_history` keeps each user's most recent items, `max_users` the first users;
    `None` keeps all (values below 1 are refused).
    """
    max_history = setting_int("data.users.max_history", max_history, 1, "all items")
    max_users = setting_int("data.users.max_users", max_users, 1, "all users")
    path = Path(path)
    if not path.is_file():
        raise MilpError(f"{path}: file not found")
    users: list[User] = []
    seen_users: set[str] = set()
    seen_queries: dict[str, str] = {}
    for line_number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}: line {line_number}"
        try:
            record = parse_json(line, where, lines=False)
        except json.JSONDecodeError as err:
            raise MilpError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or "user_id" not in record:
            raise MilpError(f"{where}: missing 'user_id'")
        known_keys(where, record, USER_KEYS, "user")
        user_id = record_id(where, record["user_id"], "user_id")
        if user_id in seen_users:
            raise MilpError(f"{where}: duplicate user_id {user_id!r}")
        seen_users.add(user_id)
        history_items = _items(where, record.get("history"), "history")
        for index, item in enumerate(history_items):
            if not isinstance(item.get("response"), str):
                raise MilpError(f"{where}: history[{index}] needs a 'response' string")
            record_text(f"{where}: history[{index}]", item["response"], "response")
        query_items = _items(where, record.get("queries"), "queries")
        history = [HistoryPair(i["prompt"], i["response"], i["prompt"]) for i in history_items]
        if max_history is not None:
            history = history[-max_history:]
        queries = _queries(path, line_number, user_id, query_items, seen_queries)
        users.append(User(user_id, history, queries, [p.target for p in history]))
    if not users:
        raise MilpError(f"{path}: no users in file")
    return users[:max_users]
