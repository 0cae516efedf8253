"""The generic user-history format: one JSON object per line, one line per user.

```json
{"user_id": "alice",
 "history": [{"prompt": "How was your weekend?", "response": "Grand, went climbing!"}],
 "queries": [{"id": "q1", "prompt": "Any plans tonight?", "response": "Climbing, obviously."}]}
```

`history` is what the memory is trained on (oldest first); `queries` are answered and,
where they carry a `response`, scored. Ids are opaque strings.
"""

from __future__ import annotations

import json
from pathlib import Path

from milp.data.users import HistoryPair, Query, User
from milp.errors import MilpError


def _pairs(where: str, items: object, key: str) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise MilpError(f"{where}: '{key}' must be a non-empty list")
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise MilpError(f"{where}: {key}[{index}] needs a 'prompt' string")
    return items


def load_history_users(
    path: str | Path, max_history: int | None = None, max_users: int | None = None
) -> list[User]:
    """Read users from a JSONL history file, validating every line."""
    path = Path(path)
    if not path.is_file():
        raise MilpError(f"{path}: file not found")
    users: list[User] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise MilpError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or "user_id" not in record:
                raise MilpError(f"{where}: missing 'user_id'")
            user_id = str(record["user_id"])
            if user_id in seen:
                raise MilpError(f"{where}: duplicate user_id {user_id!r}")
            seen.add(user_id)
            history_items = _pairs(where, record.get("history"), "history")
            for index, item in enumerate(history_items):
                if not isinstance(item.get("response"), str):
                    raise MilpError(f"{where}: history[{index}] needs a 'response' string")
            query_items = _pairs(where, record.get("queries"), "queries")
            history = [HistoryPair(i["prompt"], i["response"], i["prompt"]) for i in history_items]
            if max_history is not None:
                history = history[-max_history:]
            queries = [
                Query(str(q.get("id", f"{user_id}/{i}")), q["prompt"], q.get("response"))
                for i, q in enumerate(query_items)
            ]
            users.append(User(user_id, history, queries, [p.target for p in history]))
    if not users:
        raise MilpError(f"{path}: no users in file")
    return users[:max_users] if max_users else users
