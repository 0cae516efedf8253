"""Stacked per-user memories: many users' LoRA modules trained in one forward/backward pass.

peft holds one set of LoRA weights per adapter and refuses to mix adapters in a batch
while training, so milp keeps its own, small equivalent for the batched path: a
`MemoryBank` stacks the memories of `slots` users, per target linear module, as

    lora_A: [slots, num_loras * rank, in_features]
    lora_B: [slots, out_features, num_loras * rank]

and `RoutedLinear` (put in place of each target `nn.Linear`) adds, for every example
(row) of a batch, the memory of the slot that row is routed to:

    y[n] = base(x[n]) + (alpha / rank) * x[n] @ A[s(n)]^T @ B[s(n)]^T

The `num_loras` modules of a user share the scale `alpha / rank`, so stacking them along
the rank dimension is exactly their sum, as peft computes it with all memories active
(`milp.memory.adapters.stack_modules` converts between the two layouts).
Gradients reach only the slot a row is routed to, so users never touch each other's
weights. The optimizer and gradient clipping (milp/inject/slot_optim.py) keep per-slot state and
step counts, so each user follows the trajectory it would follow alone.

A user's weights go in and out as `UserWeights` (per target: A, B in bank layout);
`milp.memory.adapters` turns them into plain peft adapters and back.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from milp.errors import MilpError
from milp.memory.space import MemoryConfig, Target

# A user's memory, aligned with a bank's targets: (A [K*r, in], B [out, K*r]) per target.
UserWeights = list[tuple[torch.Tensor, torch.Tensor]]


def fresh_weights(targets: Sequence[Target], memory: MemoryConfig) -> UserWeights:
    """Initial memory weights, drawn from the global RNG exactly as peft draws them.

    peft creates, per adapter and per target module in order, `nn.Linear(in, r)` and
    `nn.Linear(r, out)` (each initializing itself: kaiming-uniform, a=sqrt(5)), then
    re-initializes A the same way and zeroes B. Replaying those draws after the same
    seed gives bit-identical weights to `inject_memory` (a test checks it).
    """
    r, k = memory.rank, memory.num_loras
    weights = [
        (torch.empty(k * r, t.in_features), torch.zeros(t.out_features, k * r)) for t in targets
    ]
    for adapter in range(k):
        for target, (a, _) in zip(targets, weights, strict=True):
            torch.empty(r, target.in_features).uniform_(*_kaiming_bounds(target.in_features))
            torch.empty(target.out_features, r).uniform_(*_kaiming_bounds(r))
            a[adapter * r : (adapter + 1) * r].uniform_(*_kaiming_bounds(target.in_features))
    return weights


def _kaiming_bounds(fan_in: int) -> tuple[float, float]:
    # nn.init.kaiming_uniform_(w, a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound gain*sqrt(3/fan_in).
    bound = math.sqrt(2.0 / 6.0) * math.sqrt(3.0 / fan_in)
    return -bound, bound


Segment = tuple[int, int, int]  # (slot, first row, end row): rows routed to one slot


def segments_of(index: Sequence[int]) -> list[Segment]:
    """Runs of equal slots in a routing (rows of a user sit together); -1 runs dropped."""
    out: list[Segment] = []
    start = 0
    for row in range(1, len(index) + 1):
        if row == len(index) or index[row] != index[start]:
            if index[start] >= 0:
                out.append((int(index[start]), start, row))
            start = row
    return out


def _uniform(segments: Sequence[Segment], rows: int) -> bool:
    """Whether the segments tile all rows in equal runs of distinct slots (one bmm)."""
    if not segments or len({slot for slot, _, _ in segments}) != len(segments):
        return False
    size = segments[0][2] - segments[0][1]
    return (
        all(first == i * size and end - first == size for i, (_, first, end) in enumerate(segments))
        and segments[-1][2] == rows
    )


@functools.lru_cache(maxsize=64)
def _slot_tensor_cached(slots: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(slots, dtype=torch.long, device=device)


def _slot_tensor(segments: Sequence[Segment], device: torch.device) -> torch.Tensor:
    """The segments' slots as an index tensor (cached: one copy per routing, not per layer)."""
    return _slot_tensor_cached(tuple(slot for slot, _, _ in segments), device)


