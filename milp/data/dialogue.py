"""Dialogue prompts: a reply conditioned on the recent turns of its conversation.

Dialogue sources (Chit-Chat, Shakespeare's plays) turn every reply a user wrote into a
(context -> reply) pair. The context is the last `context_turns` turns before the
reply, oldest first, one turn per line: the user's own turns labelled `You`, the
others' by their speaker's name. A prompt too long for `max_prompt_tokens` loses its
oldest lines first (`PromptFormat.turn_separator`), so the partner's last turn, the one
being answered, is always kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from milp.data.checks import setting_int

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
