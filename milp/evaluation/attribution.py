"""Attribution: does a memory know its owner? The library of `python -m milp.attribute`
and of `milp.train`'s attribution step (`attribution.enabled`).

For the N users of a run that have a stored memory, every user's held-out queries with a
gold output are scored (the gold's mean token NLL, `milp.inject.answer.gold_nll`, on the
run's own prompts) under every user's memory, under no memory, and optionally under a
*task memory*: one memory trained like the users' memories, on histories pooled from the
train split's users (never the run's users). That separates adapting to the data set's
domain (any memory helps) from personalization (the owner's memory helps most).

The owner is picked as the memory with the lowest NLL, per user and per query, ties
shared (`milp/evaluation/attribution_stats.py` says how).

Memories are served through the routed `MemoryBank` (as `milp.generate engine=routed`),
one memory at a time over all queries, so equal memories give bit-equal NLLs. Writes
`attribution.json` (summary and both NLL matrices) and `attribution.png` (heatmap) into
the run directory, and the task memory, a peft adapter, under `task_memory/`. Every
memory's files are checked against their recorded SHA-256 before it is scored.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, open_dict

from milp.data.datamodule import QueryCollator, UserDataModule
from milp.data.users import HistoryPair, User, user_hash
from milp.errors import MilpError
from milp.evaluation.attribution_stats import (
    NO_MEMORY,
    TASK_MEMORY,
    heatmap_png,
    summarize_attribution,
)
from milp.inject.answer import gold_nll, gold_targets
from milp.inject.bank import MemoryBank
from milp.memory.adapters import (
    FILES_KEY,
    adapter_config,
    is_saved_memory,
    memory_index,
    memory_info,
    read_bank_weights,
    save_memory,
    stored_memory_config,
    verify_memory,
)
from milp.memory.space import MemoryConfig, MemoryPlacement, place_memory
from milp.run.build import build
from milp.run.files import atomic_write_bytes, atomic_write_text
from milp.run.store import (
    adapters_dir,
    attribution_files,
    recorded_memory,
    task_memory_dir,
    user_memory,
)

log = logging.getLogger("milp")
TASK_USER = "__task__"  # the pooled train-split user the task memory is trained as


@dataclass
class AttributionPlan:
    """What an attribution run needs besides the run's model and memories, checked early:
    the train-split users a task memory pools (None: no task memory), its size and its
    learning rate (None: the run's `optim.lr`)."""

    task_users: list[User] | None
    task_items: int | None
    batch_size: int | None
    task_lr: float | None = None


def plan_attribution(
    cfg: DictConfig,
    test_users: Sequence[User],
    *,
    task_memory: bool,
    task_items: int | None,
    batch_size: int | None,
    task_lr: float | None = None,
    key: str = "attribution",
) -> AttributionPlan:
    """Validate the settings (`key` names them in errors) and load the train split's users
    for a task memory, before anything trains."""
    for name, value in (("task_items", task_items), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise MilpError(f"{key}.{name} must be a positive integer or null, got {value!r}")
        if value is not None and value < 1:
            raise MilpError(f"{key}.{name} must be a positive integer or null, got {value}")
    if task_lr is not None and (
        isinstance(task_lr, bool) or not isinstance(task_lr, int | float) or task_lr < 0
    ):
        raise MilpError(f"{key}.task_lr must be a number >= 0 or null, got {task_lr!r}")
    task_lr = None if task_lr is None else float(task_lr)
    if not isinstance(task_memory, bool):
        raise MilpError(f"{key}.task_memory must be true or false, got {task_memory!r}")
    if not task_memory:
        return AttributionPlan(None, task_items, batch_size, task_lr)
    train_cfg = copy.deepcopy(cfg)  # the data node's ${split} resolves against this root
    with open_dict(train_cfg):
        train_cfg.split = "train"
    try:
        users = build(train_cfg.data).users
    except MilpError as err:
        raise MilpError(f"{key}.task_memory needs the train split's users: {err}") from None
    shared = sorted({u.user_id for u in users} & {u.user_id for u in test_users})
    if shared:
        raise MilpError(
            f"{key}.task_memory: the train split shares {len(shared)} user(s) with split "
            f"{cfg.split} (e.g. {shared[0]}); a task memory must not see the scored users"
        )
    return AttributionPlan(users, task_items, batch_size, task_lr)


def plan_from_train_config(
    cfg: DictConfig, datamodule: UserDataModule, memory: MemoryConfig
) -> AttributionPlan | None:
    """The plan of `milp.train`'s attribution step (`attribution.*`), or None where it is
    off or the run has no memory to attribute."""
    settings = cfg.get("attribution")
    if not settings or not settings.get("enabled"):
        return None
    if not memory.enabled:
        log.info("attribution: skipped, the run has no memory")
        return None
    return plan_attribution(
        cfg,
        datamodule.users,
        task_memory=settings.get("task_memory", False),
        task_items=settings.get("task_items"),
        batch_size=settings.get("batch_size"),
        task_lr=settings.get("task_lr"),
    )


def pooled_history(users: Sequence[User], items: int) -> list[HistoryPair]:
    """Up to `items` history pairs drawn round-robin from the users (each user's most
    recent first), so that as many users as possible contribute."""
    queues = [list(reversed(u.history)) for u in users]
    pooled: list[HistoryPair] = []
    depth = 0
    while len(pooled) < items and any(depth < len(q) for q in queues):
        pooled += [q[depth] for q in queues if depth < len(q)][: items - len(pooled)]
        depth += 1
    return pooled


def task_items(plan: AttributionPlan, users: Sequence[User]) -> int:
    """How many pooled items the task memory trains on: `plan.task_items`, or by default
    `users`' mean history length, the budget one user's memory gets."""
    return plan.task_items or max(1, round(np.mean([len(u.history) for u in users])))


def reusable_task_memory(directory: Path, info: dict, inputs: dict) -> bool:
    """Whether the stored task memory was made from `info` and `inputs` and its files
    all hash as its index lists them; where it exists and cannot be reused, one log line
    says why it is trained again."""
    if not is_saved_memory(directory):
        return False
    try:
        verify_memory(directory)
    except MilpError as err:
        log.warning("task memory: %s; training it again", err)
        return False
    stored = memory_index(directory)
    if stored.get(FILES_KEY) and (stored.get("task"), stored.get("inputs")) == (info, inputs):
        return True
    log.info("task memory: %s was made from other inputs; training it again", directory)
    return False


def train_task_memory(
    plan: AttributionPlan,
    injector: Any,
    base: Any,
    memory: MemoryConfig,
    placement: MemoryPlacement,
    test_users: Sequence[User],
    run_dir: Path,
    run_hash: str,
) -> tuple[Path, dict]:
    """The task memory, trained by the run's own injector (same trainer, optimizer and
    seeding as the users' memories; learning rate `plan.task_lr` where set) and saved
    under `run_dir/task_memory`; a stored one made from the same users, items, learning
    rate, pooled data and run (`run_hash`: its configuration and base model,
    `RunStore.run_hash`), whose files verify, is reused. Default size: `test_users`' mean
    history length, the budget one user's memory gets. It starts from fresh modules."""
    items = task_items(plan, test_users)
    history = pooled_history(plan.task_users, items)
    lr = injector.optim["lr"] if plan.task_lr is None else plan.task_lr
    info = {"train_users": [u.user_id for u in plan.task_users], "items": len(history), "lr": lr}
    directory = task_memory_dir(run_dir)
    pooled = User(TASK_USER, history, [], [])
    inputs = {"run": run_hash, "data": user_hash(pooled)}
    if reusable_task_memory(directory, info, inputs):
        return directory, info
    log.info("task memory: %d items from %d train users", len(history), len(plan.task_users))
    trained = next(iter(injector.run([pooled], lr=lr)))
    record = memory_info(memory, placement) | {
        "user_id": TASK_USER,
        "task": info,
        "inputs": inputs,
        "train_loss": trained.train_loss,
        "train_seconds": round(trained.train_seconds, 3),
    }
    save_memory(directory, trained.memory, adapter_config(memory, placement, base.model), record)
    return directory, info


def score_memories(
    model: torch.nn.Module,
    tokenizer: Any,
    datamodule: UserDataModule,
    users: Sequence[User],
    memories: dict[str, Path | None],
    batch_size: int,
) -> tuple[list[tuple[str, str]], dict[str, list[float]]]:
    """Every gold query of `users` scored under each memory (None: no memory); returns the
    queries as (user_id, query_id) and each memory's NLL per query."""
    requests = [(u.user_id, q) for u in users for q in u.queries if q.gold is not None]
    collate = QueryCollator(tokenizer, datamodule.format)
    batches = []
    for first in range(0, len(requests), batch_size):
        batch = collate(requests[first : first + batch_size])
        batches.append((batch, gold_targets(datamodule.format, tokenizer, batch["golds"])))
    stored = [p for p in memories.values() if p is not None]
    shape = stored_memory_config(stored[0]) if stored else None
    bank = targets = None
    if shape is not None:
        targets = place_memory(shape, model).targets
        bank = MemoryBank(targets, 1, shape, device=next(model.parameters()).device)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    scores: dict[str, list[float]] = {}
    try:
        if bank is not None:
            bank.attach(model)
        for name, directory in memories.items():
            if directory is not None:
                bank.load_user(0, read_bank_weights(directory, targets, shape))
            values: list[float] = []
            for batch, golds in batches:
                slots = [0] * len(golds) if directory is not None else None
                if bank is None:
                    values += gold_nll(model, batch, golds, tokenizer.pad_token_id)
                else:
                    with bank.routing(slots):
                        values += gold_nll(model, batch, golds, tokenizer.pad_token_id)
            scores[name] = values
    finally:
        if bank is not None:
            bank.detach(model)
        for m, mode in modes.items():
            m.training = mode
    return [(user_id, q.id) for user_id, q in requests], scores


def attribute(
    plan: AttributionPlan,
    *,
    injector: Any,
    base: Any,
    datamodule: UserDataModule,
    memory: MemoryConfig,
    placement: MemoryPlacement | None,
    users: Sequence[User],
    run_dir: str | Path,
    run_hash: str,
) -> dict[str, Any] | None:
    """Score, summarize and write attribution.json / attribution.png into `run_dir`;
    returns the summary (without the matrices), or None where fewer than 2 of `users`
    have a stored memory and a gold query. Every memory's files are checked against the
    run's records first (`run_hash`: see `train_task_memory`)."""
    run_dir = Path(run_dir)
    adapters = adapters_dir(run_dir)
    scored = [
        u
        for u in users
        if user_memory(adapters, u.user_id) is not None and any(q.gold for q in u.queries)
    ]
    if len(scored) < 2:
        print(f"attribution: skipped ({len(scored)} user(s) with a stored memory and a gold)")
        return None
    for user in scored:  # a corrupt memory is refused, never scored
        verify_memory(adapters / user.slug, recorded_memory(adapters, user.user_id))
    memories: dict[str, Path | None] = {u.user_id: adapters / u.slug for u in scored}
    task = None
    if plan.task_users is not None:
        # Sized by all the run's users, as memory.init=task sizes it: the same memory.
        directory, task = train_task_memory(
            plan, injector, base, memory, placement, users, run_dir, run_hash
        )
        memories[TASK_MEMORY] = directory
    memories[NO_MEMORY] = None
    batch_size = plan.batch_size or datamodule.eval_batch_size
    queries, scores = score_memories(
        base.model, base.tokenizer, datamodule, scored, memories, batch_size
    )
    result = summarize_attribution([u.user_id for u in scored], queries, scores)
    if task is not None:
        result["task_memory"] = {"path": task_memory_dir(run_dir).name} | task
    summary_file, heatmap_file = attribution_files(run_dir)
    atomic_write_text(summary_file, json.dumps(result, indent=1))
    atomic_write_bytes(heatmap_file, heatmap_png(result))
    return {k: v for k, v in result.items() if k != "matrix"}
