"""Continuous batching: which users' mini-batches make up each training step.

A memory bank has `slots` places for users. `UserSchedule` keeps them busy: each step
is every occupied slot's next mini-batch, laid out as one batch whose rows are routed
to their slots (`row_slots`); a user whose last mini-batch has been stepped leaves its
slot, and the next user in the queue (longest first, so the slots stay full to the end;
with one slot, the data's order) takes it. A user's mini-batches are exactly those of
the user's own training run: its DataLoader, created right after the user's seed, over
all its epochs.

Iterating the schedule gives steps until one that holds some user's last mini-batch;
the training module records each step's outcome (`record`), and between iterations
the injector takes finished users out (`finished`) and lets the next ones in (`admit`).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from milp.data.datamodule import UserDataModule
from milp.data.users import User
from milp.inject.loss import pack_rows, pad_batch

# A user's mini-batches over all its epochs, created right after its seed.
Batches = Iterator[dict[str, torch.Tensor]]


@dataclass(frozen=True)
class UserSteps:
    """How long each user trains: `epochs` over its history (None: until `max_steps`),
    at most `max_steps` steps (None: no bound), as a Trainer of one user would."""

    epochs: int | None
    max_steps: int | None

    def planned(self, datamodule: UserDataModule, user: User) -> float:
        per_epoch = math.ceil(datamodule.examples_per_epoch(user) / datamodule.batch_size)
        if not per_epoch:
            return 0
        epochs = math.inf if self.epochs is None else self.epochs
        return min(per_epoch * epochs, math.inf if self.max_steps is None else self.max_steps)

    def batches(self, datamodule: UserDataModule, user: User) -> Batches:
        """The user's mini-batches in training order (call right after its seed)."""
        loader = datamodule.select(user).train_dataloader(epochs=self.epochs)
        return itertools.islice(loader, self.max_steps)


@dataclass
class Occupant:
    """A user in a slot and what its training has measured so far."""

    user: User
    batches: Batches
    upcoming: dict[str, torch.Tensor] | None
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss: float | None = None


class UserSchedule:
    """The users in training (one per slot) and the queue of users waiting."""

    def __init__(
        self,
        users: Sequence[User],
        slots: int,
        steps: UserSteps,
        datamodule: UserDataModule,
        pad_token_id: int,
        pack: bool,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.steps, self.datamodule = steps, datamodule
        self.pad_token_id, self.pack, self.report = pad_token_id, pack, report
        planned = {u.user_id: steps.planned(datamodule, u) for u in users}
        # Longest first keeps many slots busy to the end; one slot takes the data's order.
        self.queue = list(users) if slots == 1 else sorted(users, key=lambda u: -planned[u.user_id])
        self.active: list[Occupant | None] = [None] * slots
        self.planned = sum(planned.values())
        self.steps_done = 0
        self.unrecorded = 0  # steps handed out whose outcome is not recorded yet

    @property
    def idle(self) -> bool:
        """Nobody training and nobody waiting."""
        return not self.queue and all(o is None for o in self.active)

    def admit(self, enter: Callable[[int, User], None]) -> None:
        """Fill the free slots from the queue: `enter(slot, user)` seeds the user and puts
        its first memory into the slot; its mini-batches are drawn right after."""
        for slot, occupant in enumerate(self.active):
            if occupant is None and self.queue:
                user = self.queue.pop(0)
                started = time.perf_counter()
                enter(slot, user)
                batches = self.steps.batches(self.datamodule, user)
                occupant = Occupant(user, batches, next(batches, None))
                occupant.seconds = time.perf_counter() - started
                self.active[slot] = occupant

    def finished(self) -> list[tuple[int, Occupant]]:
        """Take out the users with no mini-batch left (some may have had none at all)."""
        done = [(s, o) for s, o in enumerate(self.active) if o is not None and o.upcoming is None]
        for slot, _ in done:
            self.active[slot] = None
        return done

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            running = [s for s, o in enumerate(self.active) if o is not None]
            if not running:
                return
            step = self._collate(running, [self.active[s].upcoming for s in running])
            for s in running:
                self.active[s].upcoming = next(self.active[s].batches, None)
            self.unrecorded += 1
            yield step
            if any(self.active[s].upcoming is None for s in running):
                return  # a user is done: it leaves before the next step

    def _collate(self, running: list[int], parts: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_batch(parts, self.pad_token_id)
        row_slots = torch.cat(
            [
                torch.full((p["input_ids"].shape[0],), s, dtype=torch.long)
                for s, p in zip(running, parts, strict=True)
            ]
        )
        tokens = torch.zeros(len(self.active), dtype=torch.long)
        tokens.index_add_(0, row_slots, batch["attention_mask"].sum(1))
        if self.pack:  # a slot's examples share rows no wider than the padded batch
            width = batch["input_ids"].shape[1]
            batch = pack_rows(batch, row_slots.tolist(), self.pad_token_id, max_width=width)
            row_slots = batch.pop("groups").cpu()
        return batch | {
            "row_slots": row_slots,
            "running": torch.tensor(running),
            "tokens": tokens,
        }

    def record(
        self, running: list[int], losses: torch.Tensor, tokens: torch.Tensor, seconds: float
    ) -> None:
        """A step's outcome: each running user's loss, and its share of the step's time
        (by its tokens)."""
        self.unrecorded -= 1
        self.steps_done += len(running)
        total = max(sum(int(tokens[s]) for s in running), 1)
        for s in running:
            occupant = self.active[s]
            occupant.steps += 1
            occupant.tokens += int(tokens[s])
            occupant.seconds += seconds * int(tokens[s]) / total
            occupant.loss = float(losses[s])
        if self.report is not None:
            planned = self.planned if math.isfinite(self.planned) else "?"
            self.report(f"{len(running)} training, user-steps {self.steps_done}/{planned}")
