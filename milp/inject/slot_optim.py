"""Per-slot optimisation of a `MemoryBank`: each user's AdamW state, step count and
gradient clipping of its own, so a user trained among others follows the trajectory it
would follow alone (global-norm clipping over all users would couple them).

`SlotAdamW` is a `torch.optim.Optimizer`, so the Lightning Trainer steps it like any
other (closure, precision plugin, `zero_grad`); which slots a step updates is set by
the training module (`milp.inject.module.MemoryTraining`) before each step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from milp.inject.bank import MemoryBank


def clip_grad_norm_per_slot(bank: MemoryBank, max_norm: float) -> torch.Tensor:
    """Clip each slot's gradient to `max_norm` (L2 over all its tensors), as
    `torch.nn.utils.clip_grad_norm_` clips one user's parameters; returns the norms."""
    params = [p for p in bank.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(bank.slots)
    norms = [torch.linalg.vector_norm(p.grad.flatten(1), dim=1) for p in params]
    total = torch.linalg.vector_norm(torch.stack(norms, dim=1), dim=1)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef.view(-1, *([1] * (p.grad.dim() - 1))))
    return total


def clip_grad_value_(bank: MemoryBank, clip_value: float) -> None:
    """Element-wise clipping (separable per user as it is)."""
    for p in bank.parameters():
        if p.grad is not None:
            p.grad.clamp_(-clip_value, clip_value)


class SlotAdamW(torch.optim.Optimizer):
    """AdamW with separate state and step count per slot; steps only the `active` slots.

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
        defaults = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
        super().__init__(list(bank.parameters()), defaults)
        self.slots, self.warmup_steps = bank.slots, int(warmup_steps)
        self.slot_steps = torch.zeros(bank.slots, dtype=torch.float64)
        self.active: list[int] = list(range(bank.slots))  # set before each step

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.param_groups:
            group["lr"] = float(value)

    def reset_slot(self, slot: int) -> None:
        """Fresh optimizer state for a slot (a new user moved in)."""
        for state in self.state.values():
            state["exp_avg"][slot].zero_()
            state["exp_avg_sq"][slot].zero_()
        self.slot_steps[slot] = 0

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One AdamW step for the users in the `active` slots (after `closure`, if given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update(self.active)
        return loss

    def _update(self, active: Sequence[int]) -> None:
        if not len(active):
            return
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        idx_cpu = torch.as_tensor(list(active), dtype=torch.long)
        self.slot_steps[idx_cpu] += 1
        step = self.slot_steps[idx_cpu]
        lr = group["lr"] * torch.ones_like(step)
        if self.warmup_steps:
            lr = lr * torch.clamp(step / self.warmup_steps, max=1.0)
        everyone = list(active) == list(range(self.slots))
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            device, shape = p.device, (-1,) + (1,) * (p.dim() - 1)
            step_size = (lr / (1 - beta1**step)).to(device, torch.float32).view(shape)
            bias2_sqrt = torch.sqrt(1 - beta2**step).to(device, torch.float32).view(shape)
            decay = (1 - lr * group["weight_decay"]).to(device, torch.float32).view(shape)
            if everyone:
                w, g, mm, vv = p.data, p.grad, m, v
            else:
                idx = idx_cpu.to(device)
                w, g, mm, vv = p.data[idx], p.grad[idx], m[idx], v[idx]
            if group["weight_decay"]:
                w.mul_(decay)
            mm.lerp_(g, 1 - beta1)
            vv.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (vv.sqrt() / bias2_sqrt).add_(group["eps"])
            w.addcdiv_(mm * step_size, denom, value=-1.0)
            if not everyone:
                p.data[idx], m[idx], v[idx] = w, mm, vv
