"""What milp knows about a user: the history to inject and the queries to answer.

Every data source (LaMP files, the JSONL history format, the embedded generator)
produces the same `User` records, so training and evaluation never see file formats.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class HistoryPair:
    """One item of a user's history, as a (prompt, target) pair the memory is trained on.

    `source` is the item's own input text without the task instruction (an article, an
    abstract, the message replied to), which retrieval-in-prompt shows next to `target`.
    """

    prompt: str
    target: str
    source: str = ""


@dataclass(frozen=True)
class Query:
    """A question the personalized model must answer; `gold` is None when unknown.

    `prompt` is the query's own input; `items` are the user's history items retrieval
    put beside it, best first (`milp.data.retrieval.add_retrieval`; empty without
    retrieval). The prompt format lays both out within the token budget.
    """

    id: str
    prompt: str
    gold: str | None = None
    items: tuple[HistoryPair, ...] = ()


@dataclass
class User:
    """A user's history (oldest first) and queries, plus the raw texts for persona F1."""

    user_id: str
    history: list[HistoryPair]
    queries: list[Query]
    profile_texts: list[str] = field(default_factory=list)
    # Whose history `history` is, where it is not this user's own (a control run,
    # `milp/data/controls.py`); the memory is then seeded as that user's.
    history_owner: str | None = None

    @property
    def seed_id(self) -> str:
        """The id the user's memory is seeded by: the history's owner.

        A user given another user's history (the swapped control) trains with exactly
        that user's seed, data and order, so their memory is the other user's memory.
        """
        return self.history_owner or self.user_id

    @property
    def slug(self) -> str:
        """A file-system-safe name for this user, unique for distinct ids (`user_slug`)."""
        return user_slug(self.user_id)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# Ids kept as their own directory name: lower-case, so that no two differ only in case
# (one folder on macOS and Windows file systems), and not ending like a hashed name.
_KEPT = re.compile(r"[a-z0-9][a-z0-9._-]{0,79}")
HASH_CHARS = 24  # hex digits of SHA-256 (96 bits) appended to every other id's name
_HASHED = re.compile(rf"-[0-9a-f]{{{HASH_CHARS}}}")


def user_slug(user_id: str) -> str:
    """Map an opaque user id to a directory name, injectively and case-safely.

    An id of lower-case letters, digits, `.`, `_`, `-` (up to 80, not ending in `-` and
    24 hex digits) is its own name. Every other id gets a readable prefix plus `-` and
    the first 24 hex digits of its SHA-256, so kept and hashed names never meet, two
    hashed names meet only if 96-bit hashes collide, and names that differ only in case
    (`Alice`, `alice`) are different names on case-insensitive file systems too.
    """
    kept = _KEPT.fullmatch(user_id) and not _HASHED.search(user_id[-HASH_CHARS - 1 :])
    if kept:
        return user_id
    safe = _UNSAFE.sub("_", user_id)[:80].lstrip(".") or "user"  # never a hidden name
    digest = hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{safe}-{digest[:HASH_CHARS]}"


def user_hash(user: User) -> str:
    """The SHA-256 of everything a user's results are made from, as loaded and as trained
    (a control run's replaced history included): history pairs, queries with their golds
    and retrieved items, profile texts, whose history it is. A canonical JSON of the
    record, so equal users hash equally in any process."""
    canonical = json.dumps(asdict(user), sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def user_seed(seed: int, user_id: str) -> int:
    """A per-user seed that does not depend on the order users are processed in.

    Resuming a run (skipping finished users) must not change the remaining users'
    adapters, so the seed comes from the user's id, not from its position.
    """
    return (seed * 1_000_003 + zlib.crc32(user_id.encode())) % (2**31)
