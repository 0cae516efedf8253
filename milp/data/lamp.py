"""Reading LaMP files: questions (with user profiles) and gold outputs.

Schema (as published by the LaMP benchmark):
- `{split}_questions.json`: `[{"id", "input", "profile": [{"id", ...task fields, "date"?}],
  "user_id"?}]`. In the user-based split every question is its own user; time-based
  files may carry `user_id`, and a user then has several questions.
- `{split}_outputs.json`: `{"task": "LaMP_4", "golds": [{"id", "output"}]}`.

Each generation task says how a profile item becomes a (prompt, target) pair for
memory injection; the query prompt is the question's `input`, as LaMP writes it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milp.data.users import HistoryPair, Query, User
from milp.errors import MilpError


@dataclass(frozen=True)
class LampTask:
    """A LaMP generation task: the profile fields it needs and how items become pairs."""

    name: str
    item_fields: tuple[str, ...]
    to_pair: Callable[[dict[str, Any]], HistoryPair]


def _headline_pair(item: dict[str, Any]) -> HistoryPair:
    return HistoryPair(
        prompt=f"Generate a headline for the following article: {item['text']}",
        target=item["title"],
        source=item["text"],
    )


def _title_pair(item: dict[str, Any]) -> HistoryPair:
    return HistoryPair(
        prompt=f"Generate a title for the following abstract of a paper: {item['abstract']}",
        target=item["title"],
        source=item["abstract"],
    )


def _tweet_pair(item: dict[str, Any]) -> HistoryPair:
    # LaMP-7 profiles hold only the user's tweets, with no source to paraphrase from,
    # so the memory learns the user's way of writing a tweet from a fixed instruction.
    return HistoryPair(prompt="Write a tweet in your own words:", target=item["text"])


def _reply_pair(item: dict[str, Any]) -> HistoryPair:
    # Chat replies (milp/data/chitchat.py): the message replied to -> the user's reply.
    return HistoryPair(prompt=item["context"], target=item["text"], source=item["context"])


TASKS: dict[str, LampTask] = {
    "LaMP_4": LampTask("LaMP_4", ("text", "title"), _headline_pair),
    "LaMP_5": LampTask("LaMP_5", ("abstract", "title"), _title_pair),
    "LaMP_7": LampTask("LaMP_7", ("text",), _tweet_pair),
    "chitchat": LampTask("chitchat", ("context", "text"), _reply_pair),
}


def get_task(name: str) -> LampTask:
    """Look a task up by any usual spelling: `LaMP-4`, `LaMP_4`, `lamp4`, `4`."""
    match = re.fullmatch(r"(?:lamp)?[-_ ]?(\d+)", str(name).strip().lower())
    key = f"LaMP_{match.group(1)}" if match else str(name).strip().lower()
    if key not in TASKS:
        raise MilpError(
            f"data.task: unknown LaMP task {name!r}; supported generation tasks: "
            + ", ".join(TASKS)
        )
    return TASKS[key]


def read_json(path: Path) -> Any:
    """Parse a JSON file, turning every way it can be wrong into a one-line MilpError."""
    if not path.is_file():
        raise MilpError(f"{path}: file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("<"):
        raise MilpError(f"{path}: looks like an HTML page, not JSON (check the download URL)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise MilpError(
            f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None


def _date_key(item: dict[str, Any]) -> tuple[int, str]:
    # Dates are ints in some files and YYYY-MM-DD strings in others; both sort as text
    # once ints are zero-padded, and items without a date keep their file order.
    date = item.get("date")
    if date is None:
        return (0, "")
    return (1, f"{date:020d}" if isinstance(date, int) else str(date))


def _check_question(path: Path, index: int, record: Any, task: LampTask) -> None:
    where = f"{path}: record {index}"
    if not isinstance(record, dict):
        raise MilpError(f"{where}: expected an object, got {type(record).__name__}")
    if "id" not in record:
        raise MilpError(f"{where}: missing 'id'")
    where = f"{path}: record {index} (id={record['id']!r})"
    if not isinstance(record.get("input"), str):
        raise MilpError(f"{where}: missing 'input' (a string)")
    profile = record.get("profile")
    if not isinstance(profile, list):
        raise MilpError(f"{where}: missing 'profile' (a list of history items)")
    if not profile:
        raise MilpError(f"{where}: empty 'profile' (no user history to inject)")
    for item_index, item in enumerate(profile):
        if not isinstance(item, dict):
            raise MilpError(f"{where}: profile item {item_index} is not an object")
        for key in task.item_fields:
            if not isinstance(item.get(key), str):
                raise MilpError(
                    f"{where}: profile item {item_index} misses {key!r} "
                    f"(task {task.name} needs {', '.join(task.item_fields)})"
                )


def read_golds(path: Path, task: LampTask) -> dict[str, str]:
    """Read an outputs file into {question id: gold output}."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise MilpError(f"{path}: expected an object with a 'golds' list")
    file_task = data.get("task")
    if file_task is not None and get_task(file_task).name != task.name:
        raise MilpError(f"{path}: holds golds of task {file_task!r}, but data.task is {task.name}")
    golds: dict[str, str] = {}
    for index, gold in enumerate(data["golds"]):
        if (
            not isinstance(gold, dict)
            or "id" not in gold
            or not isinstance(gold.get("output"), str)
        ):
            raise MilpError(f"{path}: gold {index} needs 'id' and 'output' (a string)")
        golds[str(gold["id"])] = gold["output"]
    return golds


