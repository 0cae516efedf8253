"""The memory's training loss: causal-LM cross-entropy on target tokens, per row.

Prompts and padding carry the label IGNORE_INDEX (milp/data/datamodule.py), so only the
answer tokens count. `target_loss` applies the output head only at target positions
(labels != IGNORE_INDEX after the shift): prompt and padding positions, whose loss is
masked anyway, skip the vocabulary projection and the softmax. It returns per-row sums
and token counts (`RowLoss`), from which the per-user path takes the batch mean (the
model's own `.loss`) and the batched path each user's mean (`RowLoss.per_group`).

`pack_rows` lays a batch's examples end to end (block-diagonal attention through
position ids), so no padding token is computed; each example's loss is what it is in
the padded batch. Both are exact up to float summation order (tests/test_fast.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from milp.data.datamodule import IGNORE_INDEX

if TYPE_CHECKING:
    from milp.inject.prefix import PrefixCache

# Config attributes of models whose logits are not simply lm_head(hidden): their loss
# uses the model's full forward.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class RowLoss:
    """Summed target-token cross-entropy and target-token count of each batch row."""

    sums: torch.Tensor  # [rows], float32, carries the graph
    counts: torch.Tensor  # [rows], long

    def mean(self) -> torch.Tensor:
        """Mean over all target tokens of the batch: the model's own `.loss`."""
        return self.sums.sum() / self.counts.sum().clamp(min=1)

    def per_group(self, groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss and target tokens of each group of rows (`groups[row]` in
        0..num_groups-1, e.g. the bank slot of each row); empty groups get loss 0."""
        sums = torch.zeros(num_groups, device=self.sums.device, dtype=self.sums.dtype)
        sums = sums.index_add(0, groups, self.sums)
        counts = torch.zeros(num_groups, device=self.counts.device, dtype=torch.long)
        counts = counts.index_add(0, groups, self.counts)
        return sums / counts.clamp(min=1), counts


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_of(model: nn.Module) -> nn.Module | None:
    """The model's decoder stack (`model.model` for Llama-family models), if it has one."""
    lm = causal_lm(model)
    try:
        return lm.get_decoder()
    except (AttributeError, ValueError, NotImplementedError):
        return None


def head_of(model: nn.Module) -> nn.Module | None:
    """The output projection, when logits are exactly `head(final hidden states)`."""
    lm = causal_lm(model)
    if any(getattr(lm.config, k, None) for k in LOGIT_POSTPROCESSING):
        return None
    return lm.get_output_embeddings()


def head_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> RowLoss:
    """`RowLoss` of final hidden states [rows, T, H] against right-shifted `labels`,
    projecting only the positions whose next token is a target."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][keep])
    losses = nn.functional.cross_entropy(logits.float(), targets[keep], reduction="none")
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(targets)[keep]
    sums = torch.zeros(labels.shape[0], device=losses.device).index_add(0, rows, losses)
    return RowLoss(sums, keep.sum(1))


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward's inputs of a right-padded batch (ids, attention mask) or of a packed
    one (ids, position ids: a transformers model then attends within each example)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def target_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    prefix: PrefixCache | None = None,
    owners: Sequence | None = None,
) -> RowLoss:
    """Causal-LM loss of a batch, the head computed at target positions only.

    The batch is right-padded (`input_ids`, `attention_mask`, `labels` with IGNORE_INDEX
    outside targets: the collator's layout) or packed (`pack_rows`). With an enabled
    `prefix` cache the layers below its start layer are replayed from the cache
    (`owners[row]`: whose entries, see `PrefixCache.final_hidden`). Models whose logits
    are post-processed (soft-capping, scaling) or that have no separable head use
    their full forward: same loss, no savings.
    """
    head, decoder = head_of(model), decoder_of(model)
    if head is None or decoder is None:
        logits = model(**model_inputs(batch), use_cache=False).logits
        return _full_logits_loss(logits, batch["labels"])
    if prefix is not None and prefix.enabled:
        hidden = prefix.final_hidden(batch, owners)
    else:
        hidden = decoder(**model_inputs(batch), use_cache=False).last_hidden_state
    return head_loss(head, hidden, batch["labels"])


def pack_rows(
    batch: dict[str, torch.Tensor],
    groups: Sequence[int] | None = None,
    pad_id: int = 0,
    max_width: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pack a right-padded batch: the examples of each group (default: all rows) one
    after another, no padding between them, each with positions from 0.

    With `max_width`, a group's examples are laid into rows of at most that many tokens
    (or the longest example, if longer), longest first into the first row with room:
    attention, which is quadratic in a row's length, then costs no more than in the
    padded batch. Without it each group is one row.

    transformers models given `position_ids` and no attention mask attend within each
    example only (a block-diagonal causal mask), so every example's loss is what it is
    in the padded batch; each example's first label is masked (it would otherwise be
    the target of the previous example's last token). Rows are padded at the end as an
    example of their own, which no real token attends to. Returns `input_ids`,
    `position_ids`, `labels`, `segment_lengths` [rows, examples] and `groups` (the
    group of each packed row; a group's rows are adjacent, groups in order of first
    appearance).
    """
    lengths = batch["attention_mask"].sum(1).tolist()
    groups = [0] * len(lengths) if groups is None else [int(g) for g in groups]
    order = list(dict.fromkeys(groups))
    packed: list[tuple[int, list[int]]] = []  # (group, its examples) per packed row
    for group in order:
        members = [r for r, g in enumerate(groups) if g == group]
        if max_width is None:
            packed.append((group, members))
            continue
        cap = max(max_width, max(lengths[r] for r in members))
        bins: list[list[int]] = []
        for r in sorted(members, key=lambda r: -lengths[r]):
            fit = next((b for b in bins if sum(lengths[x] for x in b) + lengths[r] <= cap), None)
            if fit is None:
                bins.append([r])
            else:
                fit.append(r)
        packed += [(group, sorted(b)) for b in bins]
    width = max(sum(lengths[r] for r in rows) for _, rows in packed)
    ids = batch["input_ids"].new_full((len(packed), width), pad_id)
    labels = batch["labels"].new_full((len(packed), width), IGNORE_INDEX)
    positions = batch["input_ids"].new_zeros((len(packed), width))
    segments = torch.zeros(len(packed), max(len(rows) for _, rows in packed), dtype=torch.long)
    for p, (_, rows) in enumerate(packed):
        start = 0
        for s, r in enumerate(rows):
            n = lengths[r]
            ids[p, start : start + n] = batch["input_ids"][r, :n]
            labels[p, start + 1 : start + n] = batch["labels"][r, 1:n]
            positions[p, start : start + n] = torch.arange(n)
            segments[p, s] = n
            start += n
        positions[p, start:] = torch.arange(width - start)
    return {
        "input_ids": ids,
        "position_ids": positions,
        "labels": labels,
        "segment_lengths": segments.to(ids.device),
        "groups": torch.tensor([g for g, _ in packed], device=ids.device),
    }


def _full_logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> RowLoss:
    targets = labels[:, 1:]
    losses = nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, reduction="none"
    )  # IGNORE_INDEX positions give 0
    return RowLoss(losses.sum(1), (targets != IGNORE_INDEX).sum(1))


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
