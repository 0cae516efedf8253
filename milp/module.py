"""The LightningModule: a frozen base LLM carrying one user's memory modules.

Training is causal-LM loss on the user's history pairs (target tokens only: the
collator masks prompts and padding). Testing generates an answer to each query and
accumulates the metrics; with `compare_without_memory` it also answers with the memory
switched off, which gives the zero-shot baseline on the very same model and queries.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
from peft import PeftModel
from torch import nn

from milp.metrics import ResponseMetrics


class MemoryInjectionModule(L.LightningModule):
    """Trains memory modules on a user's history and answers that user's queries."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        generation: dict | None = None,
        compare_without_memory: bool = False,
        history_tokens: dict[str, set[str]] | None = None,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.generation = {"max_new_tokens": 32, "do_sample": False, "num_beams": 1} | dict(
            generation or {}
        )
        self.compare_without_memory = compare_without_memory and isinstance(model, PeftModel)
        self.history_tokens = history_tokens or {}
        self.predictions: list[dict] = []
        self.metrics: dict[str, ResponseMetrics] = {}

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

    @torch.no_grad()
    def generate(self, batch: dict, use_memory: bool = True) -> list[str]:
        """Answer a batch of queries (greedy by default), returning decoded text."""
        context = nullcontext() if use_memory else self.model.disable_adapter()
        with context:
            output = self.model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **self.generation,
            )
        continuations = output[:, batch["input_ids"].shape[1] :]
        return [
            t.strip() for t in self.tokenizer.batch_decode(continuations, skip_special_tokens=True)
        ]

    def _score(self, key: str, user_ids: list[str], predictions: list[str], golds: list) -> None:
        for user_id, prediction, gold in zip(user_ids, predictions, golds, strict=True):
            if gold is None:
                continue
            metric = self.metrics.setdefault(f"{key}/{user_id}", ResponseMetrics())
            metric.update([prediction], [gold], self.history_tokens.get(user_id, set()))

    def _answer_step(self, batch: dict) -> None:
        answers = self.generate(batch)
        self._score("memory", batch["user_ids"], answers, batch["golds"])
        baseline = [None] * len(answers)
        if self.compare_without_memory:
            baseline = self.generate(batch, use_memory=False)
            self._score("no_memory", batch["user_ids"], baseline, batch["golds"])
        for i, answer in enumerate(answers):
            record = {
                "id": batch["query_ids"][i],
                "user_id": batch["user_ids"][i],
                "prediction": answer,
                "gold": batch["golds"][i],
            }
            if self.compare_without_memory:
                record["prediction_no_memory"] = baseline[i]
            self.predictions.append(record)

    def on_test_start(self) -> None:
        self.predictions, self.metrics = [], {}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._answer_step(batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Optional per-epoch check on the user's queries (off unless the trainer's
        # limit_val_batches is raised); it must not leak into the final predictions.
        answers = self.generate(batch)
        metric = ResponseMetrics()
        for user_id, answer, gold in zip(batch["user_ids"], answers, batch["golds"], strict=True):
            if gold is not None:
                metric.update([answer], [gold], self.history_tokens.get(user_id, set()))
        if int(metric.count):
            self.log("val/rougeL", metric.compute()["rougeL"], batch_size=len(answers))

    def user_metrics(self, user_id: str, key: str = "memory") -> dict[str, float] | None:
        """Metrics of one user's answers (with memory, or `no_memory`), if it had golds."""
        metric = self.metrics.get(f"{key}/{user_id}")
        return metric.compute() if metric is not None else None
