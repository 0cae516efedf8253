"""The LightningModule: a frozen base LLM carrying one user's memory modules.

Training is causal-LM loss on the user's history pairs (target tokens only: the collator
masks prompts and padding, and `target_loss` applies the output head at target positions
only), AdamW on the memory modules alone, with an optional linear warmup. The fast path
(`milp.inject.fast`) packs each batch, replays the frozen layers below the memory from a
prefix cache and runs the step under bf16 autocast where the hardware has it. Answering
is not Lightning's job here: both injectors answer through `milp.inject.answer`.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from milp.inject.fast import FastPath, fast_autocast
from milp.inject.loss import pack_rows, target_loss
from milp.inject.prefix import PrefixCache


class MemoryInjectionModule(L.LightningModule):
    """Trains the memory modules of `model` on one user's history."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        fast: FastPath | None = None,
        pad_token_id: int = 0,
        prefix: PrefixCache | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.fast = fast if fast is not None else FastPath.from_config(False)
        self.pad_token_id, self.prefix = pad_token_id, prefix

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        rows = batch["input_ids"].shape[0]
        if self.fast.pack:
            # Rows no wider than the padded batch: packing saves the padding without
            # making eager attention's quadratic cost larger.
            width = batch["input_ids"].shape[1]
            batch = pack_rows(batch, pad_id=self.pad_token_id, max_width=width)
        with fast_autocast(self.device, self.fast.bf16):
            loss = target_loss(self.model, batch, self.prefix).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=rows)
        return loss

    def configure_optimizers(self):
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)
        if not self.warmup_steps:
            return optimizer
        warmup = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / self.warmup_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}
