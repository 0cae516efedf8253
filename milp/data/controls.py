"""Whose history each user's memory learns: the user's own, or a control's.

Two controls separate personalization from adapting to the data set. Each differs from
the treatment (every user's memory trained on the user's own history) in the training
data only: same memory, steps, learning rate, seeding and prompts, same queries scored.

- `swapped`: each user's memory is trained on another user's history, a fixed
  derangement of the split's users (sorted by id, each takes the next one's history,
  within the id's namespace: a Shakespeare character gets a character of the same play).
  The memory is seeded as that user's (`User.seed_id`), so it *is* that user's memory:
  each user is answered with another user's memory. Own < swapped is personalization.
- `pooled_train`: each user's memory is trained on history items pooled round-robin from
  the train split's users, as many as the user's own history holds (so the same steps),
  taken after the items the task memory (`memory.init=task`) was trained on. With
  `memory.init=task` this is the task memory continued for exactly a user memory's steps
  and learning rate on task data: the step-matched domain-only control.

Retrieval-in-prompt and persona-F1 keep using the user's own history; only what the
memory trains on changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from milp.data.users import HistoryPair, User
from milp.errors import MilpError

HISTORY_OF = ("own", "swapped", "pooled_train")


def check_history_of(value: object) -> str:
    """The validated `history_of` setting."""
    if value not in HISTORY_OF:
        raise MilpError(f"history_of must be one of {', '.join(HISTORY_OF)}, got {value!r}")
    return str(value)


def namespace(user_id: str) -> str:
    """The group a user id names before its last `/` (Shakespeare's `play/CHARACTER`: the
    play); '' for ids without one."""
    return user_id.rpartition("/")[0]


def derangement(user_ids: Sequence[str]) -> dict[str, str]:
    """user id -> the user whose history it gets, nobody their own: within each namespace
    (`namespace`), sorted ids, each takes the next one's (the last the first's). So a
    character gets another character of the same play, and the swap changes the person,
    not the play. Users alone in their namespace are deranged among themselves the same
    way (a last one left alone joins the largest namespace's cycle)."""
    if len(set(user_ids)) < 2:
        raise MilpError("history_of=swapped needs at least 2 users to swap histories between")
    groups: dict[str, list[str]] = {}
    for user_id in sorted(set(user_ids)):
        groups.setdefault(namespace(user_id), []).append(user_id)
    cycles = [g for g in groups.values() if len(g) > 1]
    alone = sorted(u for g in groups.values() if len(g) == 1 for u in g)
    if len(alone) > 1:
        cycles.append(alone)
    elif alone:
        max(cycles, key=len).extend(alone)
    return {u: cycle[(i + 1) % len(cycle)] for cycle in cycles for i, u in enumerate(cycle)}


def swapped_histories(users: Sequence[User]) -> list[User]:
    """Each user with the history of their derangement partner (queries unchanged)."""
    partner = derangement([u.user_id for u in users])
    by_id = {u.user_id: u for u in users}
    return [
        replace(
            u, history=list(by_id[partner[u.user_id]].history), history_owner=partner[u.user_id]
        )
        for u in users
    ]


def pooled_histories(users: Sequence[User], pool: Sequence[HistoryPair], skip: int) -> list[User]:
    """Each user with `pool[skip:]`'s first items, as many as their own history holds."""
    available = list(pool[skip:])
    need = max((len(u.history) for u in users), default=0)
    if len(available) < need:
        raise MilpError(
            f"history_of=pooled_train: the train split's users hold {len(available)} items "
            f"after the task memory's {skip}, a user needs {need}; add data.users.train_users"
        )
    return [replace(u, history=available[: len(u.history)]) for u in users]
