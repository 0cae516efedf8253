"""Real users from the Chit-Chat Challenge corpus (`pip install chitchat-dataset==0.9.0`).

The corpus holds 7,168 two-person conversations (258k messages, 1,315 anonymous sender
ids, timestamps). A *turn* is one sender's consecutive messages. Each reply a sender
writes becomes a (recent turns -> this reply) pair: the last `context_turns` turns of
the conversation before it (`milp/data/dialogue.py`; the user's own labelled `You`,
the partner's `Them`; with 1, the partner's last turn alone).

The split is **time-based and conversation-disjoint per user**: a user's
`queries_per_user` queries come from their latest conversations (as few as hold them, at
least `min_query_conversations`; `dialogue.pick_queries` spaces the queries of one
conversation so that no query's prompt shows another's gold); their history is their
replies in other conversations dated before their first reply in the earliest query
conversation. Users with `min_history` such replies qualify. A seeded draw picks
`test_users`, `dev_users` and `train_users` of them (disjoint), and no conversation that
holds a drawn user's query gives any drawn user's history (a user whom that would leave
with less than `min_history` is passed over). Files are written in the LaMP schema
(`{split}_questions.json` with `user_id`, `{split}_outputs.json`, task `chitchat`); each
question and history item also names its `conversation` (the question its `turn` and
`date`), so the rule can be checked from the files, and the LaMP loader reads them like
any time-based LaMP split. `meta.json` counts the qualifying users and each split's
users and queries.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

from milp.data.checks import normalize, setting_int
from milp.data.dialogue import Turn, pick_queries, render_context
from milp.data.lamp import load_lamp_split
from milp.data.sources import package_dir, package_source
from milp.errors import MilpError
from milp.run.files import publish_dir

CONVERTER_VERSION = 3
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
    """Every reply of every sender, oldest first:
    {sender: [{id, conversation, turn, context, text, date}]}; `turn` is the reply's
    position in its conversation, `context` renders the `context_turns` turns before it."""
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
                        "conversation": conversation_id,
                        "turn": index,
                        "context": render_context(recent, sender, context_turns, PARTNER_LABEL),
                        "text": text,
                        "date": turn[0]["timestamp"],
                    }
                )
    for items in replies.values():
        items.sort(key=lambda item: (item["date"], item["id"]))
    return replies


@dataclass(frozen=True)
class SplitSettings:
    """How the corpus is cut into users and splits (the cache entry is named by these)."""

    seed: int = 0
    min_history: int = 100
    max_history: int | None = 200
    queries_per_user: int = 10
    min_query_conversations: int = 3
    test_users: int = 32
    dev_users: int = 16
    train_users: int = 0
    context_turns: int = 4
    # The corpus JSON to convert (null: the installed chitchat-dataset package's).
    corpus: str | None = None
    # Users who must not be test users (their results informed fixed settings before);
    # they may still be dev or train users.
    never_test: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "never_test", tuple(str(u) for u in self.never_test or ()))
        setting_int("data.users.min_history", self.min_history, 1)
        setting_int("data.users.context_turns", self.context_turns, 1)
        setting_int("data.users.max_history", self.max_history, 1, "all earlier replies")
        setting_int("data.users.queries_per_user", self.queries_per_user, 1)
        setting_int("data.users.min_query_conversations", self.min_query_conversations, 1)
        if self.min_query_conversations > self.queries_per_user:
            raise MilpError(
                f"data.users.min_query_conversations={self.min_query_conversations} must not "
                f"exceed data.users.queries_per_user={self.queries_per_user} (each of those "
                "conversations holds a query)"
            )
        for key in ("test_users", "dev_users", "train_users"):
            setting_int(f"data.users.{key}", getattr(self, key), 0)

    @property
    def tag(self) -> str:
        """A short hash of the converter version and these settings."""
        blob = json.dumps([CONVERTER_VERSION, *astuple(self)])
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


def user_split(items: list[dict], s: SplitSettings) -> tuple[list[dict], list[dict]] | None:
    """One user's (history, queries) by the conversation-disjoint time-based rule, or
    None when the user does not qualify; `items` are the user's replies, oldest first."""
    conversations: dict[str, list[dict]] = {}
    for item in items:
        conversations.setdefault(item["conversation"], []).append(item)
    order = sorted(conversations, key=lambda c: (conversations[c][0]["date"], c))
    for count in range(1, len(order)):
        held = set(order[-count:])
        start = conversations[order[-count]][0]["date"]
        history = [i for i in items if i["conversation"] not in held and i["date"] < start]
        if len(history) < s.min_history:
            return None  # more query conversations only leave less history
        refused = {normalize(t) for i in history for t in (i["text"], i["context"])}
        queries = pick_queries(
            [conversations[c] for c in order[-count:]],
            s.queries_per_user,
            s.min_query_conversations,
            s.context_turns,
            refused,
        )
        if queries is not None:
            return history, sorted(queries, key=lambda q: (q["date"], q["id"]))
    return None


