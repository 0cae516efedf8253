"""Real users from the Chit-Chat Challenge corpus (`pip install chitchat-dataset==0.9.0`).

The corpus holds 7,168 two-person conversations (258k messages, 1,315 anonymous sender
ids, timestamps). A *turn* is one sender's consecutive messages. Each reply a sender
writes becomes a (recent turns -> this reply) pair: the last `context_turns` turns of
the conversation before it (`milp/data/dialogue.py`; the user's own labelled `You`,
the partner's `Them`; with 1, the partner's last turn alone). The split is
**time-based per user**: a user's earlier replies are their history (the profile memory
is trained on); their last `queries_per_user` replies are the queries, the recent turns
in that conversation being the input and the user's actual reply the gold output.

Users with at least `min_history` earlier replies qualify; a seeded draw picks
`test_users` / `dev_users` / `train_users` of them (disjoint). Files are written in the
LaMP schema (`{split}_questions.json` with `user_id`, `{split}_outputs.json`, task
`chitchat`), so the LaMP loader reads them like any time-based LaMP split.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

from milp.data.checks import setting_int
from milp.data.dialogue import Turn, render_context
from milp.data.lamp import load_lamp_split
from milp.data.sources import package_dir, package_source
from milp.errors import MilpError
from milp.files import publish_dir

CONVERTER_VERSION = 2
INSTALL_HINT = "pip install chitchat-dataset==0.9.0"
PARTNER_LABEL = "Them"


def corpus_path() -> Path:
    """The corpus JSON inside the installed `chitchat_dataset` package."""
    path = package_dir("chitchat_dataset", "data=chitchat", INSTALL_HINT) / "dataset.json"
    if not path.is_file():
        raise MilpError(f"{path}: missing from the chitchat-dataset package; reinstall it")
    return path


def source_info(corpus: str | None = None) -> dict:
    """What the users were converted from, for metrics.json (`data_source`)."""
    if corpus is not None:
        return {"path": str(corpus), "converter_version": CONVERTER_VERSION}
    corpus_path()
    return package_source("chitchat-dataset", converter_version=CONVERTER_VERSION)


def read_replies(path: Path, context_turns: int = 1) -> dict[str, list[dict]]:
    """Every reply of every sender, oldest first: {sender: [{id, context, text, date}]};
    `context` renders the `context_turns` turns before the reply."""
    setting_int("data.users.context_turns", context_turns, 1)
    try:
        conversations = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MilpError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    replies: dict[str, list[dict]] = {}
    for conversation_id, conversation in conversations.items():
        turns = conversation.get("messages", [])
        for index in range(1, len(turns)):
            previous, turn = turns[index - 1], turns[index]
            if not turn or not previous:
                continue
            sender = turn[0]["sender"]
            if previous[0]["sender"] == sender:
                continue  # not a reply to the other person
            text = " ".join(m["text"].strip() for m in turn).strip()
            recent = [
                Turn(t[0]["sender"], " ".join(m["text"].strip() for m in t).strip())
                for t in turns[max(0, index - context_turns) : index]
                if t
            ]
            recent = [t for t in recent if t.text]
            if text and recent and recent[-1].speaker != sender:
                replies.setdefault(sender, []).append(
                    {
                        "id": f"{conversation_id}-{index}",
                        "context": render_context(recent, sender, context_turns, PARTNER_LABEL),
                        "text": text,
                        "date": turn[0]["timestamp"],
                    }
                )
    for items in replies.values():
        items.sort(key=lambda item: (item["date"], item["id"]))
    return replies


def _split_records(user_id: str, items: list[dict], queries_per_user: int, max_history: int | None):
    history, queries = items[:-queries_per_user], items[-queries_per_user:]
    profile = history if max_history is None else history[-max_history:]
    questions = [
        {"id": q["id"], "user_id": user_id, "input": q["context"], "profile": profile}
        for q in queries
    ]
    golds = [{"id": q["id"], "output": q["text"]} for q in queries]
    return questions, golds


@dataclass(frozen=True)
class SplitSettings:
    """How the corpus is cut into users and splits (the cache entry is named by these)."""

    seed: int = 0
    min_history: int = 100
    max_history: int | None = 200
    queries_per_user: int = 3
    test_users: int = 8
    dev_users: int = 4
    train_users: int = 0
    context_turns: int = 1
    # The corpus JSON to convert (null: the installed chitchat-dataset package's).
    corpus: str | None = None

    def __post_init__(self) -> None:
        setting_int("data.users.min_history", self.min_history, 1)
        setting_int("data.users.context_turns", self.context_turns, 1)
        setting_int("data.users.max_history", self.max_history, 1, "all earlier replies")
        setting_int("data.users.queries_per_user", self.queries_per_user, 1)
        for key in ("test_users", "dev_users", "train_users"):
            setting_int(f"data.users.{key}", getattr(self, key), 0)

    @property
    def tag(self) -> str:
        """A short hash of the converter version and these settings."""
        blob = json.dumps([CONVERTER_VERSION, *astuple(self)])
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def write_chitchat_lamp(directory: str | Path, settings: SplitSettings) -> Path:
    """Convert the corpus into LaMP-schema splits under `directory` (atomically)."""
    s = settings
    corpus = Path(s.corpus) if s.corpus is not None else corpus_path()
    if not corpus.is_file():
        raise MilpError(f"data.users.corpus: {corpus}: file not found")
    replies = read_replies(corpus, s.context_turns)
    eligible = sorted(
        u for u, items in replies.items() if len(items) >= s.min_history + s.queries_per_user
    )
    wanted = s.test_users + s.dev_users + s.train_users
    if len(eligible) < wanted:
        raise MilpError(
            f"data.min_history={s.min_history}: only {len(eligible)} chitchat users have that "
            f"much history, but {wanted} users were asked for; lower min_history or the user "
            "counts"
        )
    random.Random(f"chitchat-{s.seed}").shuffle(eligible)
    splits = {
        "test": eligible[: s.test_users],
        "dev": eligible[s.test_users : s.test_users + s.dev_users],
        "train": eligible[s.test_users + s.dev_users : wanted],
    }
    with publish_dir(directory, "meta.json") as staging:
        for split, users in splits.items():
            questions, golds = [], []
            for user_id in users:
                user_questions, user_golds = _split_records(
                    user_id, replies[user_id], s.queries_per_user, s.max_history
                )
                questions += user_questions
                golds += user_golds
            (staging / f"{split}_questions.json").write_text(json.dumps(questions))
            (staging / f"{split}_outputs.json").write_text(
                json.dumps({"task": "chitchat", "golds": golds})
            )
        (staging / "meta.json").write_text(json.dumps({"converter_version": CONVERTER_VERSION}))
    return Path(directory)


def load_chitchat_users(
    root: str | Path, split: str, max_users: int | None = None, **settings: Any
) -> list:
    """Users of one split of the converted corpus (converted on first use, then cached);
    `settings`: the fields of `SplitSettings`."""
    cut = SplitSettings(**settings)
    directory = Path(root) / f"chitchat-{cut.tag}"
    if not (directory / "meta.json").is_file():
        write_chitchat_lamp(directory, cut)
    return load_lamp_split("chitchat", directory, split, cut.max_history, max_users)
