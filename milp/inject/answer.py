"""Answering users' queries with their memory, and once more without it, and scoring both.

Both injectors answer through `answer_queries`; they differ only in how a memory is
switched on for a batch (`MemorySwitch`): the per-user path has one user's peft memory in
the model (on: as is; off: `disable_adapter()`), the batched path routes each row to its
user's slot of a `MemoryBank` (off: no routing). Decoding is greedy unless the
`generation` settings say otherwise, in eval mode and without gradients, so answers are
reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from milp.data.datamodule import UserDataModule
from milp.data.users import User
from milp.inject.fast import bf16_frozen_weights, bf16_supported, fast_autocast
from milp.metrics import ResponseMetrics, tokenize

# switch(user_ids of the batch's rows, use_memory) -> a context in which the model answers
# those rows with (or without) their users' memory.
MemorySwitch = Callable[[list[str], bool], AbstractContextManager]
DEFAULT_GENERATION = {"max_new_tokens": 32, "do_sample": False, "num_beams": 1}


def history_tokens(user: User) -> set[str]:
    """The tokens of everything in a user's history: H in persona-F1."""
    return {t for text in user.profile_texts for t in tokenize(text)}


@torch.no_grad()
def generate_answers(
    model: nn.Module, tokenizer: Any, batch: dict, generation: dict, **kwargs: Any
) -> list[str]:
    """Decode continuations of a left-padded batch of prompts."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=batch["attention_mask"].to(device),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **(DEFAULT_GENERATION | dict(generation)),
        **kwargs,
    )
    texts = tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
    return [t.strip() for t in texts]


@dataclass
class Answers:
    """Predictions of a group of users and their metrics, with and without memory."""

    predictions: list[dict] = field(default_factory=list)
    metrics: dict[str, ResponseMetrics] = field(default_factory=dict)

    def user_metrics(self, user_id: str, key: str = "memory") -> dict[str, float] | None:
        """One user's metrics (`memory` or `no_memory`), if the user had gold answers."""
        metric = self.metrics.get(f"{key}/{user_id}")
        return metric.compute() if metric is not None else None

    def user_predictions(self, user_id: str) -> list[dict]:
        return [p for p in self.predictions if p["user_id"] == user_id]

    def score(self, key: str, user_id: str, prediction: str, gold: str | None, tokens) -> None:
        """Add one answer to a user's metrics (`tokens`: the user's history tokens)."""
        if gold is not None:
            metric = self.metrics.setdefault(f"{key}/{user_id}", ResponseMetrics())
            metric.update([prediction], [gold], tokens)


def answer_queries(
    model: nn.Module,
    tokenizer: Any,
    datamodule: UserDataModule,
    users: Sequence[User],
    switch: MemorySwitch,
    generation: dict,
    compare_without_memory: bool,
    bf16: bool = False,
) -> Answers:
    """Answer every query of `users` (in file order, mixed batches), with memory and, if
    `compare_without_memory`, without it; the model's module modes are restored after.
    `bf16`: decode under bf16 autocast with bf16 frozen weights where the hardware has
    bf16 (`injection.fast.bf16_answers`; answers may then differ from float32's)."""
    tokens = {u.user_id: history_tokens(u) for u in users}
    answers = Answers()
    modes = {m: m.training for m in model.modules()}
    model.eval()
    device = next(model.parameters()).device
    bf16 = bf16 and bf16_supported(device)
    precision = ExitStack()
    precision.enter_context(fast_autocast(device, bf16))
    precision.enter_context(bf16_frozen_weights(model, bf16))
    try:
        for batch in datamodule.select(list(users)).query_dataloader():
            ids = batch["user_ids"]
            with switch(ids, True):
                texts = generate_answers(model, tokenizer, batch, generation)
            baseline = None
            if compare_without_memory:
                with switch(ids, False):
                    baseline = generate_answers(model, tokenizer, batch, generation)
            for i, (user_id, gold) in enumerate(zip(ids, batch["golds"], strict=True)):
                answers.score("memory", user_id, texts[i], gold, tokens[user_id])
                record = {
                    "id": batch["query_ids"][i],
                    "user_id": user_id,
                    "prediction": texts[i],
                    "gold": gold,
                }
                if baseline is not None:
                    answers.score("no_memory", user_id, baseline[i], gold, tokens[user_id])
                    record["prediction_no_memory"] = baseline[i]
                answers.predictions.append(record)
    finally:
        precision.close()
        for m, mode in modes.items():
            m.training = mode
    return answers
