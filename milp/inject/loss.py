"""The memory's training loss: causal-LM cross-entropy on target tokens, per user.

Prompts and padding carry the label IGNORE_INDEX (milp/data/datamodule.py), so only the
answer tokens count; a user's loss is the mean over that user's own target tokens, which
is what the model's own `.loss` gives on that user's rows alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from milp.data.datamodule import IGNORE_INDEX

# Models whose logits are not simply lm_head(hidden): the loss then uses the full forward.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def pad_batch(parts: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Concatenate right-padded mini-batches, padding them to a common width."""
    width = max(p["input_ids"].shape[1] for p in parts)

    def cat(key: str, value: int) -> torch.Tensor:
        return torch.cat(
            [nn.functional.pad(p[key], (0, width - p[key].shape[1]), value=value) for p in parts]
        )

    return {
        "input_ids": cat("input_ids", pad_id),
        "attention_mask": cat("attention_mask", 0),
        "labels": cat("labels", IGNORE_INDEX),
    }


def per_slot_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], row_slots: torch.Tensor, slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot's causal-LM loss: mean cross-entropy over its own target tokens.

    Same value as the model's own loss on that slot's rows; logits are computed only at
    target positions (prompts are masked anyway), which saves the vocabulary projection
    on prompt tokens. Returns (loss per slot, target tokens per slot).
    """
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    head = model.get_output_embeddings()
    fast = head is not None and not any(
        getattr(model.config, k, None) for k in LOGIT_POSTPROCESSING
    )
    if fast:
        hidden = model.get_decoder()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    else:
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits[:, :-1][keep]
    losses = nn.functional.cross_entropy(logits.float(), targets[keep], reduction="none")
    token_slots = row_slots[:, None].expand_as(targets)[keep]
    sums = torch.zeros(slots, device=losses.device).index_add(0, token_slots, losses)
    counts = torch.bincount(token_slots, minlength=slots)
    return sums / counts.clamp(min=1), counts
