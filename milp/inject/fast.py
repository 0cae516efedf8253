"""The fast path of memory training: how both injectors train memory quickly.

A memory step trains a few LoRA matrices on top of a frozen base; most of its cost is
the base model's own arithmetic, and much of that is avoidable. `FastPath`
(`injection.fast` in conf/injection/*.yaml) chooses the pieces, and `fast_training`
sets them up around one user's (or one bank's) training:

- bf16 autocast where the hardware has bf16 matrix units (CPU `avx512_bf16` /
  `amx_bf16`, CUDA `is_bf16_supported`), TF32 on CUDA; anything else keeps float32.
  The memory weights, the optimizer and the loss stay float32; only the matrix products
  of the forward/backward run in bf16, with the frozen linear weights held in bf16 for
  the duration (the same numbers as autocast's per-call casts, without the copies).
  This changes numerics: `experiments/bench_real.py` checks the final training loss
  against float32 within a stated tolerance.
- packed batches (`milp.inject.loss.pack_rows`): no padding token is computed. Exact.
- the frozen-prefix cache (`milp.inject.prefix.PrefixCache`): hidden states entering the
  lowest memory layer computed once per history example and replayed on later epochs.
  Exact; memory bounded by `prefix_cache_mib`.
- eager attention on CPU, faster than SDPA at memory training's lengths. Exact up to
  float rounding.
- logits at target positions only (`milp.inject.loss.target_loss`): always on. Exact.
- fresh tensors left unfilled (`unfilled_allocations`): always on, whatever
  `injection.fast` says. Exact.

Answering runs in float32 unless `bf16_answers` is set: greedy decoding turns small
numeric differences into other words, so bf16 answers are a choice, not a default.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from milp.errors import MilpError
from milp.inject.loss import causal_lm
from milp.inject.prefix import PrefixCache

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
            current = module.weight.device
            if weight.device != current:  # the model was moved meanwhile (Trainer.fit)
                weight.data = weight.data.to(current)
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


@contextmanager
def unfilled_allocations() -> Iterator[None]:
    """Fresh tensors' memory left as allocated while the block runs.

    `trainer.deterministic` turns on `torch.use_deterministic_algorithms`, which also
    fills every new tensor with NaN (`torch.utils.deterministic.fill_uninitialized_memory`):
    a guard that makes reading memory nobody wrote visible. Training never reads it, so
    no result changes; the fill writes every cast and activation twice, tens of thousands
    of calls per SmolLM2 user on a CPU (`experiments/bench_real.py --profile`: `fill_`
    under `empty_strided`).
    """
    previous = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = previous


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class FastPath:
    """Which fast-path pieces memory training uses (`injection.fast`); see module doc."""

    bf16: bool = True  # bf16 autocast where `bf16_supported` (float32 elsewhere)
    pack: bool = True
    prefix_cache: bool = True
    prefix_cache_mib: int = 1024  # above this, examples are recomputed each step
    eager_attention: bool = True  # CPU only
    bf16_answers: bool = False

    @classmethod
    def from_config(cls, config: Any) -> FastPath:
        """Settings from `injection.fast` (a mapping, None for the defaults, or False for
        the plain float32 path), refusing unknown keys."""
        if isinstance(config, FastPath):
            return config
        if config is False:
            return cls(bf16=False, pack=False, prefix_cache=False, eager_attention=False)
        config = dict(config or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise MilpError(
                f"injection.fast.{unknown[0]} is not a fast-path setting"
                f" (known: {', '.join(sorted(known))})"
            )
        if int(config.get("prefix_cache_mib", 1)) < 0:
            raise MilpError("injection.fast.prefix_cache_mib must be >= 0")
        return cls(**config)

    def uses_bf16(self, device: str | torch.device) -> bool:
        """Whether training on `device` runs under bf16 autocast."""
        return self.bf16 and bf16_supported(device)


class FastTraining:
    """The fast path's setup while `model` trains memory on `device` from layer
    `start_layer` up (a context manager; see `fast_training`)."""

    def __init__(
        self, model: nn.Module, fast: FastPath, device: str | torch.device, start_layer: int
    ) -> None:
        self.model, self.fast, self.device = model, fast, torch.device(device)
        self.prefix: PrefixCache | None = None
        if fast.prefix_cache and start_layer > 0:
            # Built before the weights go bf16: its probe compares float32 forwards.
            cache = PrefixCache(model, start_layer, fast.prefix_cache_mib << 20)
            self.prefix = cache if cache.enabled else None
        self._stack = ExitStack()

    def _apply(self) -> None:
        self._stack = ExitStack()
        try:
            self._stack.enter_context(unfilled_allocations())
            if self.fast.eager_attention:
                self._stack.enter_context(cpu_attention(self.model, self.device))
            uses_bf16 = self.fast.uses_bf16(self.device)
            self._stack.enter_context(bf16_frozen_weights(self.model, uses_bf16))
        except BaseException:  # a piece that fails to set up undoes the ones before it
            self._stack.close()
            raise

    def __enter__(self) -> FastTraining:
        self._apply()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        if self.prefix is not None:
            self.prefix.clear()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The model as it was (float32 weights, its own attention) for a while, e.g.
        to answer queries between training steps; the prefix cache is kept."""
        self._stack.close()
        try:
            yield
        finally:
            self._apply()


def fast_training(
    model: nn.Module, fast: FastPath, device: str | torch.device, start_layer: int
) -> FastTraining:
    """`with fast_training(...) as session:` sets up the fast path for training `model`'s
    memory on `device` from layer `start_layer` up. `session.prefix` is the prefix cache
    to pass to `target_loss` (None when off, when no frozen layer lies below the memory,
    or when the model is unsupported); run the steps under `fast_autocast(device,
    fast.bf16)`."""
    return FastTraining(model, fast, device, start_layer)


# ----------------------------------------------------------------------------- batching
