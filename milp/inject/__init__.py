"""Memory injection: train each user's memory on their history and answer their queries.

`milp.inject.injector.Injector` does it (see there); this package's parts, each one
idea: `bank` (many users' LoRA memories, routed row by row), `schedule` (which users'
batches make each step), `module` (the LightningModule the Trainer steps), `slot_optim`
(per-user AdamW and clipping), `loss`, `fast` and `prefix` (the fast path), `answer`
(answering and scoring), `serve` (serving stored memories in mixed-user batches). Here:
what every part shares, the per-user seed, quiet Lightning output, the progress report
and the result record.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning as L

from milp.data.users import User, user_seed

if TYPE_CHECKING:
    from milp.inject.answer import Answers
    from milp.memory.adapters import ModuleStates


#: A run's status line for its progress bar (see `Injector.run`), or None.
Report = Callable[[str], None] | None


def seed_user(seed: int, user_id: str) -> None:
    """Seed everything for one user: its fresh memory weights and its data order depend on
    (seed, user id) only, not on which users ran before it or beside it."""
    L.seed_everything(user_seed(seed, user_id), workers=True, verbose=False)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """A Trainer fit each time a user finishes: Lightning's banners (accelerators, a
    logging tip, why fit stopped) would repeat for every user, so its info lines are held
    back, and so are the warnings this design raises on purpose."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero.level
    rank_zero.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # The frozen base model stays in eval mode (no dropout) while its memory trains.
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
            # The users' histories are small and held in memory: worker processes to load
            # them would cost more than they save.
            warnings.filterwarnings("ignore", message=r".*does not have many workers")
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
