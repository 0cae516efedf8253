"""Dialogue prompts: a reply conditioned on the recent turns of its conversation.

Dialogue sources (Chit-Chat, Shakespeare's plays) turn every reply a user wrote into a
(context -> reply) pair. The context is the last `context_turns` turns before the
reply, oldest first, one turn per line: the user's own turns labelled `You`, the
others' by their speaker's name. A prompt too long for `max_prompt_tokens` loses its
oldest lines first (`PromptFormat.turn_separator`), so the partner's last turn, the one
being answered, is always kept.

A user's queries are held apart from what the user is trained on and from each other
(`pick_queries`): the converters take history only from other conversations (scenes),
and space a user's queries in one conversation more than `context_turns` turns apart,
so no query's prompt shows another query's gold.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from milp.data.checks import normalize, setting_int

TURN_SEPARATOR = "\n"
USER_LABEL = "You"


@dataclass(frozen=True)
class Turn:
    """One speaker's consecutive words in a conversation."""

    speaker: str
    text: str


def one_line(text: str) -> str:
    """Text with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(text.split())


def render_context(
    turns: Sequence[Turn], user: str, context_turns: int, other_label: str | None = None
) -> str:
    """The last `context_turns` of `turns` (oldest first), as the prompt for `user`'s reply.

    With `context_turns=1` the prompt is the partner's last turn alone, unlabelled; with
    more, one `label: text` line per turn, `You` for `user`'s own turns and the speaker's
    name (or `other_label`, for anonymous speaker ids) for the others'.
    """
    setting_int("data.users.context_turns", context_turns, 1)
    recent = list(turns)[-context_turns:]
    if not recent:
        raise ValueError("a reply needs at least one turn before it")
    if context_turns == 1:
        return one_line(recent[-1].text)
    lines = []
    for turn in recent:
        label = USER_LABEL if turn.speaker == user else (other_label or turn.speaker)
        lines.append(f"{label}: {one_line(turn.text)}")
    return TURN_SEPARATOR.join(lines)


def turn_texts(context: str, context_turns: int) -> list[str]:
    """The texts of the turns a context rendered by `render_context` shows, oldest first."""
    if context_turns == 1:
        return [context]
    # Labels (`You`, `Them`, a character's name) never hold ": ", so the first one ends it.
    return [line.split(": ", 1)[1] for line in context.split(TURN_SEPARATOR)]


def _spaced(replies: Iterable[dict], context_turns: int, refused: set[str]) -> list[dict]:
    kept: list[dict] = []
    for reply in replies:
        gold = normalize(reply["text"])
        if gold in refused or gold in reply["shown"]:
            continue
        # A reply `context_turns` turns or fewer after a kept one would show its gold.
        if kept and reply["turn"] - kept[-1]["turn"] <= context_turns:
            continue
        kept.append(reply)
    return kept


def pick_queries(
    groups: Sequence[Sequence[dict]],
    wanted: int,
    min_groups: int,
    context_turns: int,
    refused: set[str],
) -> list[dict] | None:
    """`wanted` of a user's replies as queries, spread over `groups` (conversations or
    scenes, each its replies oldest first), or None when they do not hold enough.

    Each reply is a dict with `text`, `context` and `turn` (its position in the
    conversation or play). A reply is skipped when its gold (compared by `normalize`) is
    in `refused` (the user's history texts), equals a turn its own prompt or another
    picked query's prompt shows, or lies within `context_turns` turns after a reply kept
    in its group. Groups are taken in turn, one reply each round, so the queries come
    from as many groups as possible; at least `min_groups` must hold one.
    """
    queues = []
    for index, group in enumerate(groups):
        shown = [
            {
                **reply,
                "group": index,
                "shown": {normalize(t) for t in turn_texts(reply["context"], context_turns)},
            }
            for reply in group
        ]
        queues.append(_spaced(shown, context_turns, refused))
    picked: list[dict] = []
    while len(picked) < wanted and any(queues):
        for queue in queues:
            while queue and len(picked) < wanted:
                reply = queue.pop(0)
                gold = normalize(reply["text"])
                if any(
                    gold in p["shown"] or normalize(p["text"]) in reply["shown"] for p in picked
                ):
                    continue
                picked.append(reply)
                break
    if len(picked) < wanted or len({p["group"] for p in picked}) < min_groups:
        return None
    drop = ("group", "shown")
    return [{k: v for k, v in reply.items() if k not in drop} for reply in picked]