def load_lamp_users(
    task: str,
    questions: str | Path,
    outputs: str | Path | None = None,
    max_history: int | None = None,
    max_users: int | None = None,
) -> list[User]:
    """Load LaMP questions (and golds, when given) as `User` records.

    Questions that share a `user_id` become one user with several queries and the union
    of their profiles (time-based split); otherwise every question is its own user.
    `max_history` keeps each user's most recent items; `max_users` the first users.
    """
    lamp_task = get_task(task)
    questions_path = Path(questions)
    records = read_json(questions_path)
    if not isinstance(records, list):
        raise MilpError(f"{questions_path}: expected a JSON array of questions")

    golds: dict[str, str] | None = None
    if outputs is not None:
        golds = read_golds(Path(outputs), lamp_task)

    profiles: dict[str, dict[str, dict[str, Any]]] = {}
    queries: dict[str, list[Query]] = {}
    seen_ids: set[str] = set()
    for index, record in enumerate(records):
        _check_question(questions_path, index, record, lamp_task)
        question_id = str(record["id"])
        if question_id in seen_ids:
            raise MilpError(f"{questions_path}: record {index}: duplicate id {question_id!r}")
        seen_ids.add(question_id)
        user_id = str(record.get("user_id", question_id))
        gold = None
        if golds is not None:
            if question_id not in golds:
                raise MilpError(f"{outputs}: no gold output for question id {question_id!r}")
            gold = golds[question_id]
        queries.setdefault(user_id, []).append(Query(question_id, record["input"], gold))
        items = profiles.setdefault(user_id, {})
        for item_index, item in enumerate(record["profile"]):
            items.setdefault(str(item.get("id", f"{question_id}/{item_index}")), item)

    if golds is not None:
        orphans = sorted(set(golds) - seen_ids)
        if orphans:
            raise MilpError(
                f"{outputs}: {len(orphans)} gold id(s) match no question in "
                f"{questions_path.name}, e.g. {orphans[0]!r}"
            )

    users = []
    for user_id, items in profiles.items():
        ordered = sorted(items.values(), key=_date_key)
        if max_history is not None:
            ordered = ordered[-max_history:]
        history = [lamp_task.to_pair(item) for item in ordered]
        users.append(
            User(user_id, history, queries[user_id], profile_texts=[p.target for p in history])
        )
    return users[:max_users] if max_users else users


def lamp_split_files(path: str | Path, split: str) -> tuple[Path, Path]:
    """The questions and outputs files of a split in a LaMP directory."""
    root = Path(path)
    return root / f"{split}_questions.json", root / f"{split}_outputs.json"


def load_lamp_split(
    task: str,
    path: str | Path,
    split: str,
    max_history: int | None = None,
    max_users: int | None = None,
    require_golds: bool = True,
) -> list[User]:
    """Load `{split}_questions.json` (+ `{split}_outputs.json`) from a LaMP directory."""
    questions, outputs = lamp_split_files(path, split)
    if not outputs.is_file() and not require_golds:
        outputs = None
    return load_lamp_users(task, questions, outputs, max_history, max_users)
