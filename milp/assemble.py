"""A run's parts from its configuration, for every command (`milp.train`,
`milp.attribute`) and experiment script: the injector `conf/injection` chooses."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from milp.build import build
from milp.data.datamodule import UserDataModule
from milp.inject import Injector
from milp.memory import MemoryConfig, MemoryPlacement
from milp.models.hf import BaseModel


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
