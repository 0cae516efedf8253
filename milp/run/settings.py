"""The run's own numeric settings, checked before anything is built or written.

The memory (`MemoryConfig`), data (`UserDataModule`) and fast-path settings check
themselves when they are built; this page checks the rest that `milp.train` passes on
to code that would accept a bad value and fail late (AdamW on `optim.lr=-1`, after the
model is built) or run on garbage (`optim.lr=nan`: NaN losses, empty answers, exit 0).
Each refusal is one `MilpError` line naming the key.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from milp.data.checks import setting_number
from milp.errors import MilpError
from milp.memory.space import MemoryConfig

# Longest answer a run may ask for: past it, one greedy answer of the tiny model takes
# minutes and the reference models' context windows are exceeded anyway.
MAX_NEW_TOKENS = 4096


def _plain(node: Any) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def check_generation(generation: Any, key: str = "generation") -> None:
    """Decoding settings: at least one new token, at least one beam, sane sampling."""
    settings = _plain(generation) or {}
    tokens = settings.get("max_new_tokens", 32)
    setting_number(f"{key}.max_new_tokens", tokens, 1, MAX_NEW_TOKENS, integer=True)
    setting_number(f"{key}.num_beams", settings.get("num_beams", 1), 1, 64, integer=True)
    if not isinstance(settings.get("do_sample", False), bool):
        raise MilpError(f"{key}.do_sample must be true or false, got {settings['do_sample']!r}")
    for name in ("temperature", "top_p"):
        if settings.get(name) is not None:
            setting_number(f"{key}.{name}", settings[name], 0, above_minimum=True)
    if settings.get("top_k") is not None:
        setting_number(f"{key}.top_k", settings["top_k"], 0, integer=True)


def check_train_settings(cfg: DictConfig, memory: MemoryConfig) -> None:
    """`seed`, `optim.*`, `trainer.*` epochs and steps, `generation.*`, `retrieval.k` and
    the injector's batch of users; a memory method must train (`max_epochs=0` would
    report untrained modules as memory injection)."""
    memory_enabled = memory.enabled
    setting_number("seed", cfg.seed, 0, 2**32 - 1, integer=True)
    optim = _plain(cfg.optim)
    lr = setting_number("optim.lr", optim.get("lr"), 0)
    starts_trained = memory.init == "task" or memory.resume_from is not None
    if lr == 0 and memory_enabled and not starts_trained:
        raise MilpError(
            "optim.lr=0 leaves fresh memory untrained; it is meaningful only where a memory "
            "starts trained (memory.init=task, memory.resume_from)"
        )
    setting_number("optim.weight_decay", optim.get("weight_decay", 0.0), 0)
    setting_number("optim.warmup_steps", optim.get("warmup_steps", 0), 0, integer=True)
    trainer = _plain(cfg.trainer)
    max_epochs = trainer.get("max_epochs")
    max_steps = trainer.get("max_steps", -1)
    if max_steps != -1:  # Lightning's -1: no step limit
        setting_number("trainer.max_steps", max_steps, 1, integer=True)
    if max_epochs is not None and max_epochs != -1:  # -1: no epoch limit (max_steps)
        setting_number("trainer.max_epochs", max_epochs, 0, integer=True)
    if memory_enabled and (max_epochs == 0 or max_steps == 0):
        raise MilpError(
            "trainer.max_epochs=0 trains nothing: a memory method needs >= 1 epoch "
            "(memory=none is the run without memory)"
        )
    if max_epochs in (None, -1) and max_steps == -1 and memory_enabled:
        raise MilpError("trainer.max_epochs is unlimited and trainer.max_steps is not set")
    if trainer.get("gradient_clip_val") is not None:
        setting_number("trainer.gradient_clip_val", trainer["gradient_clip_val"], 0)
    check_generation(cfg.generation)
    retrieval = cfg.get("retrieval") or {}
    if "k" in retrieval:
        setting_number("retrieval.k", retrieval.k, 0, integer=True)
    injection = cfg.get("injection") or {}
    if "users_per_batch" in injection:
        setting_number("injection.users_per_batch", injection.users_per_batch, 1, integer=True)
