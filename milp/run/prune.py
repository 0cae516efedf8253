"""Pruning a search trial: stop evaluating users once the trial cannot plausibly win.

The trial side of the ``milp_nevergrad`` sweeper's pruning
(``hydra_plugins/milp_sweeper/_pruning.py`` is the sweeper side). Contract:

- The sweeper passes ``prune_file=<json>`` to each trial. That file holds the rule
  (``percentile``, ``min_users``, ``min_trials``, ``maximize``), the ``seed`` of the user
  order, and ``completed``: the running-objective curves of the trials that finished all
  their users, one value per user count. ``prune_file=null`` (the default) is no pruning.
- ``Pruner.order`` puts the users in a fixed, seeded order (independent of the data file's
  order), so that "after k users" means the same k users in every trial.
- After each finished user, ``Pruner.should_stop`` extends the trial's running objective
  (the caller's aggregation of the first k users' results, the same as the final
  objective's) and applies ``PruneRule.stops``; it writes ``pruning.json`` in the job dir
  (``order``, ``running``, ``users_evaluated``, ``pruned``), which the sweeper reads into
  the trial log. A resumed trial (users already done on disk) is checked over those first,
  so it stops where the uninterrupted trial stopped.

The rule (median stopping, generalised to a percentile): after ``k >= min_users`` users,
with at least ``min_trials`` completed curves, a trial stops if its running objective is
worse than the ``percentile``-th percentile of the completed trials' running objectives
after the same ``k`` users (50: the median). The last user never triggers a stop.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milp.errors import MilpError
from milp.run.files import atomic_write_text

#: What a trial writes in its output dir for the sweeper (read into the trial log).
PROGRESS_FILE = "pruning.json"
_RULE_KEYS = ("percentile", "min_users", "min_trials", "maximize")


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of ``values``, interpolated linearly between order statistics."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class PruneRule:
    """When a trial stops, given the completed trials' curves (see the module docstring)."""

    percentile: float = 50.0
    min_users: int = 1
    min_trials: int = 3
    maximize: bool = True

    def stops(self, k: int, value: float, completed: Sequence[Sequence[float]]) -> bool:
        """True if a trial whose running objective after ``k`` users is ``value`` stops."""
        at_k = [curve[k - 1] for curve in completed if len(curve) > k]
        if k < self.min_users or len(at_k) < self.min_trials:
            return False  # too early, or too few comparable trials (also: k is the last user)
        if self.maximize:
            return value < quantile(at_k, self.percentile / 100)
        return value > quantile(at_k, 1 - self.percentile / 100)

    def first_stop(
        self, curve: Sequence[float], completed: Sequence[Sequence[float]]
    ) -> int | None:
        """The user count at which a trial with this running curve stops (None: never)."""
        return next(
            (k for k in range(1, len(curve) + 1) if self.stops(k, curve[k - 1], completed)),
            None,
        )


def seeded_order(user_ids: Sequence[str], seed: int) -> list[str]:
    """A fixed permutation of the user ids that depends only on ``seed`` and the ids."""
    return sorted(user_ids, key=lambda u: hashlib.sha256(f"{seed}:{u}".encode()).hexdigest())


class Pruner:
    """One trial's pruning state: the user order, its running objective, the decision."""

    def __init__(
        self,
        rule: PruneRule,
        completed: Sequence[Sequence[float]],
        seed: int,
        objective: Callable[[list[dict]], float | None],
        out_dir: str | Path,
    ) -> None:
        self.rule, self.completed, self.seed = rule, [list(c) for c in completed], seed
        self.objective = objective
        self.out_dir = Path(out_dir)
        self.ids: list[str] = []
        self.running: list[float] = []
        self.pruned = False

    @classmethod
    def from_config(
        cls,
        prune_file: str | None,
        objective: Callable[[list[dict]], float | None],
        out_dir: str | Path,
        processes: int = 1,
    ) -> Pruner | None:
        """The pruner described by ``prune_file`` (None: pruning is off)."""
        if prune_file is None:
            return None
        if processes > 1:
            raise MilpError("prune_file: pruning needs the trial's users in one process")
        path = Path(prune_file)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise MilpError(f"prune_file: cannot read {path}: {err}") from None
        if not isinstance(spec, dict):
            raise MilpError(f"prune_file: {path} must hold a JSON object")
        missing = [k for k in (*_RULE_KEYS, "seed", "completed") if k not in spec]
        if missing:
            raise MilpError(f"prune_file: {path} lacks {', '.join(missing)}")
        rule = PruneRule(**{k: spec[k] for k in _RULE_KEYS})
        return cls(rule, spec["completed"], int(spec["seed"]), objective, out_dir)

    def order(self, users: Sequence[Any]) -> list[Any]:
        """The users (objects with ``user_id``) in the trial's fixed, seeded order."""
        by_id = {u.user_id: u for u in users}
        self.ids = seeded_order(list(by_id), self.seed)
        return [by_id[i] for i in self.ids]

    def should_stop(self, done: Mapping[str, dict]) -> bool:
        """Extend the running objective over the finished users (in order) and decide.

        ``done`` maps user id -> result record; only its leading run of users in the
        trial's order counts (a later user without its predecessors changes nothing).
        """
        results = []
        for user_id in self.ids:
            if user_id not in done:
                break
            results.append(done[user_id])
        for k in range(len(self.running) + 1, len(results) + 1):
            value = self.objective(results[:k])
            self.running.append(math.nan if value is None else float(value))
            if self.rule.stops(k, self.running[-1], self.completed):
                self.pruned = True
                break
        self._write()
        return self.pruned

    @property
    def evaluated(self) -> list[str]:
        """Ids of the users the trial's objective is computed on (all, unless pruned)."""
        return self.ids[: len(self.running)] if self.pruned else list(self.ids)

    def summary(self) -> dict[str, Any]:
        """Keys added to metrics.json: whether the trial stopped early, and after how many."""
        return {"pruned": self.pruned, "users_evaluated": len(self.running)}

    def _write(self) -> None:
        """``pruning.json`` for the sweeper (atomic: it may read it after a kill)."""
        progress = {
            "order": self.ids,
            "running": self.running,
            "users_evaluated": len(self.running),
            "pruned": self.pruned,
        }
        atomic_write_text(self.out_dir / PROGRESS_FILE, json.dumps(progress) + "\n")
