"""Memory injection: train each user's memory on their history and answer their queries.

An injector turns users into `TrainedUser`s (`run(users) -> Iterator[TrainedUser]`), one
as soon as it is done. Two implementations, chosen by `conf/injection/*.yaml`:

- `sequential.SequentialInjector`: one user at a time, fresh peft memory modules trained
  by a Lightning Trainer (the reference path);
- `batched.BatchedInjector`: `users_per_batch` users per forward/backward pass through a
  `bank.MemoryBank` (same memories up to float rounding, faster on many users).

Both share what decides results: the per-user seed (`seed_user`, set before a user's
memory is created and its data shuffled), the data (`milp.data.datamodule`), answering
and scoring (`answer.answer_queries`), and the result record (`TrainedUser.record`).
Incremental memory (`memory.resume_from`): a user with a stored memory there starts from
it (all modules, trainable; fresh optimizer state) instead of fresh modules; the stored
run is only read. `run(users, start=...)` names the stored memory every other user
starts from (the run's task memory, for `memory.init=task`); `lr=` a rate other than
`optim.lr` (the task memory's own). Stored memories as they are
(`memory.trained_in`): each user is answered with the memory another run trained on the
history this user is given (its owner's, `User.seed_id`), checked against that run's
record; nothing trains.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L

from milp.adapters import find_memory, verify_memory
from milp.data.datamodule import UserDataModule
from milp.data.users import User, user_seed
from milp.errors import MilpError
from milp.inject.fast import FastPath
from milp.memory import MemoryConfig, MemoryPlacement
from milp.store import adapters_root, recorded_memory

if TYPE_CHECKING:
    from milp.adapters import ModuleStates
    from milp.inject.answer import Answers
    from milp.models.hf import BaseModel


#: A run's status line for its progress bar (see `Injector.run`), or None.
Report = Callable[[str], None] | None


def seed_user(seed: int, user_id: str) -> None:
    """Seed everything for one user: its fresh memory weights and its data order depend on
    (seed, user id) only, not on which users ran before it or beside it."""
    L.seed_everything(user_seed(seed, user_id), workers=True, verbose=False)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """One Trainer per user: Lightning's banners (accelerators, a logging tip, why fit
    stopped) would repeat for every user, so its info lines are held back, and so are the
    warnings this design raises on purpose."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero.level
    rank_zero.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # The frozen base model stays in eval mode (no dropout) while its memory trains.
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
            # The user's data module serves queries as its val loader; fit validates nothing.
            warnings.filterwarnings("ignore", message=r".*val_dataloader.*validation_step")
            # Lightning's own use of a torch pytree API that torch deprecates.
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*deprecated")
            yield
    finally:
        rank_zero.setLevel(level)


@dataclass
class TrainedUser:
    """A user whose memory is trained and whose queries are answered."""

    user: User
    answers: Answers
    memory: ModuleStates | None  # None: no memory (zero-shot)
    trainable_parameters: int
    train_loss: float | None
    train_seconds: float
    seconds: float

    def record(self) -> dict[str, Any]:
        """The user's result record, as stored in users/<user>.json."""
        uid = self.user.user_id
        return {
            "user_id": uid,
            "history_size": len(self.user.history),
            "queries": len(self.user.queries),
            "trainable_parameters": self.trainable_parameters,
            "train_loss": self.train_loss,
            "train_seconds": round(self.train_seconds, 3),
            "seconds": round(self.seconds, 3),
            "memory": self.answers.user_metrics(uid, "memory"),
            "no_memory": self.answers.user_metrics(uid, "no_memory"),
            "predictions": self.answers.user_predictions(uid),
        }


class Injector:
    """What both injectors are given; subclasses implement `run`."""

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
    ) -> None:
        self.base, self.memory, self.placement = base, memory, placement
        self.datamodule = datamodule
        self.trainer, self.callbacks = trainer, callbacks
        self.optim, self.generation = dict(optim), dict(generation)
        self.compare_without_memory = bool(compare_without_memory) and memory.enabled
        self.seed = int(seed)
        self.fast = FastPath.from_config(fast)
        self.resume_root = (
            adapters_root(memory.resume_from, "memory.resume_from") if memory.resume_from else None
        )
        self.trained_root = (
            adapters_root(memory.trained_in, "memory.trained_in") if memory.trained_in else None
        )

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
        optim = self.optim | ({} if lr is None else {"lr": float(lr)})
        return self._run(users, start, optim, report)

    def _run(
        self, users: Sequence[User], start: Path | None, optim: dict, report: Report
    ) -> Iterator[TrainedUser]:
        raise NotImplementedError
