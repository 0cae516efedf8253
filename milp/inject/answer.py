"""Answering users' queries with their memory, and once more without it, and scoring both.

Every answering path goes through `answer_queries`; they differ only in how a memory is
switched on for a batch (`MemorySwitch`): a peft model holding stored memories (on: as
is; off: `disable_adapter()`), or the injector's `MemoryBank`, which routes each row to
its user's slot (off: no routing). Decoding is greedy unless the
`generation` settings say otherwise, in eval mode and without gradients, so answers are
reproducible.

Besides the generated answer, each query with a gold output gets the gold's likelihood
(`gold_nll`): one teacher-forced forward per batch and memory state, on the very prompt
tokens generation sees (left-padded, retrieval included when on) followed by the gold's
target tokens as training lays them out (`PromptFormat.target_ids`: the target prefix,
the gold, end-of-sequence). Only the target tokens are scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from inspect import signature
from typing import Any

import torch
from torch import nn

from milp.data.datamodule import PromptFormat, UserDataModule, pad_right
from milp.data.users import User
from milp.evaluation.metrics import ResponseMetrics, tokenize
from milp.inject.fast import bf16_frozen_weights, bf16_supported, fast_autocast

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


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether the (peft-wrapped) model's forward takes this keyword."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in signature(inner.forward).parameters


@torch.no_grad()
def gold_nll(
    model: nn.Module, batch: dict, targets: Sequence[list[int] | None], pad_token_id: int
) -> list[float | None]:
    """Mean token NLL (nats) of each row's target tokens after its prompt, teacher-forced.

    `batch` is a left-padded query batch (`QueryCollator`); `targets[i]` are row i's
    target token ids (None: not scored, e.g. no gold). The targets go right after the
    prompts and are right-padded; positions count from each row's first real token, as
    `generate` counts them, so a row's NLL does not depend on the padding beside it.
    One forward for the whole batch (every row: memory routing is per row).
    """
    if not any(targets):
        return [None] * len(targets)
    device = next(model.parameters()).device
    filled = [t if t else [pad_token_id] for t in targets]
    target = pad_right(filled, pad_token_id).to(device)
    target_mask = pad_right([[1] * len(t) for t in filled], 0).to(device)
    input_ids = torch.cat([batch["input_ids"].to(device), target], dim=1)
    attention_mask = torch.cat([batch["attention_mask"].to(device), target_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    width = target.shape[1]
    # Only the logits that predict target tokens: the last prompt position onwards.
    keep = {"logits_to_keep": width + 1} if _accepts(model, "logits_to_keep") else {}
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **keep,
    ).logits
    logits = logits[:, -(width + 1) : -1].float()
    log_probs = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    mask = target_mask.to(log_probs.dtype)
    nll = -(log_probs * mask).sum(1) / mask.sum(1)
    return [float(v) if t else None for v, t in zip(nll.tolist(), targets, strict=True)]


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

    def score(
        self,
        key: str,
        user_id: str,
        prediction: str,
        gold: str | None,
        tokens,
        nll: float | None = None,
    ) -> None:
        """Add one answer to a user's metrics (`tokens`: the user's history tokens; `nll`:
        the gold's mean token NLL, if scored)."""
        if gold is not None:
            metric = self.metrics.setdefault(f"{key}/{user_id}", ResponseMetrics())
            metric.update([prediction], [gold], tokens, None if nll is None else [nll])


def gold_targets(
    prompt_format: PromptFormat, tokenizer: Any, golds: Sequence[str | None]
) -> list[list[int] | None]:
    """The target token ids of a batch's golds, laid out as training lays out targets."""
    return [None if g is None else prompt_format.target_ids(tokenizer, g) for g in golds]


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
    `compare_without_memory`, without it, and score each gold's NLL in the same states;
    the model's module modes are restored after. `bf16`: decode and score under bf16
    autocast with bf16 frozen weights where the hardware has bf16
    (`injection.fast.bf16_answers`; answers may then differ from float32's)."""
    tokens = {u.user_id: history_tokens(u) for u in users}
    answers = Answers()
    modes = {m: m.training for m in model.modules()}
    model.eval()
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    bf16 = bf16 and bf16_supported(device)
    precision = ExitStack()
    precision.enter_context(fast_autocast(device, bf16))
    precision.enter_context(bf16_frozen_weights(model, bf16))
    try:
        for batch in datamodule.select(list(users)).query_dataloader():
            ids = batch["user_ids"]
            targets = gold_targets(datamodule.format, tokenizer, batch["golds"])
            with switch(ids, True):
                texts = generate_answers(model, tokenizer, batch, generation)
                nlls = gold_nll(model, batch, targets, pad)
            baseline = baseline_nlls = None
            if compare_without_memory:
                with switch(ids, False):
                    baseline = generate_answers(model, tokenizer, batch, generation)
                    baseline_nlls = gold_nll(model, batch, targets, pad)
            for i, (user_id, gold) in enumerate(zip(ids, batch["golds"], strict=True)):
                answers.score("memory", user_id, texts[i], gold, tokens[user_id], nlls[i])
                record = {
                    "id": batch["query_ids"][i],
                    "user_id": user_id,
                    "prediction": texts[i],
                    "gold": gold,
                    "nll": nlls[i],
                }
                if baseline is not None:
                    answers.score(
                        "no_memory", user_id, baseline[i], gold, tokens[user_id], baseline_nlls[i]
                    )
                    record["prediction_no_memory"] = baseline[i]
                    record["nll_no_memory"] = baseline_nlls[i]
                answers.predictions.append(record)
    finally:
        precision.close()
        for m, mode in modes.items():
            m.training = mode
    return answers
