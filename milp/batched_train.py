"""The batched injection loop: train many users' memories per forward/backward pass.

`BatchedInjector` keeps `users_per_batch` slots of a `MemoryBank` busy (continuous
batching): each step takes the next mini-batch of every user in a slot (exactly the
mini-batches that user's own Lightning run would see: same DataLoader, same seed), runs
them as one batch, and gives each user its own loss (mean over its own target tokens),
its own gradient clipping and its own AdamW step. A user whose steps are done leaves
its slot to the next user at once. Users are taken longest-first so the slots stay full.

Each user's memory therefore follows the trajectory of the sequential path: same
initial weights (peft's draws after the user's seed), same batches, same optimizer
update, up to floating-point summation order. `users_per_batch` changes speed, not
results.

`batched_results` ties the loop into `python -m milp.train` (`injection.users_per_batch
> 1`): finished users' memories are saved in the run store and their queries answered
in mixed-user batches (each row routed to its user's memory, and once more with no
memory for the baseline), giving per-user records identical in form to the sequential
path's.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from milp.batched import (
    MemoryBank,
    SlotAdamW,
    Target,
    UserWeights,
    adapter_config,
    clip_grad_norm_per_slot,
    clip_grad_value_,
    fresh_weights,
    memory_targets,
    read_memory,
    write_memory,
)
from milp.data.datamodule import IGNORE_INDEX, UserDataModule
from milp.data.users import User, user_seed
from milp.errors import MilpError
from milp.memory import MemoryConfig, memory_info, place_memory
from milp.metrics import tokenize
from milp.module import MemoryInjectionModule

# Trainer settings the batched loop follows; anything else in `trainer` that changes
# training is refused rather than silently ignored.
SUPPORTED_PRECISION = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16}
# Models whose logits are not simply lm_head(hidden): the loss then uses the full forward.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass(frozen=True)
class TrainSettings:
    """The per-user training schedule, read from the Lightning Trainer config."""

    max_epochs: int = 1
    max_steps: int = -1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    precision: str = "32-true"
    device: str = "cpu"

    @classmethod
    def from_trainer_config(cls, trainer: DictConfig | dict) -> TrainSettings:
        cfg = (
            OmegaConf.to_container(trainer, resolve=True)
            if isinstance(trainer, DictConfig)
            else dict(trainer)
        )
        for key, default in (("accumulate_grad_batches", 1), ("limit_train_batches", 1.0)):
            if cfg.get(key, default) != default:
                raise MilpError(
                    f"trainer.{key}={cfg[key]} is not supported with injection.users_per_batch > 1"
                )
        precision = str(cfg.get("precision", "32-true"))
        if precision not in SUPPORTED_PRECISION:
            raise MilpError(
                f"trainer.precision={precision} is not supported with injection.users_per_batch"
                f" > 1; use one of {', '.join(SUPPORTED_PRECISION)}"
            )
        algorithm = str(cfg.get("gradient_clip_algorithm") or "norm")
        if algorithm not in ("norm", "value"):
            raise MilpError(f"trainer.gradient_clip_algorithm={algorithm} is not norm or value")
        max_epochs = cfg.get("max_epochs")
        max_steps = int(cfg.get("max_steps", -1) or -1)
        if max_epochs is None or max_epochs < 0:
            max_epochs = 1000 if max_steps < 0 else -1  # Lightning's defaults
        return cls(
            max_epochs=int(max_epochs),
            max_steps=max_steps,
            gradient_clip_val=cfg.get("gradient_clip_val"),
            gradient_clip_algorithm=algorithm,
            precision=precision,
            device=resolve_device(cfg.get("accelerator", "auto"), cfg.get("devices", 1)),
        )


def resolve_device(accelerator: str, devices: Any = 1) -> str:
    """The one device this process trains on (`cuda:<LOCAL_RANK>` under a launcher)."""
    accelerator = str(accelerator)
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise MilpError("trainer.accelerator asks for a GPU but CUDA is not available")
        if isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) == 1:
            return f"cuda:{int(devices[0])}"
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if accelerator in ("cpu", "mps"):
        return accelerator
    raise MilpError(f"trainer.accelerator={accelerator} is not supported by the batched path")


@dataclass
class FinishedUser:
    """A user whose memory is trained: weights (CPU) and what the loop measured."""

    user: User
    weights: UserWeights
    train_loss: float | None
    steps: int
    tokens: int
    train_seconds: float
    extra_seconds: float = 0.0  # saving, measured by the caller


@dataclass
class _Slot:
    user: User
    stream: Iterator[dict]
    upcoming: dict | None
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss: float | None = None
    extra: dict = field(default_factory=dict)


def _batches(loader, max_epochs: int, max_steps: int) -> Iterator[dict]:
    """A user's mini-batches in the order its own Trainer.fit would draw them.

    Like Lightning, an epoch takes `len(loader)` batches without asking the exhausted
    sampler for more: asking would draw one more permutation from the loader's generator
    when the history is a multiple of the batch size, and shuffle the next epoch
    differently.
    """
    steps = 0
    epoch = 0
    try:
        per_epoch = len(loader)
    except TypeError:  # an iterable-style loader: exhaust it
        per_epoch = None
    while max_epochs < 0 or epoch < max_epochs:
        for batch in itertools.islice(loader, per_epoch):
            yield batch
            steps += 1
            if 0 < max_steps <= steps:
                return
        epoch += 1


def planned_steps(user: User, batch_size: int, settings: TrainSettings) -> int:
    per_epoch = math.ceil(len(user.history) / batch_size)
    steps = per_epoch * settings.max_epochs if settings.max_epochs >= 0 else math.inf
    return int(min(steps, settings.max_steps if settings.max_steps > 0 else math.inf))


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


class BatchedInjector:
    """Trains the memories of many users through one `MemoryBank` of `slots` users."""

    def __init__(
        self,
        model: nn.Module,
        pad_token_id: int,
        memory: MemoryConfig,
        slots: int,
        settings: TrainSettings,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        targets: list[Target] | None = None,
    ) -> None:
        self.model, self.pad_token_id, self.memory = model, pad_token_id, memory
        self.settings = settings
        self.device = torch.device(settings.device)
        self.targets = targets if targets is not None else memory_targets(model, memory)
        self.bank = MemoryBank(self.targets, slots, memory, device=self.device)
        self.optimizer = SlotAdamW(
            self.bank, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps
        )
        self.autocast_dtype = SUPPORTED_PRECISION[settings.precision]

    def _autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )

    def run(
        self,
        users: Sequence[User],
        datamodule: UserDataModule,
        start: Callable[[User], UserWeights],
        seed: int = 0,
    ) -> Iterator[FinishedUser]:
        """Train every user's memory; yields each user as soon as its steps are done.

        `start(user)` gives the user's initial weights; it is called right after the
        user's seed is set (so fresh weights drawn from the global RNG match peft's).
        The bank is attached to the model while this runs.
        """
        settings, slots = self.settings, self.bank.slots
        queue = sorted(
            users, key=lambda u: -planned_steps(u, datamodule.batch_size, settings)
        )  # longest first keeps the slots busy until the end
        active: list[_Slot | None] = [None] * slots
        self.model.to(self.device)
        # Module modes stay as they are, as under Lightning's fit: the frozen base as loaded
        # (eval), the new memory wrappers in training mode (their dropout is active).
        self.bank.attach(self.model)
        try:
            while True:
                for s in range(slots):
                    while active[s] is None and queue:
                        active[s] = self._enter(queue.pop(0), s, datamodule, start, seed)
                        if active[s].upcoming is None:  # nothing to train on at all
                            yield self._leave(active, s)
                running = [s for s in range(slots) if active[s] is not None]
                if not running:
                    return
                started = time.perf_counter()
                parts = [active[s].upcoming for s in running]
                losses, tokens = self._step(running, parts)
                for s in running:
                    slot = active[s]
                    slot.upcoming = next(slot.stream, None)
                elapsed = time.perf_counter() - started
                total_tokens = max(sum(int(tokens[s]) for s in running), 1)
                for s in running:
                    slot = active[s]
                    slot.steps += 1
                    slot.tokens += int(tokens[s])
                    slot.seconds += elapsed * int(tokens[s]) / total_tokens
                    slot.loss = float(losses[s])
                    if slot.upcoming is None:
                        yield self._leave(active, s)
        finally:
            self.bank.detach(self.model)

    def _enter(self, user, slot, datamodule, start, seed) -> _Slot:
        started = time.perf_counter()
        L.seed_everything(user_seed(seed, user.user_id), workers=True, verbose=False)
        self.bank.load_user(slot, start(user))
        self.optimizer.reset_slot(slot)
        # Created right after the seed, as in the user's own Trainer.fit: same shuffling.
        loader = datamodule.select(user).train_dataloader()
        stream = _batches(loader, self.settings.max_epochs, self.settings.max_steps)
        entry = _Slot(user, stream, next(stream, None))
        entry.seconds = time.perf_counter() - started
        return entry

    def _leave(self, active: list[_Slot | None], s: int) -> FinishedUser:
        slot = active[s]
        active[s] = None
        return FinishedUser(
            slot.user, self.bank.user_weights(s), slot.loss, slot.steps, slot.tokens, slot.seconds
        )

    def _step(self, running: list[int], parts: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = pad_batch(parts, self.pad_token_id)
        row_slots = torch.cat(
            [
                torch.full((p["input_ids"].shape[0],), s, dtype=torch.long)
                for s, p in zip(running, parts, strict=True)
            ]
        )
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self.bank.routing(row_slots), self._autocast():
            losses, _ = per_slot_loss(self.model, batch, row_slots.to(self.device), self.bank.slots)
        losses[running].sum().backward()
        settings = self.settings
        if settings.gradient_clip_val:
            if settings.gradient_clip_algorithm == "norm":
                clip_grad_norm_per_slot(self.bank, float(settings.gradient_clip_val))
            else:
                clip_grad_value_(self.bank, float(settings.gradient_clip_val))
        self.optimizer.step(running)
        self.optimizer.zero_grad()
        tokens = torch.zeros(self.bank.slots, dtype=torch.long)
        mask = batch["attention_mask"].sum(1).cpu()
        tokens.index_add_(0, row_slots, mask)
        return losses.detach().cpu(), tokens


class _RoutedAnswers(MemoryInjectionModule):
    """MemoryInjectionModule whose rows use the memory of their own user (bank slots)."""

    def __init__(self, model, tokenizer, bank: MemoryBank, slot_of: dict[str, int], **kwargs):
        compare = kwargs.pop("compare_without_memory", False)
        super().__init__(model, tokenizer, **kwargs)
        self.compare_without_memory = compare
        object.__setattr__(self, "_bank", bank)
        self.slot_of = slot_of

    def generate(self, batch: dict, use_memory: bool = True) -> list[str]:
        slots = [self.slot_of[u] for u in batch["user_ids"]] if use_memory else None
        with self._bank.routing(slots):
            return super().generate(batch, use_memory=True)


def answer_users(
    model: nn.Module,
    tokenizer: Any,
    bank: MemoryBank,
    finished: Sequence[FinishedUser],
    datamodule: UserDataModule,
    generation: dict,
    compare_without_memory: bool,
) -> _RoutedAnswers:
    """Answer the queries of finished users in mixed batches; returns the module holding
    predictions and per-user metrics (as `trainer.test` leaves them)."""
    slot_of = {}
    for slot, done in enumerate(finished):
        bank.load_user(slot, done.weights)
        slot_of[done.user.user_id] = slot
    module = _RoutedAnswers(
        model,
        tokenizer,
        bank,
        slot_of,
        generation=generation,
        compare_without_memory=compare_without_memory,
        history_tokens={
            d.user.user_id: {t for text in d.user.profile_texts for t in tokenize(text)}
            for d in finished
        },
    )
    device = bank.lora_A[0].device
    modes = {m: m.training for m in model.modules()}
    bank.attach(model)
    model.eval()  # as Lightning's test loop does (restored below)
    try:
        module.on_test_start()
        loader = datamodule.select([d.user for d in finished]).test_dataloader()
        for i, batch in enumerate(loader):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            module.test_step(batch, i)
    finally:
        bank.detach(model)
        for m, mode in modes.items():
            m.training = mode
    return module


def batched_results(
    cfg: DictConfig,
    base: Any,
    memory: MemoryConfig,
    datamodule: UserDataModule,
    users: Sequence[User],
    store: Any,
    resume_dir: Callable[[User], Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """`milp.train`'s batched path: yields per-user result records as users finish.

    Records have the keys of `milp.train.train_user`'s; `train_seconds` and `seconds`
    are the user's share of the batched steps (by tokens) and of its answering batch.
    """
    slots = int(cfg.injection.users_per_batch)
    settings = TrainSettings.from_trainer_config(cfg.trainer)
    model = base.model
    placement = place_memory(memory, model)
    lora = adapter_config(memory, model)
    targets = memory_targets(model, memory)
    injector = BatchedInjector(
        model,
        base.tokenizer.pad_token_id,
        memory,
        slots,
        settings,
        targets=targets,
        **OmegaConf.to_container(cfg.optim, resolve=True),
    )
    answer_bank = MemoryBank(targets, slots, memory, device=injector.device)
    generation = OmegaConf.to_container(cfg.generation, resolve=True)

    def start(user: User) -> UserWeights:
        stored = resume_dir(user) if resume_dir is not None else None
        return read_memory(stored, targets, memory) if stored else fresh_weights(targets, memory)

    def finish(group: list[FinishedUser]) -> Iterator[dict[str, Any]]:
        started = time.perf_counter()
        module = answer_users(
            model,
            base.tokenizer,
            answer_bank,
            group,
            datamodule,
            generation,
            bool(cfg.compare_without_memory),
        )
        share = (time.perf_counter() - started) / len(group)
        for done in group:
            uid = done.user.user_id
            yield {
                "user_id": uid,
                "history_size": len(done.user.history),
                "queries": len(done.user.queries),
                "trainable_parameters": injector.bank.parameters_per_user(),
                "train_loss": done.train_loss,
                "train_seconds": round(done.train_seconds, 3),
                "seconds": round(done.train_seconds + done.extra_seconds + share, 3),
                "memory": module.user_metrics(uid, "memory"),
                "no_memory": module.user_metrics(uid, "no_memory"),
                "predictions": [p for p in module.predictions if p["user_id"] == uid],
            }

    group: list[FinishedUser] = []
    for done in injector.run(users, datamodule, start, seed=int(cfg.seed)):
        started = time.perf_counter()
        info = memory_info(memory, placement) | {"user_id": done.user.user_id}
        write_memory(store.adapter_dir(done.user), targets, done.weights, memory, lora, info)
        done.extra_seconds = time.perf_counter() - started
        group.append(done)
        if len(group) == slots:
            yield from finish(group)
            group = []
    if group:
        yield from finish(group)
