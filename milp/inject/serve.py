"""Serving stored memories: many users' queries answered in mixed-user batches.

`MixedServer` loads up to `users_per_batch` users' memories from a run's adapter store
and answers their queries together: into one peft model, one adapter per user, with
peft's `adapter_names=[...]` giving every row its own user's adapter (`answer_mixed`);
or through milp's stacked memories (`MemoryBank`, `answer_routed`); or, as the
reference, one user at a time (`answer_one_at_a_time`). Users without a stored memory
are answered by the base model. `python -m milp.generate` is the command around it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel, get_peft_model, set_peft_model_state_dict

from milp.data.datamodule import PromptFormat, QueryCollator
from milp.data.users import Query, user_slug
from milp.errors import MilpError
from milp.inject.answer import generate_answers
from milp.inject.bank import MemoryBank
from milp.memory.adapters import (
    load_memory,
    merged_adapter,
    read_bank_weights,
    stored_memory_config,
)
from milp.memory.space import place_memory, remove_memory
from milp.run.store import user_memory

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class Request:
    """One query of one user."""

    user_id: str
    query: Query


class MixedServer:
    """Loads users' memories into one peft model and answers mixed-user batches."""

    def __init__(self, model, tokenizer, root: Path, prompt_format: PromptFormat, generation):
        self.model, self.tokenizer, self.root = model, tokenizer, root
        self.collate = QueryCollator(tokenizer, prompt_format)
        self.generation = dict(generation)

    def has_memory(self, user_id: str) -> bool:
        return user_memory(self.root, user_id) is not None

    def load(self, user_ids: Sequence[str]) -> PeftModel | None:
        """A peft model carrying these users' memories, one adapter per user."""
        peft_model = None
        for user_id in user_ids:
            name = user_slug(user_id)
            config, state = merged_adapter(self.root / name)
            if peft_model is None:
                peft_model = get_peft_model(self.model, config, adapter_name=name)
            else:
                peft_model.add_adapter(name, config)
            result = set_peft_model_state_dict(peft_model, state, adapter_name=name)
            if getattr(result, "unexpected_keys", None):
                raise MilpError(f"{self.root / name}: keys the model does not have")
        if peft_model is not None:
            peft_model.eval()
            peft_model.requires_grad_(False)
        return peft_model

    def generate(self, model, requests: Sequence[Request], adapter_names=None) -> list[str]:
        batch = self.collate([(r.user_id, r.query) for r in requests])
        kwargs = {"adapter_names": adapter_names} if adapter_names is not None else {}
        return generate_answers(model, self.tokenizer, batch, self.generation, **kwargs)

    def answer_mixed(
        self, requests: Sequence[Request], users_per_batch: int, batch_size: int
    ) -> tuple[list[str], dict[str, float]]:
        """All requests, `users_per_batch` users' memories loaded at a time."""
        users = list(dict.fromkeys(r.user_id for r in requests))
        answers: dict[int, str] = {}
        timing = {"load_seconds": 0.0, "generate_seconds": 0.0}
        for start in range(0, len(users), users_per_batch):
            group = users[start : start + users_per_batch]
            with_memory = [u for u in group if self.has_memory(u)]
            started = time.perf_counter()
            peft_model = self.load(with_memory)
            timing["load_seconds"] += time.perf_counter() - started
            started = time.perf_counter()
            chosen = set(group)
            rows = [i for i, r in enumerate(requests) if r.user_id in chosen]
            for first in range(0, len(rows), batch_size):
                part = rows[first : first + batch_size]
                names = [
                    user_slug(requests[i].user_id) if requests[i].user_id in with_memory else BASE
                    for i in part
                ]
                model = peft_model if peft_model is not None else self.model
                texts = self.generate(
                    model, [requests[i] for i in part], names if peft_model else None
                )
                answers.update(zip(part, texts, strict=True))
            timing["generate_seconds"] += time.perf_counter() - started
            if peft_model is not None:
                self.model = peft_model.unload()
        return [answers[i] for i in range(len(requests))], timing

    def answer_routed(
        self, requests: Sequence[Request], users_per_batch: int, batch_size: int
    ) -> tuple[list[str], dict[str, float]]:
        """The same mixed batches through milp's stacked memories (`MemoryBank`): per
        layer one matrix-product pair per user's rows, instead of peft's per-adapter loop."""
        users = list(dict.fromkeys(r.user_id for r in requests))
        stored = [u for u in users if self.has_memory(u)]
        answers: dict[int, str] = {}
        timing = {"load_seconds": 0.0, "generate_seconds": 0.0}
        started = time.perf_counter()
        bank = memory = targets = None
        if stored:
            memory = stored_memory_config(self.root / user_slug(stored[0]))
            targets = place_memory(memory, self.model).targets
            device = next(self.model.parameters()).device
            bank = MemoryBank(targets, min(users_per_batch, len(stored)), memory, device=device)
            bank.attach(self.model)
        timing["load_seconds"] += time.perf_counter() - started
        try:
            for start in range(0, len(users), users_per_batch):
                group = users[start : start + users_per_batch]
                started = time.perf_counter()
                slot_of: dict[str, int] = {}
                for user_id in group:
                    if bank is not None and self.has_memory(user_id):
                        weights = read_bank_weights(self.root / user_slug(user_id), targets, memory)
                        bank.load_user(len(slot_of), weights)
                        slot_of[user_id] = len(slot_of)
                timing["load_seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                chosen = set(group)
                rows = [i for i, r in enumerate(requests) if r.user_id in chosen]
                rows.sort(key=lambda i: slot_of.get(requests[i].user_id, -1))  # users together
                for first in range(0, len(rows), batch_size):
                    part = rows[first : first + batch_size]
                    slots = [slot_of.get(requests[i].user_id, -1) for i in part]
                    batch = [requests[i] for i in part]
                    if bank is None:
                        texts = self.generate(self.model, batch)
                    else:
                        with bank.routing(slots):
                            texts = self.generate(self.model, batch)
                    answers.update(zip(part, texts, strict=True))
                timing["generate_seconds"] += time.perf_counter() - started
        finally:
            if bank is not None:
                bank.detach(self.model)
        return [answers[i] for i in range(len(requests))], timing

    def answer_one_at_a_time(self, requests: Sequence[Request]) -> tuple[list[str], dict]:
        """The reference: per user, load its memory, answer its queries, unload."""
        answers: dict[int, str] = {}
        timing = {"load_seconds": 0.0, "generate_seconds": 0.0}
        for user_id in dict.fromkeys(r.user_id for r in requests):
            rows = [i for i, r in enumerate(requests) if r.user_id == user_id]
            started = time.perf_counter()
            model = self.model
            if self.has_memory(user_id):
                model = load_memory(self.model, self.root / user_slug(user_id))
            timing["load_seconds"] += time.perf_counter() - started
            started = time.perf_counter()
            answers.update(
                zip(rows, self.generate(model, [requests[i] for i in rows]), strict=True)
            )
            timing["generate_seconds"] += time.perf_counter() - started
            if model is not self.model:
                self.model = remove_memory(model)
        return [answers[i] for i in range(len(requests))], timing
