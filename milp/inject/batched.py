"""The batched injector: many users' memories trained per forward/backward pass.

`SlotTrainer` keeps `users_per_batch` slots of a `MemoryBank` busy (continuous
batching): each step takes the next mini-batch of every user in a slot (exactly the
mini-batches that user's own Lightning run would see: same DataLoader, same seed), runs
them as one batch, and gives each user its own loss (mean over its own target tokens),
its own gradient clipping and its own AdamW step. A user whose steps are done leaves
its slot to the next user at once. Users are taken longest-first so the slots stay full.

Each user's memory therefore follows the trajectory of the sequential path: same
initial weights (peft's draws after the user's seed), same batches, same optimizer
update, up to floating-point summation order. `users_per_batch` changes speed, not
results.

`BatchedInjector` (`injection=batched`) answers each group of `users_per_batch` finished
users' queries in mixed-user batches, every row routed to its own user's memory (and
once more with no routing for the no-memory baseline).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from milp.adapters import bank_module_states, read_bank_weights
from milp.data.datamodule import UserDataModule
from milp.data.users import User
from milp.errors import MilpError
from milp.inject import Injector, Report, TrainedUser, seed_user
from milp.inject.answer import answer_queries
from milp.inject.bank import MemoryBank, UserWeights, fresh_weights
from milp.inject.fast import FastPath, fast_autocast, fast_training
from milp.inject.loss import pack_rows, pad_batch, target_loss
from milp.inject.slot_optim import SlotAdamW, clip_grad_norm_per_slot, clip_grad_value_
from milp.memory import MemoryConfig, Target

# Trainer settings the batched loop follows; anything else in `trainer` that changes
# training is refused rather than silently ignored.
SUPPORTED_PRECISION = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16}


@dataclass(frozen=True)
class TrainSettings:
    """The per-user training schedule, read from the Lightning Trainer config."""

    max_epochs: int = 1
    max_steps: int = -1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    precision: str = "32-true"
    device: str = "cpu"

    @classmethod
    def from_trainer_config(cls, trainer: DictConfig | dict) -> TrainSettings:
        cfg = (
            OmegaConf.to_container(trainer, resolve=True)
            if isinstance(trainer, DictConfig)
            else dict(trainer)
        )
        for key, default in (("accumulate_grad_batches", 1), ("limit_train_batches", 1.0)):
            if cfg.get(key, default) != default:
                raise MilpError(f"trainer.{key}={cfg[key]} is not supported with injection=batched")
        precision = str(cfg.get("precision", "32-true"))
        if precision not in SUPPORTED_PRECISION:
            raise MilpError(
                f"trainer.precision={precision} is not supported with injection=batched;"
                f" use one of {', '.join(SUPPORTED_PRECISION)}"
            )
        algorithm = str(cfg.get("gradient_clip_algorithm") or "norm")
        if algorithm not in ("norm", "value"):
            raise MilpError(f"trainer.gradient_clip_algorithm={algorithm} is not norm or value")
        max_epochs = cfg.get("max_epochs")
        max_steps = int(cfg.get("max_steps", -1) or -1)
        if max_epochs is None or max_epochs < 0:
            max_epochs = 1000 if max_steps < 0 else -1  # Lightning's defaults
        return cls(
            max_epochs=int(max_epochs),
            max_steps=max_steps,
            gradient_clip_val=cfg.get("gradient_clip_val"),
            gradient_clip_algorithm=algorithm,
            precision=precision,
            device=resolve_device(cfg.get("accelerator", "auto"), cfg.get("devices", 1)),
        )


def resolve_device(accelerator: str, devices: Any = 1) -> str:
    """The one device this process trains on (`cuda:<LOCAL_RANK>` under a launcher)."""
    accelerator = str(accelerator)
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise MilpError("trainer.accelerator asks for a GPU but CUDA is not available")
        if isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) == 1:
            return f"cuda:{int(devices[0])}"
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if accelerator in ("cpu", "mps"):
        return accelerator
    raise MilpError(f"trainer.accelerator={accelerator} is not supported by the batched path")


@dataclass
class FinishedUser:
    """A user whose memory is trained: weights (CPU) and what the loop measured."""

    user: User
    weights: UserWeights
    train_loss: float | None
    steps: int
    tokens: int
    train_seconds: float


@dataclass
class _Slot:
    user: User
    stream: Iterator[dict]
    upcoming: dict | None
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss: float | None = None
    extra: dict = field(default_factory=dict)


def _batches(loader, max_epochs: int, max_steps: int) -> Iterator[dict]:
    """A user's mini-batches in the order its own Trainer.fit would draw them.

    Like Lightning, an epoch takes `len(loader)` batches without asking the exhausted
    sampler for more: asking would draw one more permutation from the loader's generator
    when the history is a multiple of the batch size, and shuffle the next epoch
    differently.
    """
    steps = 0
    epoch = 0
    try:
        per_epoch = len(loader)
    except TypeError:  # an iterable-style loader: exhaust it
        per_epoch = None
    while max_epochs < 0 or epoch < max_epochs:
        for batch in itertools.islice(loader, per_epoch):
            yield batch
            steps += 1
            if 0 < max_steps <= steps:
                return
        epoch += 1


def planned_steps(user: User, batch_size: int, settings: TrainSettings) -> int:
    per_epoch = math.ceil(len(user.history) / batch_size)
    steps = per_epoch * settings.max_epochs if settings.max_epochs >= 0 else math.inf
    return int(min(steps, settings.max_steps if settings.max_steps > 0 else math.inf))


class SlotTrainer:
    """Trains the memories of many users through one `MemoryBank` of `slots` users."""

    def __init__(
        self,
        model: nn.Module,
        pad_token_id: int,
        memory: MemoryConfig,
        slots: int,
        settings: TrainSettings,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        targets: list[Target] = (),
        fast: FastPath | None = None,
        start_layer: int = 0,
    ) -> None:
        self.model, self.pad_token_id, self.memory = model, pad_token_id, memory
        self.settings = settings
        self.fast = fast if fast is not None else FastPath.from_config(False)
        self.start_layer = int(start_layer)
        self.prefix = None
        self.device = torch.device(settings.device)
        self.targets = list(targets)
        self.bank = MemoryBank(self.targets, slots, memory, device=self.device)
        self.optimizer = SlotAdamW(
            self.bank, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps
        )
        self.autocast_dtype = SUPPORTED_PRECISION[settings.precision]

    def _autocast(self):
        if self.autocast_dtype is None:  # trainer.precision 32-true: the fast path's choice
            return fast_autocast(self.device, self.fast.bf16)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train(
        self,
        users: Sequence[User],
        datamodule: UserDataModule,
        start: Callable[[User], UserWeights],
        seed: int = 0,
        report: Callable[[str], None] | None = None,
    ) -> Iterator[FinishedUser]:
        """Train every user's memory; yields each user as soon as its steps are done.

        `start(user)` gives the user's initial weights; it is called right after the
        user's seed is set (so fresh weights drawn from the global RNG match peft's).
        The bank is attached to the model while this runs.
        """
        settings, slots = self.settings, self.bank.slots
        queue = sorted(
            users, key=lambda u: -planned_steps(u, datamodule.batch_size, settings)
        )  # longest first keeps the slots busy until the end
        active: list[_Slot | None] = [None] * slots
        planned = sum(planned_steps(u, datamodule.batch_size, settings) for u in users)
        steps_done = 0
        self.model.to(self.device)
        # Module modes stay as they are, as under Lightning's fit: the frozen base as loaded
        # (eval), the new memory wrappers in training mode (their dropout is active).
        self.bank.attach(self.model)
        try:
            with fast_training(self.model, self.fast, self.device, self.start_layer) as fast:
                self.prefix = fast.prefix
                while True:
                    for s in range(slots):
                        while active[s] is None and queue:
                            active[s] = self._enter(queue.pop(0), s, datamodule, start, seed)
                            if active[s].upcoming is None:  # nothing to train on at all
                                with fast.paused():  # the caller may answer meanwhile
                                    yield self._leave(active, s)
                    running = [s for s in range(slots) if active[s] is not None]
                    if not running:
                        return
                    started = time.perf_counter()
                    parts = [active[s].upcoming for s in running]
                    losses, tokens = self._step(running, parts)
                    for s in running:
                        slot = active[s]
                        slot.upcoming = next(slot.stream, None)
                    elapsed = time.perf_counter() - started
                    steps_done += len(running)
                    if report is not None:
                        report(f"{len(running)} training, user-steps {steps_done}/{planned}")
                    total_tokens = max(sum(int(tokens[s]) for s in running), 1)
                    for s in running:
                        slot = active[s]
                        slot.steps += 1
                        slot.tokens += int(tokens[s])
                        slot.seconds += elapsed * int(tokens[s]) / total_tokens
                        slot.loss = float(losses[s])
                        if slot.upcoming is None:
                            with fast.paused():
                                yield self._leave(active, s)
        finally:
            self.prefix = None
            self.bank.detach(self.model)

    def _enter(self, user, slot, datamodule, start, seed) -> _Slot:
        started = time.perf_counter()
        seed_user(seed, user.seed_id)
        self.bank.load_user(slot, start(user))
        self.optimizer.reset_slot(slot)
        # Created right after the seed, as in the user's own Trainer.fit: same shuffling.
        loader = datamodule.select(user).train_dataloader()
        stream = _batches(loader, self.settings.max_epochs, self.settings.max_steps)
        entry = _Slot(user, stream, next(stream, None))
        entry.seconds = time.perf_counter() - started
        return entry

    def _leave(self, active: list[_Slot | None], s: int) -> FinishedUser:
        slot = active[s]
        active[s] = None
        if self.prefix is not None:
            self.prefix.release(s)
        return FinishedUser(
            slot.user, self.bank.user_weights(s), slot.loss, slot.steps, slot.tokens, slot.seconds
        )

    def _step(self, running: list[int], parts: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = pad_batch(parts, self.pad_token_id)
        row_slots = torch.cat(
            [
                torch.full((p["input_ids"].shape[0],), s, dtype=torch.long)
                for s, p in zip(running, parts, strict=True)
            ]
        )
        tokens = torch.zeros(self.bank.slots, dtype=torch.long)
        tokens.index_add_(0, row_slots, batch["attention_mask"].sum(1))
        if self.fast.pack:  # a slot's examples share rows no wider than the padded batch
            width = batch["input_ids"].shape[1]
            batch = pack_rows(batch, row_slots.tolist(), self.pad_token_id, max_width=width)
            row_slots = batch.pop("groups").cpu()
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        owners = row_slots.tolist()  # prefix-cache entries are filed by slot
        with self.bank.routing(row_slots), self._autocast():
            rows = target_loss(self.model, batch, self.prefix, owners)
            losses, _ = rows.per_group(row_slots.to(self.device), self.bank.slots)
        losses[running].sum().backward()
        settings = self.settings
        if settings.gradient_clip_val:
            if settings.gradient_clip_algorithm == "norm":
                clip_grad_norm_per_slot(self.bank, float(settings.gradient_clip_val))
            else:
                clip_grad_value_(self.bank, float(settings.gradient_clip_val))
        self.optimizer.step(running)
        self.optimizer.zero_grad()
        return losses.detach().cpu(), tokens


class BatchedInjector(Injector):
    """Trains `users_per_batch` users per pass, then answers them in mixed batches."""

    def __init__(self, *args: Any, users_per_batch: int = 16, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if int(users_per_batch) < 1:
            raise MilpError(f"injection.users_per_batch must be >= 1, got {users_per_batch}")
        self.slots = int(users_per_batch)
        self.settings = TrainSettings.from_trainer_config(self.trainer)
        if self.memory.enabled:
            self.targets = self.placement.targets
            self.loop = SlotTrainer(
                self.base.model,
                self.base.tokenizer.pad_token_id,
                self.memory,
                self.slots,
                self.settings,
                targets=self.targets,
                fast=self.fast,
                start_layer=min(self.placement.layers) if self.placement else 0,
                **self.optim,
            )
            self.answer_bank = MemoryBank(
                self.targets, self.slots, self.memory, device=self.loop.device
            )

    def _run(
        self, users: Sequence[User], start: Path | None, optim: dict, report: Report
    ) -> Iterator[TrainedUser]:
        if not self.memory.enabled:  # zero-shot: answer in mixed batches, nothing to train
            for first in range(0, len(users), self.slots):
                yield from self._answer([(u, None) for u in users[first : first + self.slots]])
            return
        if not self.trains:  # memory.trained_in: answer with the stored memories
            for first in range(0, len(users), self.slots):
                group = users[first : first + self.slots]
                yield from self._answer([(u, self._stored(u)) for u in group])
            return
        self.loop.optimizer.lr = optim["lr"]

        def first_weights(user: User) -> UserWeights:
            stored = self.stored_memory(user, start)
            if stored is None:
                return fresh_weights(self.targets, self.memory)
            return read_bank_weights(stored, self.targets, self.memory)

        group: list[tuple[User, FinishedUser]] = []
        trained = self.loop.train(
            users, self.datamodule, first_weights, seed=self.seed, report=report
        )
        for done in trained:
            group.append((done.user, done))
            if len(group) == self.slots:
                yield from self._answer(group)
                group = []
        if group:
            yield from self._answer(group)

    def _stored(self, user: User) -> FinishedUser:
        """A user whose memory is taken as stored (`memory.trained_in`), untrained here."""
        weights = read_bank_weights(self.stored_memory(user), self.targets, self.memory)
        return FinishedUser(user, weights, train_loss=None, steps=0, tokens=0, train_seconds=0.0)

    def _answer(self, group: list[tuple[User, FinishedUser | None]]) -> Iterator[TrainedUser]:
        """Answer a group of users (each row routed to its user's slot); the answering time
        is shared equally among them."""
        started = time.perf_counter()
        model, bank = self.base.model, None
        slot_of = {}
        if self.memory.enabled:
            bank = self.answer_bank
            for slot, (user, done) in enumerate(group):
                bank.load_user(slot, done.weights)
                slot_of[user.user_id] = slot
            bank.attach(model)

        def switch(user_ids: list[str], use_memory: bool):
            if bank is None:
                return nullcontext()
            return bank.routing([slot_of[u] for u in user_ids] if use_memory else None)

        try:
            answers = answer_queries(
                model,
                self.base.tokenizer,
                self.datamodule,
                [user for user, _ in group],
                switch,
                self.generation,
                self.compare_without_memory,
                bf16=self.fast.bf16_answers,
            )
        finally:
            if bank is not None:
                bank.detach(model)
        share = (time.perf_counter() - started) / len(group)
        for user, done in group:
            yield TrainedUser(
                user=user,
                answers=answers,
                memory=None
                if done is None
                else bank_module_states(self.targets, done.weights, self.memory),
                trainable_parameters=self.loop.bank.parameters_per_user() if done else 0,
                train_loss=done.train_loss if done else None,
                train_seconds=done.train_seconds if done else 0.0,
                seconds=(done.train_seconds if done else 0.0) + share,
            )
