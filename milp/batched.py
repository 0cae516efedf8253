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
the rank dimension is exactly their sum, as peft computes it with all memories active.
Gradients reach only the slot a row is routed to, so users never touch each other's
weights. The optimizer (`SlotAdamW`) and gradient clipping (`clip_grad_norm_per_slot`)
keep per-slot state and step counts, so each user follows the trajectory it would follow
alone (global-norm clipping over all users would couple them).

Weights go in and out in peft's own layout (`peft_state_dicts`, `read_memory`,
`write_memory`): a user's memory written here is read by `milp.memory.load_memory` and
`PeftModel.from_pretrained` like one trained by the peft path.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from torch import nn

from milp.errors import MilpError
from milp.memory import (
    MemoryConfig,
    inject_memory,
    lora_config,
    memory_names,
    place_memory,
    remove_memory,
)

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Target:
    """One linear module that carries memory: its path in the base model and its shape."""

    path: str
    in_features: int
    out_features: int


def memory_targets(model: nn.Module, memory: MemoryConfig) -> list[Target]:
    """The modules peft puts memory on, in peft's order, found by letting peft inject once.

    The global RNG is left as it was, so callers can seed before or after.
    """
    with torch.random.fork_rng(devices=[]):
        peft_model = inject_memory(model, memory)
        try:
            targets = [
                Target(path, module.in_features, module.out_features)
                for path, module in peft_model.base_model.model.named_modules()
                if isinstance(module, LoraLayer)
            ]
        finally:
            remove_memory(peft_model)
    for target in targets:
        if not isinstance(model.get_submodule(target.path), nn.Linear):
            raise MilpError(f"batched memory supports nn.Linear targets only, not {target.path}")
    return targets


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


def peft_state_dicts(
    targets: Sequence[Target], weights: UserWeights, memory: MemoryConfig
) -> dict[str, dict[str, torch.Tensor]]:
    """A user's memory as peft adapter state dicts (`memory_<i>` -> saved keys)."""
    r = memory.rank
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, name in enumerate(memory.adapter_names):
        state = {}
        for target, (a, b) in zip(targets, weights, strict=True):
            key = PEFT_PREFIX + target.path
            state[f"{key}.lora_A.weight"] = a[k * r : (k + 1) * r].contiguous()
            state[f"{key}.lora_B.weight"] = b[:, k * r : (k + 1) * r].contiguous()
        out[name] = state
    return out


def read_memory(
    directory: str | Path, targets: Sequence[Target], memory: MemoryConfig
) -> UserWeights:
    """Read a saved user memory (peft adapters + memory.json) into bank layout.

    The saved memory must have the shape of `memory` (number of modules, rank, alpha,
    target modules); anything else is a one-line error naming what differs.
    """
    directory = Path(directory)
    names = memory_names(directory)
    if len(names) != memory.num_loras:
        raise MilpError(
            f"{directory}: holds {len(names)} memory module(s), memory.num_loras is "
            f"{memory.num_loras}"
        )
    r = memory.rank
    a_parts: list[list[torch.Tensor]] = [[] for _ in targets]
    b_parts: list[list[torch.Tensor]] = [[] for _ in targets]
    for name in names:
        config = json.loads((directory / name / "adapter_config.json").read_text())
        if config.get("r") != r or float(config.get("lora_alpha")) != float(memory.alpha):
            raise MilpError(
                f"{directory / name}: rank {config.get('r')} / alpha {config.get('lora_alpha')}"
                f" differ from memory.rank={r} / memory.alpha={memory.alpha}"
            )
        state = load_file(directory / name / "adapter_model.safetensors")
        expected = {f"{PEFT_PREFIX}{t.path}.lora_{m}.weight" for t in targets for m in "AB"}
        if set(state) != expected:
            missing = sorted(expected - set(state))
            extra = sorted(set(state) - expected)
            raise MilpError(
                f"{directory / name}: placed on other modules than this memory config "
                f"(missing {missing[:1]}, unexpected {extra[:1]})"
            )
        for i, target in enumerate(targets):
            key = PEFT_PREFIX + target.path
            a_parts[i].append(state[f"{key}.lora_A.weight"].float())
            b_parts[i].append(state[f"{key}.lora_B.weight"].float())
    return [(torch.cat(a, 0), torch.cat(b, 1)) for a, b in zip(a_parts, b_parts, strict=True)]


def adapter_config(memory: MemoryConfig, model: nn.Module) -> LoraConfig:
    """The peft config saved with each memory module, as `PeftModel.save_pretrained` writes
    it (call on the plain model, before a bank is attached)."""
    config = lora_config(memory, place_memory(memory, model))
    config.base_model_name_or_path = model.__dict__.get("name_or_path", None) or None
    config.inference_mode = True
    return config


