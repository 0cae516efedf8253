"""Building a run's parts from its configuration, for every command (`milp.train`,
`milp.attribute`) and experiment script: one way to turn config nodes into objects, with
milp's one-line errors kept, and the injector `conf/injection` chooses."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from milp.data.datamodule import UserDataModule
from milp.errors import MilpError
from milp.inject import Injector
from milp.memory import MemoryConfig, MemoryPlacement
from milp.models.hf import BaseModel


def build(node: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, letting our one-line errors through unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, MilpError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


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