class _RoutedLoRA(torch.autograd.Function):
    """base_out + scaling * x @ A[slot]^T @ B[slot]^T on each segment of rows.

    One `bmm` pair per module: over users when all bring the same number of rows (no
    copies of the weights), else over rows with each row's slot weights gathered. Only
    the small rank-sized activations are kept for backward.
    """

    @staticmethod
    def forward(ctx, base_out, x, lora_a, lora_b, segments, scaling):
        rows = x.shape[0]
        x2 = x.reshape(-1, x.shape[-1]).to(base_out.dtype)
        # The base layer's fresh output takes the memory in place (its own backward does
        # not need it): one pass over the output instead of a copy and a sum.
        ctx.mark_dirty(base_out)
        out = base_out.view(-1, base_out.shape[-1])
        per_row = x2.shape[0] // rows  # tokens per row
        ctx.segments, ctx.scaling, ctx.per_row = segments, scaling, per_row
        ctx.uniform = _uniform(segments, rows)
        if ctx.uniform:
            slots = _slot_tensor(segments, x.device)
            xs = x2.view(len(segments), -1, x2.shape[-1])
            a = lora_a.index_select(0, slots).to(x2.dtype)
            b = lora_b.index_select(0, slots).to(x2.dtype)
            h = torch.bmm(xs, a.transpose(1, 2)) * scaling
            out.view(len(segments), -1, out.shape[-1]).baddbmm_(h, b.transpose(1, 2))
            ctx.save_for_backward(x, lora_a, lora_b, slots, h)
            return base_out
        # Users with unequal row counts: each row takes its own slot's weights (a copy of
        # rank x features per row, smaller than the row's activations by tokens/rank), so
        # the products stay one bmm per module whatever the mix. Rows outside every
        # segment take zero weights.
        row_slots = _row_slots(segments, rows, x.device)
        xs = x2.view(rows, per_row, x2.shape[-1])
        a, b = _row_weights(lora_a, lora_b, row_slots, x2.dtype)
        h = torch.bmm(xs, a.transpose(1, 2)) * scaling
        out.view(rows, per_row, out.shape[-1]).baddbmm_(h, b.transpose(1, 2))
        ctx.save_for_backward(x, lora_a, lora_b, row_slots, h)
        return base_out

    @staticmethod
    def backward(ctx, grad_out):
        need_x = ctx.needs_input_grad[1]
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.uniform:
            x, lora_a, lora_b, slots, h = ctx.saved_tensors
            n = len(ctx.segments)
            g = g2.view(n, -1, g2.shape[-1])
            xs = x.reshape(n, -1, x.shape[-1]).to(g.dtype)
            grad_b = torch.zeros_like(lora_b).index_copy_(
                0, slots, torch.bmm(g.transpose(1, 2), h).to(lora_b.dtype)
            )
            b = lora_b.index_select(0, slots).to(g.dtype)
            grad_h = torch.bmm(g, b) * ctx.scaling
            grad_a = torch.zeros_like(lora_a).index_copy_(
                0, slots, torch.bmm(grad_h.transpose(1, 2), xs).to(lora_a.dtype)
            )
            grad_x = None
            if need_x:
                a = lora_a.index_select(0, slots).to(g.dtype)
                grad_x = torch.bmm(grad_h, a).view(x.shape).to(x.dtype)
            return grad_out, grad_x, grad_a, grad_b, None, None
        x, lora_a, lora_b, row_slots, h = ctx.saved_tensors
        rows = x.shape[0]
        g = g2.view(rows, ctx.per_row, g2.shape[-1])
        xs = x.reshape(rows, ctx.per_row, x.shape[-1]).to(g.dtype)
        a, b = _row_weights(lora_a, lora_b, row_slots, g.dtype)
        grad_h = torch.bmm(g, b) * ctx.scaling  # zero on rows without memory (b is zero)
        owners = row_slots.clamp(min=0)  # those rows add zeros to slot 0
        grad_b = torch.zeros_like(lora_b).index_add_(
            0, owners, torch.bmm(g.transpose(1, 2), h).to(lora_b.dtype)
        )
        grad_a = torch.zeros_like(lora_a).index_add_(
            0, owners, torch.bmm(grad_h.transpose(1, 2), xs).to(lora_a.dtype)
        )
        grad_x = torch.bmm(grad_h, a).view(x.shape).to(x.dtype) if need_x else None
        return grad_out, grad_x, grad_a, grad_b, None, None


def _row_slots(segments: Sequence[Segment], rows: int, device: torch.device) -> torch.Tensor:
    """Each row's slot (-1: no memory) from the routing's segments."""
    index = [-1] * rows
    for slot, first, end in segments:
        index[first:end] = [slot] * (end - first)
    return _slot_tensor_cached(tuple(index), device)


