"""The fast path of memory training: building blocks shared by both injectors.

A memory step trains a few LoRA matrices on top of a frozen base; most of its cost is
the base model's own arithmetic, and much of that is avoidable without changing what
is computed:

- `bf16_supported` / `fast_autocast`: bf16 autocast where the hardware has bf16 matrix
  units (CPU `avx512_bf16` / `amx_bf16`, CUDA `is_bf16_supported`), TF32 on CUDA;
  anything else keeps float32. The memory weights, the optimizer and the loss stay
  float32; only the matrix products of the forward/backward run in bf16.
- `bf16_frozen_weights`: the frozen linear weights held in bf16 while training under
  autocast (the same numbers as autocast's per-call casts, without the copies);
  `cpu_attention`: eager attention on CPU, faster than SDPA at these lengths.
- `target_loss`: the causal-LM loss with the output head applied only at target
  positions (labels != IGNORE_INDEX after the shift); prompt and padding positions,
  whose loss is masked anyway, skip the vocabulary projection and the softmax. It
  returns per-row sums and token counts (`RowLoss`), from which the per-user path
  takes the batch mean (the model's own `.loss`) and the batched path each user's mean.
- `PrefixCache`: below the lowest memory layer L the model is frozen, so the hidden
  states entering layer L are the same on every epoch. They are computed once per
  history example and reused; each step runs only layers L.. and the head.
- `pack_rows`: a batch's examples packed end to end (block-diagonal attention), so no
  padding token is computed and the batch is the same: exact.
- `length_bucketed_batches` / `LengthBucketSampler`: batches of similar length (fewer
  padding tokens without packing); this regroups examples, so it changes results.

Exactness: packing, the prefix cache and target-only logits compute the same function
as the full forward (up to float summation order; tests check loss and gradients).
bf16 changes numerics (tolerance-checked by `experiments/bench_real.py`); bucketing
changes which examples share a step (same examples per epoch, other groupings).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Sampler

from milp.data.datamodule import IGNORE_INDEX
from milp.inject.prefix import DEFAULT_MAX_BYTES, PrefixCache, prefix_bytes

__all__ = [
    "DEFAULT_MAX_BYTES",
    "LengthBucketSampler",
    "PrefixCache",
    "RowLoss",
    "bf16_frozen_weights",
    "bf16_supported",
    "cpu_attention",
    "head_loss",
    "length_bucketed_batches",
    "model_inputs",
    "pack_rows",
    "fast_autocast",
    "prefix_bytes",
    "target_loss",
]

# Config attributes of models whose logits are not simply lm_head(hidden): their loss
# uses the model's full forward.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


# ----------------------------------------------------------------------------- precision


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """Whether this device multiplies bf16 matrices in hardware (False when unsure).

    CPU: the `amx_bf16` or `avx512_bf16` flag in /proc/cpuinfo, or an AMX capability
    reported by torch; elsewhere emulated bf16 is slower than float32. CUDA:
    `torch.cuda.is_bf16_supported()` (Ampere and later).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    if _cpu_flags() & set(CPU_BF16_FLAGS):
        return True
    try:
        return "AMX" in torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return False


def fast_autocast(device: str | torch.device, bf16: bool = True):
    """The autocast context of the fast path on `device`: bf16 where `bf16_supported`
    (float32 elsewhere, so one config runs on any machine), float32 with `bf16=False`.
    On CUDA it also allows TF32 for the float32 products that remain."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not (bf16 and bf16_supported(device)):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextmanager
def bf16_frozen_weights(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Frozen `nn.Linear` weights held in bf16 while the block runs (restored after).

    Under bf16 autocast every linear call casts its float32 weight to bf16 first; a
    bf16 copy made once gives the same numbers without that per-call copy (a large
    share of a CPU step at SmolLM2's size, see `experiments/bench_real.py --profile`).
    Trainable weights (memories) stay float32. A head tied to the input embedding gets
    its own copy; the embedding stays as it is.
    Costs the bf16 copies' memory (half the frozen linear weights) while it runs.
    Yields the number of weights swapped (0 when disabled).
    """
    swapped: list[tuple[nn.Linear, nn.Parameter]] = []
    if enabled:
        for module in model.modules():
            weight = getattr(module, "weight", None)
            if (
                isinstance(module, nn.Linear)
                and isinstance(weight, nn.Parameter)
                and not weight.requires_grad
                and weight.dtype == torch.float32
            ):
                swapped.append((module, weight))
                module.weight = nn.Parameter(weight.detach().to(torch.bfloat16), False)
    try:
        yield len(swapped)
    finally:
        for module, weight in swapped:
            module.weight = weight


