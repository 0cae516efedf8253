"""Retrieval-in-prompt (LaMP's RAG baseline): the user's most relevant history items,
ranked by BM25 against the query, are written into the prompt.

Retrieval ranks and renders; it does not fit. `add_retrieval` gives each query its
top-k items, best first (`Query.items`), and `RetrievalFormat` writes them: each item
with `item_template` (fields `{source}`, `{target}`, the source cut to a number of
words), joined with `join`, placed before the query by `query_template` (`{items}`,
`{prompt}`). The defaults are LaMP-4's: `"{target}" is the title for "{source}"`,
joined by `, and `, then `. {prompt}`. Sources are cut to `max_item_words` words; a
prompt over its token budget shortens them further, down to `min_item_words`, before it
drops items (`PromptFormat.fit` in milp/data/datamodule.py owns the budget). The
rendering is also used by the embedded generator's pretraining examples, so the tiny
base model knows this layout.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from milp.data.checks import setting_int
from milp.data.users import HistoryPair, User
from milp.errors import MilpError
from milp.evaluation.metrics import tokenize


class BM25:
    """Okapi BM25 over a small collection (one user's history), k1=1.2, b=0.75."""

    def __init__(self, documents: Sequence[str], k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.docs = [Counter(tokenize(d)) for d in documents]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.mean_length = sum(self.lengths) / max(len(self.docs), 1) or 1.0
        frequency = Counter(term for doc in self.docs for term in doc)
        n = len(self.docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in frequency.items()}

    def scores(self, query: str) -> list[float]:
        """One score per document for the query."""
        terms = tokenize(query)
        result = []
        for doc, length in zip(self.docs, self.lengths, strict=True):
            norm = self.k1 * (1 - self.b + self.b * length / self.mean_length)
            result.append(
                sum(
                    self.idf.get(t, 0.0) * doc[t] * (self.k1 + 1) / (doc[t] + norm)
                    for t in terms
                    if t in doc
                )
            )
        return result

    def top(self, query: str, k: int) -> list[int]:
        """Indices of the k best documents, best first (ties: the more recent item)."""
        scores = self.scores(query)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], -i))
        return order[:k]


@dataclass(frozen=True)
class RetrievalFormat:
    """How retrieved items are written into a prompt."""

    item_template: str = '"{target}" is the title for "{source}"'
    join: str = ", and "
    query_template: str = "{items}. {prompt}"
    max_item_words: int = 24
    # The fewest words of an item's source a prompt over budget shortens it to; below
    # that, items are dropped instead (lowest-ranked first).
    min_item_words: int = 8

    def __post_init__(self) -> None:
        for key in ("{items}", "{prompt}"):
            if key not in self.query_template:
                raise MilpError(
                    f"data.retrieval_format.query_template must contain '{key}', "
                    f"got {self.query_template!r}"
                )
        setting_int("data.retrieval_format.min_item_words", self.min_item_words, 1)
        setting_int("data.retrieval_format.max_item_words", self.max_item_words, 1)
        if self.max_item_words < self.min_item_words:
            raise MilpError(
                f"data.retrieval_format.max_item_words={self.max_item_words} is below "
                f"min_item_words={self.min_item_words}"
            )

    def render(self, items: Sequence[HistoryPair], prompt: str, words: int | None = None) -> str:
        """The prompt with `items` placed before it, each source cut to `words` words
        (`max_item_words` when None); the targets, the user's own texts, stay whole."""
        if not items:
            return prompt
        words = self.max_item_words if words is None else words
        rendered = [
            self.item_template.format(
                source=" ".join(item.source.split()[:words]), target=item.target
            )
            for item in items
        ]
        return self.query_template.format(items=self.join.join(rendered), prompt=prompt)


def add_retrieval(users: list[User], k: int) -> list[User]:
    """Users whose queries carry their top-k history items, best first (history and
    query prompts unchanged)."""
    if k < 0:
        raise MilpError(f"retrieval.k must be >= 0, got {k}")
    if k == 0:
        return users
    augmented = []
    for user in users:
        index = BM25([f"{p.source} {p.target}" for p in user.history])
        queries = [
            replace(q, items=tuple(user.history[i] for i in index.top(q.prompt, k)))
            for q in user.queries
        ]
        augmented.append(replace(user, queries=queries))
    return augmented
