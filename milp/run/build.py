"""Config nodes to objects: Hydra's `instantiate`, with milp's one-line errors kept (a
`MilpError` raised while building is re-raised as it is, not wrapped in Hydra's)."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from milp.errors import MilpError


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
