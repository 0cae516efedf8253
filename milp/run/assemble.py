"""A run's parts from its configuration, for every command (`milp.train`,
`milp.attribute`, `milp.generate`) and experiment script: the base model, the users'
data, the memory and the injector `conf/injection` chooses."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from milp.data.controls import check_history_of, pooled_histories, swapped_histories
from milp.data.datamodule import UserDataModule
from milp.data.users import user_hash
from milp.errors import MilpError
from milp.evaluation.attribution import (
    AttributionPlan,
    plan_attribution,
    plan_from_train_config,
    pooled_history,
    task_items,
)
from milp.evaluation.metrics import OBJECTIVE_NAMES
from milp.inject import quiet_lightning
from milp.inject.fast import FastPath
from milp.inject.injector import Injector
from milp.memory.space import MemoryConfig, MemoryPlacement, place_memory
from milp.models.hf import BaseModel, model_identity
from milp.run.build import build
from milp.run.settings import check_train_settings
from milp.run.store import config_fingerprint, run_config, run_fingerprint

log = logging.getLogger("milp")

# Settings that do not change a user's results, left out of the run's fingerprint.
VOLATILE_KEYS = ("logger", "paths", "callbacks", "prune_file", "attribution")


def load_base(
    model: DictConfig, datamodule: UserDataModule | None = None, device: str | None = None
) -> BaseModel:
    """The base model of `model` (conf/model), on `device` when one is given, its tokenizer
    attached to `datamodule`'s users when one is given."""
    base: BaseModel = build(model)
    if device:
        base.model.to(device)
    if datamodule is not None:
        datamodule.attach_tokenizer(base.tokenizer)
    return base


@dataclass
class StoredRun:
    """A finished `milp.train` run reopened by a command that reads or adds to it: its
    configuration (with this machine's `paths`), its memory settings and its users."""

    config: DictConfig
    memory: MemoryConfig
    datamodule: UserDataModule


def reopen_run(store: str | Path, paths: DictConfig) -> StoredRun:
    """The run directory `store`'s configuration (with this machine's `paths`), memory and
    users, checked (the errors name `store=`) before any model loads."""
    config = run_config(store) if Path(store).is_dir() else None
    if config is None:
        raise MilpError(f"store={store}: not a milp.train run directory (no .hydra/config.yaml)")
    with open_dict(config):
        config.paths = paths
    memory: MemoryConfig = build(config.memory)
    if not memory.enabled:
        raise MilpError(f"store={store}: the run has no memory (memory.num_loras=0)")
    return StoredRun(config, memory, build(config.data))


def make_injector(
    cfg: DictConfig,
    base: BaseModel,
    memory: MemoryConfig,
    placement: MemoryPlacement | None,
    datamodule: UserDataModule,
) -> Injector:
    """The injector chosen by `cfg.injection`, given the run's model, memory and data."""
    return build(cfg.injection)(
        base,
        memory,
        placement,
        datamodule,
        trainer=cfg.trainer,
        callbacks=cfg.get("callbacks"),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        generation=OmegaConf.to_container(cfg.generation, resolve=True),
        compare_without_memory=cfg.compare_without_memory,
        seed=cfg.seed,
    )


@dataclass
class Run:
    """A run's parts, built and checked before anything is written: the memory, the
    users (with the histories a control gives them), the base model, where memory goes,
    the injector, the attribution and task-memory plans (None: off), each user's data
    hash as trained, and the run's fingerprint (`milp.run.store.FINGERPRINT_PARTS`)."""

    memory: MemoryConfig
    datamodule: UserDataModule
    base: BaseModel
    placement: MemoryPlacement | None
    injector: Injector
    attribution: AttributionPlan | None
    task_start: AttributionPlan | None
    data_hashes: dict[str, str]
    fingerprint: dict[str, str]