def write_memory(
    directory: str | Path,
    targets: Sequence[Target],
    weights: UserWeights,
    memory: MemoryConfig,
    config: LoraConfig,
    info: dict | None = None,
) -> Path:
    """Save a user's memory in the layout of `milp.memory.save_memory`, atomically.

    `directory/memory_<i>/{adapter_config.json, adapter_model.safetensors}` (plain peft
    adapters, `config` from `adapter_config`) and `directory/memory.json`; a crash leaves
    any previous copy untouched.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    try:
        for name, state in peft_state_dicts(targets, weights, memory).items():
            (staging / name).mkdir()
            config.save_pretrained(str(staging / name))
            save_file(state, str(staging / name / "adapter_model.safetensors"), {"format": "pt"})
        names = memory.adapter_names
        (staging / "memory.json").write_text(
            json.dumps({"adapters": names} | (info or {}), indent=2)
        )
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=".old-", dir=directory.parent))
            os.rename(directory, old / "x")
            os.rename(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


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

    Per segment (a user's rows) one pair of matrix products, batched into one `bmm`
    when all users bring the same number of rows: no per-row copies of the weights,
    and only the small rank-sized activations are kept for backward.
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
        hs = []
        for slot, first, end in segments:
            span = slice(first * per_row, end * per_row)
            h = (x2[span] @ lora_a[slot].to(x2.dtype).t()) * scaling
            out[span].addmm_(h, lora_b[slot].to(x2.dtype).t())
            hs.append(h)
        ctx.save_for_backward(x, lora_a, lora_b, *hs)
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
        x, lora_a, lora_b, *hs = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1]).to(g2.dtype)
        grad_a, grad_b = torch.zeros_like(lora_a), torch.zeros_like(lora_b)
        covered = sum(end - first for _, first, end in ctx.segments) * ctx.per_row
        grad_x = None
        if need_x:  # rows outside every segment (no memory) get no gradient from here
            grad_x = torch.empty_like(x2) if covered == x2.shape[0] else torch.zeros_like(x2)
        for (slot, first, end), h in zip(ctx.segments, hs, strict=True):
            span = slice(first * ctx.per_row, end * ctx.per_row)
            g = g2[span]
            grad_b[slot] += (g.t() @ h).to(grad_b.dtype)
            grad_h = (g @ lora_b[slot].to(g.dtype)) * ctx.scaling
            grad_a[slot] += (grad_h.t() @ x2[span]).to(grad_a.dtype)
            if need_x:
                grad_x[span] = grad_h @ lora_a[slot].to(g.dtype)
        if need_x:
            grad_x = grad_x.view(x.shape).to(x.dtype)
        return grad_out, grad_x, grad_a, grad_b, None, None


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


def clip_grad_norm_per_slot(bank: MemoryBank, max_norm: float) -> torch.Tensor:
    """Clip each slot's gradient to `max_norm` (L2 over all its tensors), as
    `torch.nn.utils.clip_grad_norm_` clips one user's parameters; returns the norms."""
    norms = []
    for param in [*bank.lora_A, *bank.lora_B]:
        if param.grad is not None:
            norms.append(torch.linalg.vector_norm(param.grad.flatten(1), dim=1))
    total = torch.linalg.vector_norm(torch.stack(norms, dim=1), dim=1)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for param in [*bank.lora_A, *bank.lora_B]:
        if param.grad is not None:
            param.grad.mul_(coef.view(-1, *([1] * (param.grad.dim() - 1))))
    return total


def clip_grad_value_(bank: MemoryBank, clip_value: float) -> None:
    """Element-wise clipping (separable per user as it is)."""
    for param in [*bank.lora_A, *bank.lora_B]:
        if param.grad is not None:
            param.grad.clamp_(-clip_value, clip_value)


class SlotAdamW:
    """AdamW with separate state and step count per slot; steps only the active slots.

    Per slot, the update is that of `torch.optim.AdamW` (decoupled weight decay, bias
    correction by the slot's own step count), with an optional linear warmup of the
    learning rate over each slot's first `warmup_steps` steps.
    """

    def __init__(
        self,
        bank: MemoryBank,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_steps: int = 0,
    ) -> None:
        self.bank = bank
        self.params = [*bank.lora_A, *bank.lora_B]
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.warmup_steps = warmup_steps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(bank.slots, dtype=torch.float64)

    def reset_slot(self, slot: int) -> None:
        """Fresh optimizer state for a slot (a new user moved in)."""
        for m, v in zip(self.exp_avg, self.exp_avg_sq, strict=True):
            m[slot].zero_()
            v[slot].zero_()
        self.steps[slot] = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, active: Sequence[int]) -> None:
        """One AdamW step for the users in the `active` slots."""
        if not len(active):
            return
        beta1, beta2 = self.betas
        idx_cpu = torch.as_tensor(list(active), dtype=torch.long)
        self.steps[idx_cpu] += 1
        step = self.steps[idx_cpu]
        lr = self.lr * torch.ones_like(step)
        if self.warmup_steps:
            lr = lr * torch.clamp(step / self.warmup_steps, max=1.0)
        device = self.params[0].device
        step_size = (lr / (1 - beta1**step)).to(device=device, dtype=torch.float32)
        bias2_sqrt = torch.sqrt(1 - beta2**step).to(device=device, dtype=torch.float32)
        decay = (1 - lr * self.weight_decay).to(device=device, dtype=torch.float32)
        idx = idx_cpu.to(device)
        everyone = len(active) == self.bank.slots and bool(
            (idx == torch.arange(len(idx), device=device)).all()
        )
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            if everyone:
                w, g, mm, vv = p.data, p.grad, m, v
            else:
                w, g, mm, vv = p.data[idx], p.grad[idx], m[idx], v[idx]
            if self.weight_decay:
                w.mul_(decay.view(shape))
            mm.lerp_(g, 1 - beta1)
            vv.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (vv.sqrt() / bias2_sqrt.view(shape)).add_(self.eps)
            w.addcdiv_(mm * step_size.view(shape), denom, value=-1.0)
            if not everyone:
                p.data[idx] = w
                m[idx] = mm
                v[idx] = vv