@contextmanager
def cpu_attention(model: nn.Module, device: str | torch.device) -> Iterator[str]:
    """On CPU, the eager (matmul + softmax) attention while the block runs.

    For memory training's short sequences (tens to a few hundred tokens) the CPU SDPA
    kernels, the backward above all and with a packed (block-diagonal) mask, are slower
    than eager attention (`experiments/bench_real.py --profile` shows both).
    Elsewhere (CUDA) the model's own implementation stays. Yields the one in use.
    """
    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    setter = getattr(lm, "set_attn_implementation", None)
    switch = torch.device(device).type == "cpu" and previous == "sdpa" and callable(setter)
    if switch:
        setter("eager")
    try:
        yield config._attn_implementation if config is not None else "unknown"
    finally:
        if switch:
            setter(previous)


# ----------------------------------------------------------------------------- loss


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
    batch: dict[str, torch.Tensor], groups: Sequence[int] | None = None, pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """Pack a right-padded batch: the examples of each group (default: all rows) one
    after another in one row, no padding between them, each with positions from 0.

    transformers models given `position_ids` and no attention mask attend within each
    example only (a block-diagonal causal mask), so every example's loss is what it is
    in the padded batch; each example's first label is masked (it would otherwise be
    the target of the previous example's last token). Rows are padded at the end as an
    example of their own, which no real token attends to. Returns `input_ids`,
    `position_ids`, `labels`, `segment_lengths` [rows, examples] and `groups` (the
    group of each packed row, in order of first appearance).
    """
    lengths = batch["attention_mask"].sum(1).tolist()
    groups = [0] * len(lengths) if groups is None else [int(g) for g in groups]
    order = list(dict.fromkeys(groups))
    members = [[r for r, g in enumerate(groups) if g == group] for group in order]
    width = max(sum(lengths[r] for r in rows) for rows in members)
    ids = batch["input_ids"].new_full((len(order), width), pad_id)
    labels = batch["labels"].new_full((len(order), width), IGNORE_INDEX)
    positions = batch["input_ids"].new_zeros((len(order), width))
    segments = torch.zeros(len(order), max(map(len, members)), dtype=torch.long)
    for p, rows in enumerate(members):
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
        "groups": torch.tensor(order, device=ids.device),
    }


def _full_logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> RowLoss:
    targets = labels[:, 1:]
    losses = nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, reduction="none"
    )  # IGNORE_INDEX positions give 0
    return RowLoss(losses.sum(1), (targets != IGNORE_INDEX).sum(1))


# ----------------------------------------------------------------------------- batching


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator, window_batches: int = 16
) -> list[list[int]]:
    """Shuffled batches of similar length: a seeded permutation, cut into windows of
    `window_batches` batches, each window sorted by length and cut into batches, then
    the batches shuffled. Same generator state, same batches; every index once."""
    if batch_size < 1 or window_batches < 1:
        raise ValueError("batch_size and window_batches must be >= 1")
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * window_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


class LengthBucketSampler(Sampler[list[int]]):
    """A DataLoader `batch_sampler` of `length_bucketed_batches`, a new draw per epoch
    from its own seeded generator (as a shuffling DataLoader draws a permutation)."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        generator: torch.Generator,
        window_batches: int = 16,
    ) -> None:
        self.lengths, self.batch_size = list(lengths), batch_size
        self.generator, self.window_batches = generator, window_batches

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        yield from length_bucketed_batches(
            self.lengths, self.batch_size, self.generator, self.window_batches
        )