def _row_weights(
    lora_a: torch.Tensor, lora_b: torch.Tensor, row_slots: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The A and B matrices of each row's slot, zero for rows without memory."""
    owners = row_slots.clamp(min=0)
    a = lora_a.index_select(0, owners).to(dtype)
    b = lora_b.index_select(0, owners).to(dtype)
    if bool((row_slots < 0).any()):
        keep = (row_slots >= 0).to(dtype).view(-1, 1, 1)
        a, b = a * keep, b * keep
    return a, b


class MemoryBank(nn.Module):
    """The stacked memories of `slots` users and the routing of rows to slots."""

    def __init__(
        self,
        targets: Sequence[Target],
        slots: int,
        memory: MemoryConfig,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not memory.enabled:
            raise ValueError("MemoryBank needs num_loras >= 1")
        other = [t.path for t in targets if t.in_features is None]
        if other:
            raise MilpError(f"batched memory supports nn.Linear targets only, not {other[0]}")
        self.targets = list(targets)
        self.slots, self.memory = slots, memory
        self.scaling = memory.alpha / memory.rank
        width = memory.num_loras * memory.rank
        self.lora_A = nn.ParameterList(
            nn.Parameter(torch.zeros(slots, width, t.in_features, device=device)) for t in targets
        )
        self.lora_B = nn.ParameterList(
            nn.Parameter(torch.zeros(slots, t.out_features, width, device=device)) for t in targets
        )
        self.index: list[int] | None = None  # slot of each row; -1: no memory
        self.segments: list[Segment] = []

    @torch.no_grad()
    def load_user(self, slot: int, weights: UserWeights) -> None:
        """Put a user's memory into a slot."""
        for a_param, b_param, (a, b) in zip(self.lora_A, self.lora_B, weights, strict=True):
            a_param[slot].copy_(a)
            b_param[slot].copy_(b)

    @torch.no_grad()
    def user_weights(self, slot: int) -> UserWeights:
        """A copy (on the CPU, float32) of the memory held in a slot."""
        return [
            (a[slot].detach().float().cpu().clone(), b[slot].detach().float().cpu().clone())
            for a, b in zip(self.lora_A, self.lora_B, strict=True)
        ]

    def parameters_per_user(self) -> int:
        return sum(
            a[0].numel() + b[0].numel() for a, b in zip(self.lora_A, self.lora_B, strict=True)
        )

    @contextmanager
    def routing(self, slots: Sequence[int] | torch.Tensor | None) -> Iterator[None]:
        """Route the rows of the next forward passes to these slots (-1 or None: no
        memory). A user's rows should sit together; each run of rows is one product."""
        previous = self.index, self.segments
        if slots is not None:
            slots = slots.tolist() if torch.is_tensor(slots) else [int(s) for s in slots]
            self.segments = segments_of(slots)
        self.index = slots
        try:
            yield
        finally:
            self.index, self.segments = previous

    def attach(self, model: nn.Module) -> None:
        """Route the target modules of `model` through this bank: `RoutedLinear` wrappers
        go in place of the linear modules (or, where another bank's wrappers are already
        in place, they use this bank until `detach`)."""
        self._previous = {}
        for i, target in enumerate(self.targets):
            parent, _, name = target.path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            module = getattr(owner, name)
            if isinstance(module, RoutedLinear):
                self._previous[target.path] = module._bank
                object.__setattr__(module, "_bank", self)
            else:
                setattr(owner, name, RoutedLinear(module, self, i))

    def detach(self, model: nn.Module) -> None:
        """Undo `attach`: the original linear modules (or the previous bank) come back."""
        previous = getattr(self, "_previous", {})
        for target in self.targets:
            parent, _, name = target.path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            module = getattr(owner, name)
            if not isinstance(module, RoutedLinear) or module._bank is not self:
                continue
            if target.path in previous:
                object.__setattr__(module, "_bank", previous[target.path])
            else:
                setattr(owner, name, module.base_layer)
        self._previous = {}

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[nn.Module]:
        self.attach(model)
        try:
            yield model
        finally:
            self.detach(model)


class RoutedLinear(nn.Module):
    """A frozen linear layer plus, per row, the memory of the slot the row is routed to."""

    def __init__(self, base_layer: nn.Linear, bank: MemoryBank, position: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.position = position
        # A plain attribute (not a submodule): the bank's weights stay out of the model.
        object.__setattr__(self, "_bank", bank)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        bank: MemoryBank = self._bank
        if bank.index is None:
            return out
        rows, routed = x.shape[0], len(bank.index)
        segments = bank.segments
        if rows != routed:  # e.g. beam search repeats every row num_beams times
            if rows % routed:
                raise RuntimeError(f"{rows} rows routed with {routed} slot indices")
            k = rows // routed
            segments = [(slot, first * k, end * k) for slot, first, end in segments]
        if not segments:
            return out
        if bank.memory.dropout and self.training:
            x = nn.functional.dropout(x, bank.memory.dropout)
        a, b = bank.lora_A[self.position], bank.lora_B[self.position]
        return _RoutedLoRA.apply(out, x, a, b, segments, bank.scaling)
