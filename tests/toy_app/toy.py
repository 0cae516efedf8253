"""Toy Hydra app for the sweeper tests.

The objective is deterministic and maximal (0.4) at x=0.3, rank=8, lr=1e-3, num_loras=2,
layers=top_half, model=small. Environment variables let a test make given trials (by
``hydra.job.num``) misbehave:

- ``TOY_FAIL_TRIALS=1,3``: raise an exception (a failed job);
- ``TOY_NAN_TRIALS=2``: return NaN (a non-finite objective);
- ``TOY_KILL_AT=4``: ``os._exit(1)`` - the whole sweep dies as if killed;
- ``TOY_CALL_LOG=<file>``: append each job number called (to see which trials ran);
- ``TOY_KILL_AT_USER=5:2``: ``os._exit(1)`` in trial 5 after its 2nd user (mid-trial).

With ``users=N`` the objective is the mean over N toy users (each adds a fixed offset that
averages to zero), evaluated in milp's pruning order and stopped by ``milp.run.prune.Pruner``
when the sweeper passes ``prune_file``: the same trial-side contract as ``milp.train``.
"""

import math
import os
from types import SimpleNamespace

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from milp.run.prune import Pruner

#: Per-user offsets of the toy objective (mean 0): users differ, the ranking of
#: configurations does not.
USER_OFFSETS = (0.06, -0.04, 0.02, -0.08, 0.05, -0.01)


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
    if not cfg.users:
        return objective(cfg)
    return over_users(cfg, num)


def mean_value(results: list[dict]) -> float:
    """The toy's aggregation over users (milp's is example-weighted; all toy users weigh 1)."""
    return sum(r["value"] for r in results) / len(results)


def over_users(cfg: DictConfig, num: int) -> float:
    """The objective over ``cfg.users`` toy users, stopped early by the pruner if asked."""
    users = [SimpleNamespace(user_id=f"u{i}") for i in range(cfg.users)]
    offsets = {u.user_id: USER_OFFSETS[i % len(USER_OFFSETS)] for i, u in enumerate(users)}
    out_dir = HydraConfig.get().runtime.output_dir
    pruner = Pruner.from_config(cfg.prune_file, mean_value, out_dir)
    users = pruner.order(users) if pruner else users
    done: dict[str, dict] = {}
    for user in users:
        done[user.user_id] = {"value": objective(cfg) + offsets[user.user_id]}
        if os.environ.get("TOY_KILL_AT_USER") == f"{num}:{len(done)}":
            os._exit(1)
        if pruner and pruner.should_stop(done):
            break
    evaluated = pruner.evaluated if pruner else list(done)
    return mean_value([done[u] for u in evaluated])


if __name__ == "__main__":
    main()
