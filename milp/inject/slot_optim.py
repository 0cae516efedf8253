"""Per-slot optimisation of a `MemoryBank`: each user's AdamW state, step count and
gradient clipping of its own, so a user trained among others follows the trajectory it
would follow alone (global-norm clipping over all users would couple them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from milp.inject.bank import MemoryBank


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
