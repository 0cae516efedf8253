"""The LightningModule: a frozen base LLM and a bank of users' memories being trained.

The Lightning Trainer runs the steps (precision, device, callbacks, clipping through
`configure_gradient_clipping`); each step is every training user's next mini-batch
(`milp.inject.schedule`), routed row by row to its user's slot of the `MemoryBank`.
The loss is the sum of the users' own losses (causal-LM loss on target tokens, mean
over the user's own tokens), so each user's gradient is the one it would get alone;
each user's gradient is clipped on its own and `SlotAdamW` steps each user's memory
with its own state. With one slot this is one user's ordinary training run.

The fast path (`milp.inject.fast`) packs each step's batch (done by the schedule),
replays the frozen layers below the memory from a prefix cache and runs the step under
bf16 autocast where the hardware has it. Answering is not Lightning's job here: the
injector answers through `milp.inject.answer`.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from torch import nn

from milp.inject.bank import MemoryBank
from milp.inject.fast import FastPath, fast_autocast
from milp.inject.loss import target_loss
from milp.inject.prefix import PrefixCache
from milp.inject.schedule import UserSchedule
from milp.inject.slot_optim import SlotAdamW, clip_grad_norm_per_slot, clip_grad_value_

ROUTING_KEYS = ("row_slots", "running", "tokens")


class MemoryTraining(L.LightningModule):
    """Trains the memories held in `bank` (attached to `model`) on `schedule`'s steps."""

    def __init__(
        self,
        model: nn.Module,
        bank: MemoryBank,
        optimizer: SlotAdamW,
        schedule: UserSchedule,
        fast: FastPath,
        prefix: PrefixCache | None = None,
    ) -> None:
        super().__init__()
        self.model, self.bank = model, bank
        self.slot_optimizer, self.schedule = optimizer, schedule
        self.fast, self.prefix = fast, prefix
        self._losses = torch.zeros(bank.slots)
        self._started = 0.0

    def training_step(self, step: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        row_slots, running = step["row_slots"], step["running"].tolist()
        batch = {k: v for k, v in step.items() if k not in ROUTING_KEYS}
        owners = row_slots.tolist()  # prefix-cache entries are filed by slot
        with self.bank.routing(owners), fast_autocast(self.device, self.fast.bf16):
            rows = target_loss(self.model, batch, self.prefix, owners)
            losses, _ = rows.per_group(row_slots, self.bank.slots)
        self.slot_optimizer.active = running
        self._losses = losses.detach()
        mean = losses[running].mean()
        self.log("train/loss", mean, prog_bar=True, batch_size=len(running))
        return losses[running].sum()

    def cpu(self) -> MemoryTraining:
        # Lightning moves the module to the CPU at the end of every fit; a run fits once
        # per finished user and answers queries on the model's device in between, so the
        # model and its memories stay where they are (the optimizer state is moved back
        # by the next fit's setup).
        return self

    def configure_optimizers(self) -> SlotAdamW:
        return self.slot_optimizer  # one per run: its per-user state outlives each fit

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """`trainer.gradient_clip_val` applied to each user's gradient on its own."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm == "value":
            clip_grad_value_(self.bank, float(gradient_clip_val))
        else:
            clip_grad_norm_per_slot(self.bank, float(gradient_clip_val))

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, outputs: object, batch: dict, batch_idx: int) -> None:
        self.schedule.record(
            batch["running"].tolist(),
            self._losses.cpu(),
            batch["tokens"].cpu(),
            time.perf_counter() - self._started,
        )
