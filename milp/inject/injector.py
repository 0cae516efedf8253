"""The injector: trains users' memories on their histories and answers their queries.

`Injector.run(users)` yields each user as a `TrainedUser` as soon as it is answered.
`users_per_batch` users train together (`conf/injection/*.yaml`: `sequential` is 1,
`batched` 16): their memories sit in the slots of a `MemoryBank` and a Lightning
Trainer steps them together (`milp.inject.module.MemoryTraining`), each user with its
own loss, clipping and AdamW state, on its own mini-batches (`milp.inject.schedule`).
A user whose steps are done leaves its slot to the next user at once. Each user's
memory follows the trajectory of its own one-user run (same initial weights, drawn as
peft draws them after the user's seed; same batches; same update) up to float
summation order, so `users_per_batch` changes speed, not results (with
`memory.dropout > 0`, the dropout masks differ: equal in distribution only).

Between training steps, each group of `users_per_batch` finished users is answered in
mixed-user batches, every row routed to its own user's memory (and once more with no
routing for the no-memory baseline).

Incremental memory (`memory.resume_from`): a user with a stored memory there starts from
it (all modules, trainable; fresh optimizer state); the stored run is only read.
`run(users, start=...)` names the stored memory every other user starts from (the run's
task memory, for `memory.init=task`); `lr=` a rate other than `optim.lr`. Stored
memories as they are (`memory.trained_in`): each user is answered with the memory
another run trained on the history this user is given (its owner's, `User.seed_id`),
checked against that run's record; nothing trains.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate

from milp.data.datamodule import UserDataModule
from milp.data.users import User
from milp.errors import MilpError
from milp.inject import Report, TrainedUser, quiet_lightning, seed_user
from milp.inject.answer import answer_queries
from milp.inject.bank import MemoryBank, UserWeights, fresh_weights
from milp.inject.fast import FastPath, fast_training
from milp.inject.module import MemoryTraining
from milp.inject.schedule import UserSchedule, UserSteps
from milp.inject.slot_optim import SlotAdamW
from milp.memory.adapters import bank_module_states, find_memory, read_bank_weights, verify_memory
from milp.memory.space import MemoryConfig, MemoryPlacement
from milp.models.hf import BaseModel
from milp.run.store import adapters_root, recorded_memory


@dataclass
class FinishedUser:
    """A user whose memory is trained (or taken as stored): weights (CPU) and what its
    training measured."""

    user: User
    weights: UserWeights
    train_loss: float | None
    train_seconds: float


class Injector:
    """Trains `users_per_batch` users per step, then answers them in mixed batches."""

    def __init__(
        self,
        base: BaseModel,
        memory: MemoryConfig,
        placement: MemoryPlacement | None,
        datamodule: UserDataModule,
        *,
        trainer: Any,
        optim: dict,
        generation: dict,
        compare_without_memory: bool,
        seed: int,
        callbacks: Any = None,
        fast: Any = None,
        users_per_batch: int = 1,
    ) -> None:
        if int(users_per_batch) < 1:
            raise MilpError(f"injection.users_per_batch must be >= 1, got {users_per_batch}")
        self.base, self.memory, self.placement = base, memory, placement
        self.datamodule = datamodule
        self.trainer, self.callbacks = trainer, callbacks
        self.optim, self.generation = dict(optim), dict(generation)
        self.compare_without_memory = bool(compare_without_memory) and memory.enabled
        self.seed, self.slots = int(seed), int(users_per_batch)
        self.fast = FastPath.from_config(fast)
        self.resume_root = (
            adapters_root(memory.resume_from, "memory.resume_from") if memory.resume_from else None
        )
        self.trained_root = (
            adapters_root(memory.trained_in, "memory.trained_in") if memory.trained_in else None
        )
        self.targets = placement.targets if memory.enabled else []
        if memory.enabled:
            device = self._settings().strategy.root_device
            self.bank = MemoryBank(self.targets, self.slots, memory, device=device)
            self.answer_bank = MemoryBank(self.targets, self.slots, memory, device=device)

    @property
    def trains(self) -> bool:
        """Whether users' memories are trained (not taken as they are, `memory.trained_in`)."""
        return self.memory.enabled and self.trained_root is None

    def stored_memory(self, user: User, start: Path | None = None) -> Path | None:
        """The memory the user starts from (`trained_memory` with `memory.trained_in`):
        theirs under `memory.resume_from`, else `start`; None: fresh modules."""
        if self.trained_root is not None:
            return self.trained_memory(user)
        if self.resume_root is not None:
            stored = find_memory(self.resume_root, user.user_id, self.memory, self.placement)
            if stored is not None:
                return stored
        return start

    def trained_memory(self, user: User) -> Path:
        """With `memory.trained_in`: the stored memory of the history `user` is given (its
        owner's), whose files must hash as that run's result record lists them."""
        root, owner = self.trained_root, user.seed_id
        key = "memory.trained_in"
        stored = find_memory(root, owner, self.memory, self.placement, key=key)
        recorded = recorded_memory(root, owner)
        if stored is None or recorded is None:
            raise MilpError(
                f"{key}: {root} holds no finished memory of user {owner!r} "
                f"(needed to answer user {user.user_id!r}); finish that run first"
            )
        try:
            verify_memory(stored, recorded)
        except MilpError as err:
            raise MilpError(f"{key}: {err}") from None
        return stored

    def run(
        self,
        users: Sequence[User],
        start: Path | None = None,
        lr: float | None = None,
        report: Report = None,
    ) -> Iterator[TrainedUser]:
        """Train and answer `users`, yielding each when done: from `start` (a stored
        memory; see `stored_memory`), at `lr` (else `optim.lr`); `report` is given a short
        status of the training steps as they go (the run's progress bar shows it)."""
        if not self.memory.enabled:  # zero-shot: answer in mixed batches, nothing to train
            finished: Iterator[FinishedUser | User] = iter(users)
        elif not self.trains:  # memory.trained_in: answer with the stored memories
            finished = (self._stored(u) for u in users)
        else:
            finished = self.train(users, start, lr, report)
        group: list[FinishedUser | User] = []
        for done in finished:
            group.append(done)
            if len(group) == self.slots:
                yield from self._answer(group)
                group = []
        if group:
            yield from self._answer(group)

    # ------------------------------------------------------------------------ training

    def _settings(self, **overrides: Any) -> L.Trainer:
        """A Trainer built from `conf/trainer` (its limits are each user's)."""
        with quiet_lightning():
            trainer = instantiate(self.trainer, logger=False, **overrides)
        for key, one in (("accumulate_grad_batches", 1), ("limit_train_batches", 1.0)):
            if getattr(trainer, key) != one:
                raise MilpError(f"trainer.{key}={getattr(trainer, key)} is not supported")
        return trainer

    def train(
        self,
        users: Sequence[User],
        start: Path | None = None,
        lr: float | None = None,
        report: Report = None,
    ) -> Iterator[FinishedUser]:
        """Train every user's memory (as `run` does, without answering); yields each user
        as soon as its steps are done, with the model as it was (the fast path's setup is
        paused meanwhile)."""
        optim = self.optim | ({} if lr is None else {"lr": float(lr)})
        limits = self._settings()
        steps = UserSteps(
            epochs=None if limits.max_epochs in (None, -1) else int(limits.max_epochs),
            max_steps=None if limits.max_steps < 0 else int(limits.max_steps),
        )
        model, device = self.base.model, limits.strategy.root_device
        schedule = UserSchedule(
            users,
            self.slots,
            steps,
            self.datamodule,
            self.base.tokenizer.pad_token_id,
            self.fast.pack,
            report,
        )
        optimizer = SlotAdamW(self.bank, **optim)

        def enter(slot: int, user: User) -> None:
            seed_user(self.seed, user.seed_id)  # before the fresh weights and the batches
            stored = self.stored_memory(user, start)
            weights = (
                fresh_weights(self.targets, self.memory)
                if stored is None
                else read_bank_weights(stored, self.targets, self.memory)
            )
            self.bank.load_user(slot, weights)
            optimizer.reset_slot(slot)

        start_layer = min(self.placement.layers) if self.placement else 0
        model.to(device)
        # Module modes stay as they are, as Lightning's fit leaves them: the frozen base as
        # loaded (eval), the memory wrappers in training mode (their dropout is active).
        with (
            self.bank.attached(model),
            fast_training(model, self.fast, device, start_layer) as fast,
        ):
            module = MemoryTraining(model, self.bank, optimizer, schedule, self.fast, fast.prefix)
            while True:
                schedule.admit(enter)
                done = schedule.finished()
                for slot, occupant in done:
                    if fast.prefix is not None:
                        fast.prefix.release(slot)
                    with fast.paused():  # the caller may answer meanwhile
                        yield FinishedUser(
                            occupant.user,
                            self.bank.user_weights(slot),
                            occupant.loss,
                            occupant.seconds,
                        )
                if done:
                    continue  # fill the freed slots before the next step
                if schedule.idle:
                    return
                self._fit(module, schedule)

    def _fit(self, module: MemoryTraining, schedule: UserSchedule) -> None:
        """Step the users in training until one of them is done."""
        callbacks = list(instantiate(self.callbacks).values()) if self.callbacks else []
        trainer = self._settings(callbacks=callbacks, max_epochs=1, max_steps=-1)
        with quiet_lightning():
            trainer.fit(module, train_dataloaders=schedule)
        if schedule.unrecorded:
            raise MilpError(
                "memory training stopped before its users' steps were done (a callback or "
                "trainer.max_time stopped the Trainer); each user trains for "
                "trainer.max_epochs / trainer.max_steps"
            )

    # ------------------------------------------------------------------------ answering

    def _stored(self, user: User) -> FinishedUser:
        """A user whose memory is taken as stored (`memory.trained_in`), untrained here."""
        weights = read_bank_weights(self.stored_memory(user), self.targets, self.memory)
        return FinishedUser(user, weights, train_loss=None, train_seconds=0.0)

    def _answer(self, group: list[FinishedUser | User]) -> Iterator[TrainedUser]:
        """Answer a group of users (each row routed to its user's slot); the answering time
        is shared equally among them."""
        started = time.perf_counter()
        model, bank = self.base.model, None
        users = [done.user if isinstance(done, FinishedUser) else done for done in group]
        slot_of = {user.user_id: slot for slot, user in enumerate(users)}
        if self.memory.enabled:
            bank = self.answer_bank
            for slot, done in enumerate(group):
                bank.load_user(slot, done.weights)
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
                users,
                switch,
                self.generation,
                self.compare_without_memory,
                bf16=self.fast.bf16_answers,
            )
        finally:
            if bank is not None:
                bank.detach(model)
        share = (time.perf_counter() - started) / len(group)
        for user, done in zip(users, group, strict=True):
            trained = isinstance(done, FinishedUser)
            yield TrainedUser(
                user=user,
                answers=answers,
                memory=bank_module_states(self.targets, done.weights, self.memory)
                if trained
                else None,
                trainable_parameters=self.answer_bank.parameters_per_user() if trained else 0,
                train_loss=done.train_loss if trained else None,
                train_seconds=done.train_seconds if trained else 0.0,
                seconds=(done.train_seconds if trained else 0.0) + share,
            )
