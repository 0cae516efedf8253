"""The per-user injector: one user at a time, peft memory modules, a Lightning Trainer.

For each user: seed, inject fresh memory modules into the frozen base model (or the
user's stored memory, with `memory.resume_from`), train them with a Trainer built from
`conf/trainer`, answer the user's queries (with and without the memory), take the
trained weights, and unload the modules so the next user starts from the clean base.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate

from milp.adapters import load_memory, peft_module_states
from milp.data.users import User
from milp.inject import Injector, Report, TrainedUser, quiet_lightning, seed_user
from milp.inject.answer import answer_queries
from milp.inject.fast import fast_training
from milp.inject.module import MemoryInjectionModule
from milp.memory import inject_memory, remove_memory, trainable_parameters


class SequentialInjector(Injector):
    """Trains and answers users one after another (`injection=sequential`)."""

    def _run(
        self, users: Sequence[User], start: Path | None, optim: dict, report: Report
    ) -> Iterator[TrainedUser]:
        for user in users:
            yield self.inject(user, start, optim, report)

    def inject(self, user: User, start: Path | None, optim: dict, report: Report) -> TrainedUser:
        """Train one user's memory, answer the user's queries, hand the base model back."""
        seed_user(self.seed, user.seed_id)
        started = time.perf_counter()
        enabled = self.memory.enabled
        model = self.base.model
        if enabled:
            stored = self.stored_memory(user, start)
            model = (
                inject_memory(model, self.memory, self.placement)
                if stored is None
                else load_memory(model, stored, trainable=True)
            )
        try:
            train_loss = self.train(model, user, optim, report) if self.trains else None
            train_seconds = time.perf_counter() - started if self.trains else 0.0

            def switch(user_ids: list[str], use_memory: bool):
                return nullcontext() if use_memory or not enabled else model.disable_adapter()

            answers = answer_queries(
                model,
                self.base.tokenizer,
                self.datamodule,
                [user],
                switch,
                self.generation,
                self.compare_without_memory,
                bf16=self.fast.bf16_answers,
            )
            return TrainedUser(
                user=user,
                answers=answers,
                memory=peft_module_states(model) if enabled else None,
                trainable_parameters=trainable_parameters(model) if enabled else 0,
                train_loss=train_loss,
                train_seconds=train_seconds,
                seconds=time.perf_counter() - started,
            )
        finally:
            if enabled:  # the clean base model for the next user, whatever happened
                self.base.model = remove_memory(model)

    def train(self, model: torch.nn.Module, user: User, optim: dict, report: Report) -> float:
        """Fit the memory modules on the user's history; returns the last training loss."""
        callbacks = list(instantiate(self.callbacks).values()) if self.callbacks else []
        if report is not None:
            callbacks.append(StepReport(report, user.user_id))
        with quiet_lightning():
            return self._fit(model, user, optim, callbacks)

    def _fit(self, model: torch.nn.Module, user: User, optim: dict, callbacks: list) -> float:
        trainer: L.Trainer = instantiate(self.trainer, logger=False, callbacks=callbacks)
        device = trainer.strategy.root_device
        start_layer = min(self.placement.layers) if self.placement else 0
        with fast_training(model, self.fast, device, start_layer) as fast:
            module = MemoryInjectionModule(
                model,
                **optim,
                fast=self.fast,
                pad_token_id=self.base.tokenizer.pad_token_id,
                prefix=fast.prefix,
            )
            trainer.fit(module, datamodule=self.datamodule.select(user))
        if trainer.interrupted:
            raise KeyboardInterrupt
        return float(trainer.callback_metrics.get("train/loss", torch.nan))


class StepReport(L.Callback):
    """Tells the run's progress bar how far the user's training is."""

    def __init__(self, report: Callable[[str], None], user_id: str) -> None:
        self.report, self.user_id = report, user_id

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        steps = trainer.estimated_stepping_batches
        self.report(f"user {self.user_id} step {trainer.global_step}/{steps}")
