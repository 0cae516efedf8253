"""Serving users to Lightning: tokenized history pairs to train on, queries to answer.

One `UserDataModule` holds all users of a split; `select` points it at the user (or
group of users) whose memory is being injected, so each adapter only ever sees its
own user's history (a peer's code once let a buffer leak across users).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import lightning as L
import torch
from torch.utils.data import DataLoader

from milp.data.checks import find_gold_leaks, setting_int
from milp.data.epochs import ShuffledEpochs
from milp.data.retrieval import RetrievalFormat, add_retrieval
from milp.data.users import HistoryPair, Query, User
from milp.errors import MilpError

IGNORE_INDEX = -100
log = logging.getLogger("milp")


@dataclass(frozen=True)
class PromptFit:
    """A prompt laid out within its token budget, and what it gave up to fit."""

    ids: list[int]
    items: int = 0  # retrieved items kept (best-ranked first)
    item_words: int | None = None  # the words per item source they were kept at
    items_dropped: int = 0
    turns_dropped: int = 0  # dialogue turns dropped from the start
    # The query's own input lost tokens: a dialogue's turn being answered keeps its end
    # (what is answered), any other input its beginning (LaMP's instruction).
    cut: bool = False


@dataclass(frozen=True)
class PromptFormat:
    """How a prompt and an answer are laid out as tokens for a causal LM.

    A prompt is the query's input in `template`, with the retrieved items (if any)
    before it as `retrieval` writes them; it fits `max_prompt_tokens` (`fit`), the
    template's text around `{prompt}` always whole; targets are cut at
    `max_target_tokens`. A dialogue prompt (one turn per line, `milp/data/dialogue.py`)
    sets `turn_separator`; its last turn is the one being answered.
    Training and generation share this, so the memory is trained on exactly the layout
    it is asked to answer in.
    """

    template: str = "{prompt}\nAnswer:"
    max_prompt_tokens: int = 256
    max_target_tokens: int = 64
    # Text between the answer cue and the answer: a space after "Answer:"; nothing after
    # a chat template's "assistant\n", whose replies start right away.
    target_prefix: str = " "
    turn_separator: str | None = None
    # How retrieved items are written (data.retrieval_format; UserDataModule sets it).
    retrieval: RetrievalFormat | None = None

    def __post_init__(self) -> None:
        if "{prompt}" not in self.template:
            raise MilpError(
                f"data.prompt_format.template must contain '{{prompt}}', got {self.template!r}"
            )
        setting_int("data.prompt_format.max_prompt_tokens", self.max_prompt_tokens, 1)
        # One token of the target budget is the end-of-sequence token.
        setting_int("data.prompt_format.max_target_tokens", self.max_target_tokens, 2)

    def prompt_ids(self, tokenizer, prompt: str, items: Sequence[HistoryPair] = ()) -> list[int]:
        """Token ids of a formatted prompt that fits the budget (see `fit`)."""
        return self.fit(tokenizer, prompt, items).ids

    def fit(self, tokenizer, prompt: str, items: Sequence[HistoryPair] = ()) -> PromptFit:
        """Lay out `prompt` with its retrieved `items` (best first) in `max_prompt_tokens`.

        A prompt that fits is the template around `retrieval.render(items, prompt)`,
        tokens unchanged. Over budget, it gives up, in this order, until it fits: words of
        the item sources (down to `retrieval.min_item_words`), then items, lowest-ranked
        first, then a dialogue's oldest turns; only then is the input itself cut (`cut`):
        the turn being answered keeps its end, any other input its beginning.
        """
        head, _, tail = self.template.partition("{prompt}")
        head_ids = tokenizer.encode(head, add_special_tokens=True) if head else []
        tail_ids = tokenizer.encode(tail, add_special_tokens=False) if tail else []
        room = self.max_prompt_tokens - len(head_ids) - len(tail_ids)
        if room < 1:
            raise MilpError(
                f"data.prompt_format.max_prompt_tokens={self.max_prompt_tokens} leaves no room "
                f"for the prompt after the template {self.template!r}"
            )
        if items and self.retrieval is None:
            raise MilpError(
                "a query carries retrieved items but the prompt format has no "
                "data.retrieval_format to write them with"
            )
        turns = prompt.split(self.turn_separator) if self.turn_separator else [prompt]

        def body(kept: int, words: int | None = None, first_turn: int = 0) -> list[int]:
            text = prompt
            if first_turn:
                text = self.turn_separator.join(turns[first_turn:])
            if kept:
                text = self.retrieval.render(items[:kept], text, words)
            return tokenizer.encode(text, add_special_tokens=not head)

        def laid_out(ids: list[int], **given_up) -> PromptFit:
            return PromptFit(head_ids + ids + tail_ids, **given_up)

        ids = body(len(items))
        if len(ids) <= room:
            words = self.retrieval.max_item_words if items else None
            return laid_out(ids, items=len(items), item_words=words)
        for kept in range(len(items), 0, -1):
            floor, top = self.retrieval.min_item_words, self.retrieval.max_item_words
            ids = body(kept, floor)
            if len(ids) > room:
                continue
            # The most words per item that fit: sources shorten before items go.
            while top > floor:
                middle = (floor + top + 1) // 2
                longer = body(kept, middle)
                if len(longer) <= room:
                    floor, ids = middle, longer
                else:
                    top = middle - 1
            return laid_out(ids, items=kept, item_words=floor, items_dropped=len(items) - kept)
        first = 0
        ids = body(0)
        while len(ids) > room and first < len(turns) - 1:
            first += 1
            ids = body(0, first_turn=first)
        dropped = {"items_dropped": len(items), "turns_dropped": first}
        if len(ids) <= room:
            return laid_out(ids, **dropped)
        if self.turn_separator:
            # Special tokens the tokenizer puts first (a BOS without a template head) stay.
            lead = len(ids) - len(tokenizer.encode(turns[-1], add_special_tokens=False))
            lead = min(max(lead, 0), room - 1)
            ids = ids[:lead] + ids[len(ids) - room + lead :]
        else:
            ids = ids[:room]
        return laid_out(ids, cut=True, **dropped)

    def target_ids(self, tokenizer, target: str) -> list[int]:
        """Token ids of an answer, ending with the end-of-sequence token."""
        ids = tokenizer.encode(self.target_prefix + target.strip(), add_special_tokens=False)
        return ids[: self.max_target_tokens - 1] + [tokenizer.eos_token_id]

    def encode_pair(self, tokenizer, pair: HistoryPair) -> tuple[list[int], list[int]]:
        """Input ids and labels for one history pair; the loss falls on the target only."""
        prompt, target = (
            self.prompt_ids(tokenizer, pair.prompt),
            self.target_ids(tokenizer, pair.target),
        )
        return prompt + target, [IGNORE_INDEX] * len(prompt) + target


def pad_right(sequences: Sequence[list[int]], value: int) -> torch.Tensor:
    """Stack sequences into a tensor, padding at the end (for training)."""
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def pad_left(sequences: Sequence[list[int]], value: int) -> torch.Tensor:
    """Stack sequences, padding at the start, so generation continues every prompt."""
    width = max(len(s) for s in sequences)
    return torch.tensor([[value] * (width - len(s)) + s for s in sequences], dtype=torch.long)


class TrainCollator:
    """Tokenizes history pairs into a right-padded batch with target-only labels."""

    def __init__(self, tokenizer, prompt_format: PromptFormat) -> None:
        self.tokenizer, self.format = tokenizer, prompt_format
        # A user's loader draws every pair once per epoch: each is tokenized once.
        self._encoded: dict[HistoryPair, tuple[list[int], list[int]]] = {}

    def __call__(self, pairs: list[HistoryPair]) -> dict[str, torch.Tensor]:
        encoded = [self._encode(p) for p in pairs]
        input_ids = pad_right([ids for ids, _ in encoded], self.tokenizer.pad_token_id)
        labels = pad_right([labels for _, labels in encoded], IGNORE_INDEX)
        attention_mask = pad_right([[1] * len(ids) for ids, _ in encoded], 0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _encode(self, pair: HistoryPair) -> tuple[list[int], list[int]]:
        if pair not in self._encoded:
            self._encoded[pair] = self.format.encode_pair(self.tokenizer, pair)
        return self._encoded[pair]


class QueryCollator:
    """Tokenizes queries into a left-padded batch, keeping ids and golds alongside."""

    def __init__(self, tokenizer, prompt_format: PromptFormat) -> None:
        self.tokenizer, self.format = tokenizer, prompt_format

    def __call__(self, queries: list[tuple[str, Query]]) -> dict:
        prompts = [self.format.prompt_ids(self.tokenizer, q.prompt, q.items) for _, q in queries]
        return {
            "input_ids": pad_left(prompts, self.tokenizer.pad_token_id),
            "attention_mask": pad_left([[1] * len(p) for p in prompts], 0),
            "user_ids": [user_id for user_id, _ in queries],
            "query_ids": [q.id for _, q in queries],
            "golds": [q.gold for _, q in queries],
        }


class UserDataModule(L.LightningDataModule):
    """All users of one split; serves the selected user(s) to a Lightning Trainer.

    A query whose gold output appears in the same user's history (see
    `milp.data.checks.find_gold_leaks`) would be answered from a copy of its gold, so
    such data is refused unless `allow_gold_in_history`; `gold_in_history` holds the
    count and first examples either way, for metrics.json.
    """

    def __init__(
        self,
        users: list[User],
        prompt_format: PromptFormat | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        min_history: int = 1,
        name: str = "data",
        path: str | None = None,
        retrieval_k: int = 0,
        retrieval_format: RetrievalFormat | None = None,
        min_examples_per_epoch: int = 0,
        allow_gold_in_history: bool = False,
        source: dict | None = None,
    ) -> None:
        super().__init__()
        self.min_examples_per_epoch = setting_int(
            "data.min_examples_per_epoch", min_examples_per_epoch, 0
        )
        setting_int("data.batch_size", batch_size, 1)
        setting_int("data.eval_batch_size", eval_batch_size, 1)
        setting_int("data.min_history", min_history, 0)
        if not isinstance(allow_gold_in_history, bool):
            raise MilpError(
                f"data.allow_gold_in_history must be true or false, got {allow_gold_in_history!r}"
            )
        # The prompt format writes the queries' retrieved items with the data's layout.
        prompt_format = prompt_format or PromptFormat()
        self.format = replace(
            prompt_format,
            retrieval=retrieval_format or prompt_format.retrieval or RetrievalFormat(),
        )
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        # `path`: where the users were read from (data.path); `source`: the package and
        # version a real source was converted from (milp/data/sources.py). Both are
        # recorded in metrics.json, so a result can be traced to its data.
        self.name, self.path = name, path
        self.source = dict(source) if source is not None else None
        for user in users:
            if len(user.history) < min_history:
                raise MilpError(
                    f"user {user.user_id!r} has {len(user.history)} history item(s); "
                    f"data.min_history is {min_history}"
                )
        if not users:
            raise MilpError(f"{path or name}: no users to run")
        leaks = find_gold_leaks(users)
        if leaks.count and not allow_gold_in_history:
            raise MilpError(
                f"{path or name}: {leaks.count} query gold output(s) appear in the same "
                f"user's history, e.g. {'; '.join(leaks.examples)}; scores would be inflated "
                "(set data.allow_gold_in_history=true to run anyway)"
            )
        self.gold_in_history = leaks.as_dict()
        # Retrieval-in-prompt ranks once, here: each query carries its top-k items, which
        # the prompt format lays out; training pairs are the same with or without it.
        self.users = add_retrieval(users, retrieval_k)
        self.retrieval_k = retrieval_k
        self.tokenizer = None
        self.selected: list[User] = []
        self.prompt_fit: dict[str, int] = {}

    def attach_tokenizer(self, tokenizer) -> None:
        """Use the base model's tokenizer (known only once the model is loaded)."""
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise MilpError("the model's tokenizer needs an end-of-sequence and a pad token")
        self.tokenizer = tokenizer
        # What the query prompts gave up to fit the budget (PromptFormat.fit), counted.
        self.prompt_fit = self._count_prompt_fit()

    def _count_prompt_fit(self) -> dict[str, int]:
        """How many query prompts, to fit the token budget, kept their items shortened,
        dropped items, dropped turns, or had their input cut (`PromptFit`); a cut input is
        logged, since it changes what is answered."""
        fits = [
            self.format.fit(self.tokenizer, q.prompt, q.items)
            for u in self.users
            for q in u.queries
        ]
        widest = self.format.retrieval.max_item_words
        counts = {
            "queries": len(fits),
            "items_shortened": sum(f.items > 0 and f.item_words < widest for f in fits),
            "items_dropped": sum(f.items_dropped > 0 for f in fits),
            "turns_dropped": sum(f.turns_dropped > 0 for f in fits),
            "input_cut": sum(f.cut for f in fits),
        }
        if counts["input_cut"]:
            log.warning(
                "%d of %d query prompts are cut to data.prompt_format.max_prompt_tokens=%d "
                "with nothing else left to drop (a dialogue's turn being answered keeps its "
                "end, any other input its beginning)",
                counts["input_cut"],
                len(fits),
                self.format.max_prompt_tokens,
            )
        return counts

    def select(self, users: User | list[User]) -> UserDataModule:
        """Serve these users' data from now on (one user, or a group)."""
        self.selected = [users] if isinstance(users, User) else list(users)
        return self

    def _check_ready(self) -> None:
        if self.tokenizer is None or not self.selected:
            raise RuntimeError("call attach_tokenizer() and select() before asking for data")

    def _repeats(self, examples: int) -> int:
        # Sparse history: a user with few items would get one or two optimizer steps per
        # epoch; repeating the whole history gives them as many as a user with
        # min_examples_per_epoch items (each item equally often).
        if examples and examples < self.min_examples_per_epoch:
            return math.ceil(self.min_examples_per_epoch / examples)
        return 1

    def examples_per_epoch(self, user: User) -> int:
        """How many training examples one epoch of this user's history holds."""
        return len(user.history) * self._repeats(len(user.history))

    def train_dataloader(self, epochs: int | None = 1) -> DataLoader:
        """The selected users' history pairs, shuffled, for `epochs` epochs (None: no end).

        The order is fixed by the global seed when this is called (`seed_user`): each
        epoch is one permutation drawn from a generator seeded then, as a shuffled
        DataLoader draws it, so epoch k is the same whatever else runs meanwhile.
        """
        self._check_ready()
        pairs = [pair for user in self.selected for pair in user.history]
        pairs = pairs * self._repeats(len(pairs))
        generator = torch.Generator().manual_seed(torch.initial_seed() % 2**63)
        return DataLoader(
            pairs,
            batch_sampler=ShuffledEpochs(len(pairs), self.batch_size, epochs, generator),
            generator=generator,
            collate_fn=TrainCollator(self.tokenizer, self.format),
        )

    def query_dataloader(self) -> DataLoader:
        """The selected users' queries, in file order."""
        self._check_ready()
        queries = [(user.user_id, q) for user in self.selected for q in user.queries]
        return DataLoader(
            queries,
            batch_size=self.eval_batch_size,
            collate_fn=QueryCollator(self.tokenizer, self.format),
        )

    def val_dataloader(self) -> DataLoader:
        return self.query_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.query_dataloader()
