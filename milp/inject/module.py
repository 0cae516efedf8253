"""The LightningModule: a frozen base LLM carrying one user's memory modules.

Training is causal-LM loss on the user's history pairs (target tokens only: the collator
masks prompts and padding), AdamW on the memory modules alone, with an optional linear
warmup. Answering is not Lightning's job here: both injectors answer through
`milp.inject.answer`.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn


class MemoryInjectionModule(L.LightningModule):
    """Trains the memory modules of `model` on one user's history."""

    def __init__(
        self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 0
    ) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
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
