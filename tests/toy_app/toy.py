"""Toy Hydra app for the sweeper tests.

The objective is deterministic and maximal (0.4) at x=0.3, rank=8, lr=1e-3, num_loras=2,
layers=top_half, model=small. Environment variables let a test make given trials (by
``hydra.job.num``) misbehave:

- ``TOY_FAIL_TRIALS=1,3``: raise an exception (a failed job);
- ``TOY_NAN_TRIALS=2``: return NaN (a non-finite objective);
- ``TOY_KILL_AT=4``: ``os._exit(1)`` - the whole sweep dies as if killed;
- ``TOY_CALL_LOG=<file>``: append each job number called (to see which trials ran).
"""

import math
import os

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


def objective(cfg: DictConfig) -> float:
    """Smooth in x and log10(lr), bonuses for the right discrete choices."""
    return (
        -((cfg.x - 0.3) ** 2)
        + 0.2 * (cfg.memory.rank == 8)
        - 0.05 * abs(math.log10(cfg.optim.lr) + 3)
        - 0.02 * abs(cfg.memory.num_loras - 2)
        + 0.1 * (cfg.memory.layers == "top_half")
        + cfg.model.bonus
    )


def _env_nums(name: str) -> set[int]:
    """Job numbers listed in an environment variable like ``1,3``."""
    return {int(n) for n in os.environ.get(name, "").split(",") if n.strip()}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Return the toy objective, or misbehave on request (see module docstring)."""
    num = HydraConfig.get().job.num
    if os.environ.get("TOY_CALL_LOG"):
        with open(os.environ["TOY_CALL_LOG"], "a") as handle:
            handle.write(f"{num}\n")
    if num in _env_nums("TOY_KILL_AT"):
        os._exit(1)
    if num in _env_nums("TOY_FAIL_TRIALS"):
        raise RuntimeError(f"toy failure requested for trial {num}")
    if num in _env_nums("TOY_NAN_TRIALS"):
        return float("nan")
    return objective(cfg)


if __name__ == "__main__":
    main()
