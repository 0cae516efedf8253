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

from milp.data.checks import known_keys, parse_json, record_id, record_text, setting_int
from milp.data.dialogue import TURN_SEPARATOR
from milp.data.users import HistoryPair, Query, User
from milp.errors import MilpError


@dataclass(frozen=True)
class LampTask:
    """A LaMP generation task: the profile fields it needs and how items become pairs."""

    name: str
    item_fields: tuple[str, ...]
    to_pair: Callable[[dict[str, Any]], HistoryPair]
    # Keys a question may carry besides QUESTION_KEYS: where a converted dialogue's query
    # sits (its conversation or scene, turn and date), so its disjointness can be checked.
    question_extras: tuple[str, ...] = ()
    # Keys a profile item may carry besides `id`, `date` and `item_fields`.
    item_extras: tuple[str, ...] = ()


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
    # Dialogue replies (milp/data/chitchat.py, shakespeare.py): the recent turns -> the
    # user's reply. Retrieval shows an item as the turn replied to (the context's last
    # line, labelled) and the reply: the older turns would crowd out what was answered.
    last_turn = item["context"].rsplit(TURN_SEPARATOR, 1)[-1]
    return HistoryPair(prompt=item["context"], target=item["text"], source=last_turn)


TASKS: dict[str, LampTask] = {
    "LaMP_4": LampTask("LaMP_4", ("text", "title"), _headline_pair),
    "LaMP_5": LampTask("LaMP_5", ("abstract", "title"), _title_pair),
    "LaMP_7": LampTask("LaMP_7", ("text",), _tweet_pair),
    "chitchat": LampTask(
        "chitchat",
        ("context", "text"),
        _reply_pair,
        ("conversation", "turn", "date"),
        ("conversation", "turn"),
    ),
    "shakespeare": LampTask(
        "shakespeare",
        ("context", "text"),
        _reply_pair,
        ("scene", "turn", "date"),
        ("context_from", "scene", "turn"),
    ),
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
    """Parse a UTF-8 JSON file, turning every way it can be wrong into a one-line MilpError."""
    if not path.is_file():
        raise MilpError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise MilpError(
            f"{path}: not valid UTF-8 (line {line}, byte {err.start}); LaMP files are UTF-8 JSON"
        ) from None
    if text.lstrip().startswith("<"):
        raise MilpError(f"{path}: looks like an HTML page, not JSON (check the download URL)")
    try:
        return parse_json(text, str(path))
    except json.JSONDecodeError as err:
        raise MilpError(
            f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None


# The keys of a question record. Profile items are left open: besides their task's
# fields, `id` and `date`, converters keep the source's own fields there.
QUESTION_KEYS = ("id", "user_id", "input", "profile")


def _date_key(item: dict[str, Any]) -> tuple[int, Any]:
    # Items without a date keep their file order, before the dated ones; a user's dates
    # are all numbers or all strings (checked while loading), so they compare directly.
    date = item.get("date")
    return (0, 0) if date is None else (1, date)


def _date_kind(where: str, date: Any) -> str | None:
    if date is None:
        return None
    if isinstance(date, str) and date.strip():
        return "string"
    if isinstance(date, int | float) and not isinstance(date, bool):
        return "number"
    raise MilpError(f"{where}: 'date' must be a number or a non-empty string, got {date!r}")


def _check_question(path: Path, index: int, record: Any, task: LampTask) -> str:
    """Validate one question record; return its id."""
    where = f"{path}: record {index}"
    if not isinstance(record, dict):
        raise MilpError(f"{where}: expected an object, got {type(record).__name__}")
    if "id" not in record:
        raise MilpError(f"{where}: missing 'id'")
    question_id = record_id(where, record["id"])
    where = f"{path}: record {index} (id={question_id!r})"
    known_keys(where, record, QUESTION_KEYS + task.question_extras, "question")
    if "user_id" in record:
        record_id(where, record["user_id"], "user_id")
    if not isinstance(record.get("input"), str):
        raise MilpError(f"{where}: missing 'input' (a string)")
    record_text(where, record["input"], "input")
    profile = record.get("profile")
    if not isinstance(profile, list):
        raise MilpError(f"{where}: missing 'profile' (a list of history items)")
    if not profile:
        raise MilpError(f"{where}: empty 'profile' (no user history to inject)")
    for item_index, item in enumerate(profile):
        if not isinstance(item, dict):
            raise MilpError(f"{where}: profile item {item_index} is not an object")
        item_where = f"{where}: profile item {item_index}"
        allowed = ("id", "date", *task.item_fields, *task.item_extras)
        known_keys(item_where, item, allowed, "profile item")
        for key in task.item_fields:
            if not isinstance(item.get(key), str):
                raise MilpError(
                    f"{item_where} misses {key!r} "
                    f"(task {task.name} needs {', '.join(task.item_fields)})"
                )
            record_text(item_where, item[key], key)
        if "id" in item:
            record_id(item_where, item["id"])
        _date_kind(item_where, item.get("date"))
    return question_id


def read_golds(path: Path, task: LampTask) -> dict[str, str]:
    """Read an outputs file into {question id: gold output}."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise MilpError(f"{path}: expected an object with a 'golds' list")
    known_keys(str(path), data, ("task", "golds"), "LaMP outputs file")
    file_task = data.get("task")
    if file_task is not None and get_task(file_task).name != task.name:
        raise MilpError(f"{path}: holds golds of task {file_task!r}, but data.task is {task.name}")
    golds: dict[str, str] = {}
    first_index: dict[str, int] = {}
    for index, gold in enumerate(data["golds"]):
        if (
            not isinstance(gold, dict)
            or "id" not in gold
            or not isinstance(gold.get("output"), str)
        ):
            raise MilpError(f"{path}: gold {index} needs 'id' and 'output' (a string)")
        gold_id = record_id(f"{path}: gold {index}", gold["id"])
        where = f"{path}: gold {index} (id={gold_id!r})"
        known_keys(where, gold, ("id", "output"), "gold")
        if gold_id in golds:
            raise MilpError(f"{where}: duplicate id (also gold {first_index[gold_id]})")
        golds[gold_id] = record_text(where, gold["output"], "output")
        first_index[gold_id] = index
    return golds


class _Profile:
    """One user's profile items gathered over their questions, checked for consistency."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[dict[str, Any], str]] = {}
        self.date_kind: tuple[str, str] | None = None

    def add(self, path: Path, where: str, item_id: str, item: dict[str, Any]) -> None:
        """Add an item found at `where` (record and item index) in `path`."""
        if item_id in self.items:
            first, first_where = self.items[item_id]
            if first != item:
                raise MilpError(
                    f"{path}: {where}: profile item id {item_id!r} is reused with different "
                    f"content (first in {first_where})"
                )
            return
        self.items[item_id] = (item, where)
        kind = _date_kind(f"{path}: {where}", item.get("date"))
        if kind is None:
            return
        if self.date_kind is None:
            self.date_kind = (kind, where)
        elif self.date_kind[0] != kind:
            raise MilpError(
                f"{path}: {where}: 'date' is a {kind}, but {self.date_kind[1]} of the same "
                f"user has a {self.date_kind[0]} date; one user's dates must be all numbers "
                "or all strings"
            )

    def ordered(self) -> list[dict[str, Any]]:
        return sorted((item for item, _ in self.items.values()), key=_date_key)


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
    `max_history` keeps each user's most recent items; `max_users` the first users;
    `None` keeps all (values below 1 are refused).
    """
    max_history = setting_int("data.users.max_history", max_history, 1, "all items")
    max_users = setting_int("data.users.max_users", max_users, 1, "all users")
    lamp_task = get_task(task)
    questions_path = Path(questions)
    records = read_json(questions_path)
    if not isinstance(records, list):
        raise MilpError(f"{questions_path}: expected a JSON array of questions")
    if not records:
        raise MilpError(f"{questions_path}: no questions (an empty array)")

    golds: dict[str, str] | None = None
    if outputs is not None:
        golds = read_golds(Path(outputs), lamp_task)

    profiles: dict[str, _Profile] = {}
    queries: dict[str, list[Query]] = {}
    first_index: dict[str, int] = {}
    for index, record in enumerate(records):
        question_id = _check_question(questions_path, index, record, lamp_task)
        if question_id in first_index:
            raise MilpError(
                f"{questions_path}: record {index}: duplicate id {question_id!r} "
                f"(also record {first_index[question_id]})"
            )
        first_index[question_id] = index
        user_id = str(record.get("user_id", question_id))
        gold = None
        if golds is not None:
            if question_id not in golds:
                raise MilpError(f"{outputs}: no gold output for question id {question_id!r}")
            gold = golds[question_id]
        queries.setdefault(user_id, []).append(Query(question_id, record["input"], gold))
        profile = profiles.setdefault(user_id, _Profile())
        for item_index, item in enumerate(record["profile"]):
            item_id = str(item.get("id", f"{question_id}/{item_index}"))
            where = f"record {index} (id={question_id!r}) profile item {item_index}"
            profile.add(questions_path, where, item_id, item)

    if golds is not None:
        orphans = sorted(set(golds) - set(first_index))
        if orphans:
            raise MilpError(
                f"{outputs}: {len(orphans)} gold id(s) match no question in "
                f"{questions_path.name}, e.g. {orphans[0]!r}"
            )

    users = []
    for user_id, profile in profiles.items():
        ordered = profile.ordered()
        if max_history is not None:
            ordered = ordered[-max_history:]
        history = [lamp_task.to_pair(item) for item in ordered]
        users.append(
            User(user_id, history, queries[user_id], profile_texts=[p.target for p in history])
        )
    return users[:max_users]


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