def assemble_run(cfg: DictConfig) -> Run:
    """Build and check everything `milp.train` needs from its configuration, in the order
    that fails fastest: settings, data, model, the memory's placement, stored memories."""
    if cfg.objective not in OBJECTIVE_NAMES:
        raise MilpError(f"objective: {cfg.objective!r} is not one of {', '.join(OBJECTIVE_NAMES)}")
    FastPath.from_config(cfg.injection.get("fast"))  # before the model loads
    memory: MemoryConfig = build(cfg.memory)
    check_train_settings(cfg, memory)
    history_of = check_history_of(cfg.get("history_of", "own"))
    if history_of != "own" and not memory.enabled:
        raise MilpError(f"history_of={history_of}: a control of the memory needs a memory")
    if memory.trained_in and (cfg.get("attribution") or {}).get("enabled"):
        raise MilpError(
            "memory.trained_in: attribution trains a task memory and scores the run's own "
            "memories (set attribution.enabled=false)"
        )
    datamodule: UserDataModule = build(cfg.data)
    assign_histories(cfg, datamodule, history_of)
    base = load_base(cfg.model, datamodule)
    placement = place_memory(memory, base.model) if memory.enabled else None
    if placement is not None:
        log.info(
            "memory: %d module(s) of rank %d on layers %s, modules %s",
            memory.num_loras,
            memory.rank,
            placement.layers,
            placement.modules,
        )
    with quiet_lightning():
        instantiate(cfg.trainer, logger=False)  # fails now, not after the first user
    injector = make_injector(cfg, base, memory, placement, datamodule)
    for user in datamodule.users:  # every resume_from / trained_in memory, before training
        injector.stored_memory(user)
    attribution = plan_from_train_config(cfg, datamodule, memory)  # checked before training
    if attribution is not None and history_of != "own":
        raise MilpError(
            f"history_of={history_of}: attribution needs every user's own memory "
            "(set attribution.enabled=false)"
        )
    task_start = plan_task_start(cfg, datamodule, memory)

    fingerprint_cfg = {
        k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in VOLATILE_KEYS
    }
    if task_start is not None:  # the task memory decides where users start
        fingerprint_cfg["task_start_items"] = task_start.task_items
        fingerprint_cfg["task_start_lr"] = task_start.task_lr
    data_hashes = {u.user_id: user_hash(u) for u in datamodule.users}  # as trained
    fingerprint = {
        "config": config_fingerprint(fingerprint_cfg),
        "model": model_identity(base, cfg.paths.cache_dir),
        "data": config_fingerprint(data_hashes),
    }
    if injector.trained_root is not None:
        made_with = run_fingerprint(injector.trained_root.parent)
        if made_with.get("model") != fingerprint["model"]:
            raise MilpError(
                f"memory.trained_in: {injector.trained_root.parent} was trained on another "
                "base model (or is not a run directory) than this run's"
            )
    return Run(
        memory,
        datamodule,
        base,
        placement,
        injector,
        attribution,
        task_start,
        data_hashes,
        fingerprint,
    )


def plan_task_start(cfg: DictConfig, datamodule: UserDataModule, memory: MemoryConfig):
    """For `memory.init=task`, the train-split users the task memory pools (checked before
    anything trains; sized like the attribution's task memory, which is then the same
    one); None otherwise."""
    if not memory.enabled or memory.init != "task" or memory.trained_in:
        return None
    settings = cfg.get("attribution") or {}
    try:
        return plan_attribution(
            cfg,
            datamodule.users,
            task_memory=True,
            task_items=settings.get("task_items"),
            batch_size=None,
            task_lr=settings.get("task_lr"),
        )
    except MilpError as err:
        raise MilpError(f"memory.init=task: {err}") from None


def assign_histories(cfg: DictConfig, datamodule: UserDataModule, history_of: str) -> None:
    """Give every user the history a control run trains their memory on
    (`milp/data/controls.py`); `own` leaves the users as they are."""
    if history_of == "swapped":
        datamodule.users = swapped_histories(datamodule.users)
    elif history_of == "pooled_train":
        settings = cfg.get("attribution") or {}
        try:
            pool = plan_attribution(
                cfg,
                datamodule.users,
                task_memory=True,
                task_items=settings.get("task_items"),
                batch_size=None,
            )
        except MilpError as err:
            raise MilpError(f"history_of=pooled_train: {err}") from None
        # After the items the task memory trains on, so the control sees new task data.
        skip = task_items(pool, datamodule.users)
        need = max(len(u.history) for u in datamodule.users)
        items = pooled_history(pool.task_users, skip + need)
        datamodule.users = pooled_histories(datamodule.users, items, skip)
