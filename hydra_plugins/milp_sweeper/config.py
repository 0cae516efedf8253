"""Structured config of the ``milp_nevergrad`` sweeper, registered with Hydra's ConfigStore.

Select it with ``hydra/sweeper=milp_nevergrad`` (command line) or
``defaults: [{override hydra/sweeper: milp_nevergrad}]`` (primary config).

This module must stay import-cheap and side-effect free apart from the ConfigStore
registration: Hydra's plugin discovery imports every module under ``hydra_plugins`` for
every Hydra app, so nevergrad and wandb are only imported by the sweeper when it runs.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class OptimConf:
    """How nevergrad searches."""

    # Any name in ``nevergrad.optimizers.registry`` (BO, NGOpt, RandomSearch, CMA, ...).
    optimizer: str = "BO"
    # Total number of trials of the sweep (finished trials of a resumed sweep count too).
    budget: int = 20
    # Points asked per batch; a batch is launched together through the Hydra launcher.
    num_workers: int = 1
    # Seeds nevergrad's random state: the same sweep config gives the same trials.
    seed: int = 0
    # The task function returns a score to maximize (e.g. ROUGE-L); false = a loss.
    maximize: bool = True


@dataclass
class WandbConf:
    """Optional W&B summary run written at the end of the sweep (offline only)."""

    enabled: bool = False
    project: str = "milp"
    # Only "offline" (or "disabled") is accepted: the sweeper never talks to the network.
    mode: str = "offline"
    # Run group; null means the name of the sweep directory.
    group: str | None = None
    # Key of the task config that names a W&B group (milp: logger.group). When set and the
    # composed task config has that key (not, e.g., with logger=csv), every trial and the
    # final evaluation get `<key>=<group>`, so the per-trial runs are grouped by sweep.
    trial_group_key: str | None = None


@dataclass
class PruningConf:
    """Stop trials early (multi-fidelity pruning; the trial decides, e.g. milp/run/prune.py)."""

    enabled: bool = False
    # After k users, a trial stops if its running objective is worse than this percentile
    # of the completed trials' running objectives after the same k users (50: median).
    percentile: float = 50.0
    # Never stop before this many users are evaluated.
    min_users: int = 1
    # Stop only once this many trials have evaluated all their users.
    min_trials: int = 3
    # Task config key that receives the path of the JSON the trial decides from.
    trial_key: str = "prune_file"


@dataclass
class MilpNevergradSweeperConf:
    """Config node ``hydra.sweeper`` for ``hydra/sweeper=milp_nevergrad``."""

    _target_: str = "hydra_plugins.milp_sweeper.sweeper.MilpNevergradSweeper"
    optim: OptimConf = field(default_factory=OptimConf)
    # key -> list of choices | {lower, upper, log, integer, init, step} | sweep string
    # (e.g. "interval(0,1)") | plain value (fixed for every trial). default_factory, not a
    # mutable default: that is what breaks the published plugin on Python 3.11.
    params: dict[str, Any] = field(default_factory=dict)
    # JSON-lines trial log, relative to hydra.sweep.dir; also what a re-run resumes from.
    trials_file: str = "trials.jsonl"
    wandb: WandbConf = field(default_factory=WandbConf)
    # After the search, run the best trial once more with these overrides added (e.g.
    # [split=test]: the held-out evaluation); its objective is recorded as test_result in
    # optimization_results.yaml. Empty: no final evaluation.
    final_overrides: list[str] = field(default_factory=list)
    pruning: PruningConf = field(default_factory=PruningConf)


ConfigStore.instance().store(
    group="hydra/sweeper",
    name="milp_nevergrad",
    node=MilpNevergradSweeperConf,
    provider="milp",
)
