"""Retrieval-in-prompt (LaMP's RAG baseline): the user's most relevant history items,
ranked by BM25 against the query, are written into the prompt.

Each retrieved item is rendered with `item_template` (fields `{source}`, `{target}`),
the items are joined with `join`, and `query_template` places them before the query
(`{items}`, `{prompt}`). The defaults are LaMP-4's: `"{target}" is the title for
"{source}"`, joined by `, and `, then `. {prompt}`. Sources are cut to `max_item_words`
words so that k items fit the prompt budget. The rendering is also used by the
embedded generator's pretraining examples, so the tiny base model knows this layout.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from milp.data.users import HistoryPair, User
from milp.errors import MilpError
from milp.metrics import tokenize


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

    def render(self, items: Sequence[HistoryPair], prompt: str) -> str:
        """The prompt with `items` placed before it."""
        if not items:
            return prompt
        rendered = [
            self.item_template.format(
                source=" ".join(item.source.split()[: self.max_item_words]), target=item.target
            )
            for item in items
        ]
        return self.query_template.format(items=self.join.join(rendered), prompt=prompt)


def add_retrieval(users: list[User], k: int, fmt: RetrievalFormat) -> list[User]:
    """Users whose query prompts carry their top-k history items (history unchanged)."""
    if k < 0:
        raise MilpError(f"retrieval.k must be >= 0, got {k}")
    if k == 0:
        return users
    augmented = []
    for user in users:
        index = BM25([f"{p.source} {p.target}" for p in user.history])
        queries = [
            replace(
                q, prompt=fmt.render([user.history[i] for i in index.top(q.prompt, k)], q.prompt)
            )
            for q in user.queries
        ]
        augmented.append(replace(user, queries=queries))
    return augmented