def _outside(history: list[dict], held: set[str]) -> list[dict]:
    return [item for item in history if item["conversation"] not in held]


def draw_users(
    candidates: dict[str, tuple[list[dict], list[dict]]], s: SplitSettings
) -> tuple[dict[str, list[str]], set[str]]:
    """{split: user ids} drawn (seeded) from the qualifying users, and the conversations
    that hold their queries, which no drawn user's history keeps."""
    wanted = s.test_users + s.dev_users + s.train_users
    shuffled = sorted(candidates)
    random.Random(f"chitchat-{s.seed}").shuffle(shuffled)
    room = {"test": s.test_users, "dev": s.dev_users, "train": s.train_users}
    splits: dict[str, list[str]] = {split: [] for split in room}
    drawn: list[str] = []
    held: set[str] = set()
    for user in shuffled:
        # The first split with room that may take the user (test, then dev, then train).
        split = next(
            (
                name
                for name, size in room.items()
                if len(splits[name]) < size and not (name == "test" and user in s.never_test)
            ),
            None,
        )
        if split is None:
            continue
        trial = held | {q["conversation"] for q in candidates[user][1]}
        if all(len(_outside(candidates[u][0], trial)) >= s.min_history for u in [*drawn, user]):
            drawn.append(user)
            splits[split].append(user)
            held = trial
    if len(drawn) < wanted:
        raise MilpError(
            f"data.users.min_history={s.min_history}: only {len(drawn)} of the "
            f"{len(candidates)} chitchat users with that much history before and outside "
            f"their {s.queries_per_user} queries ({s.min_query_conversations}+ conversations) "
            f"can be drawn, but {wanted} users were asked for; lower min_history, "
            "queries_per_user or the user counts"
        )
    return splits, held


def write_chitchat_lamp(directory: str | Path, settings: SplitSettings) -> Path:
    """Convert the corpus into LaMP-schema splits under `directory` (atomically)."""
    s = settings
    corpus = Path(s.corpus) if s.corpus is not None else corpus_path()
    if not corpus.is_file():
        raise MilpError(f"data.users.corpus: {corpus}: file not found")
    candidates = {}
    for user, items in read_replies(corpus, s.context_turns).items():
        split = user_split(items, s)
        if split is not None:
            candidates[user] = split
    splits, held = draw_users(candidates, s)
    meta: dict[str, Any] = {
        "converter_version": CONVERTER_VERSION,
        "source": source_info(s.corpus),
        "eligible_users": len(candidates),
        "held_out_conversations": len(held),
        "splits": {},
    }
    with publish_dir(directory, "meta.json") as staging:
        for split, users in splits.items():
            questions, golds, sizes, spread = [], [], {}, []
            for user_id in users:
                history, queries = candidates[user_id]
                history = _outside(history, held)
                profile = history if s.max_history is None else history[-s.max_history :]
                for q in queries:
                    questions.append(
                        {
                            "id": q["id"],
                            "user_id": user_id,
                            "input": q["context"],
                            "profile": profile,
                            "conversation": q["conversation"],
                            "turn": q["turn"],
                            "date": q["date"],
                        }
                    )
                    golds.append({"id": q["id"], "output": q["text"]})
                sizes[user_id] = len(history)
                spread.append(len({q["conversation"] for q in queries}))
            (staging / f"{split}_questions.json").write_text(json.dumps(questions))
            (staging / f"{split}_outputs.json").write_text(
                json.dumps({"task": "chitchat", "golds": golds})
            )
            meta["splits"][split] = {
                "users": len(users),
                "queries": len(questions),
                "query_conversations_per_user_min": min(spread, default=0),
                "history_sizes": sizes,
            }
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
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
