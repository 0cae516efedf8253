"""What nevergrad is told for each trial record (it minimizes a loss).

Contract: ``LossBook.loss(record)``, called on the records in trial order, returns the
loss to tell or None to tell nothing. It depends only on the records and their order, so
replaying the trial log tells exactly what the original sweep told.

- A completed trial: its objective (negated when maximizing).
- A trial stopped early by pruning: the paired estimate of its full objective
  (``_pruning.estimate``, from the completed trials told before it).
- A failed trial: a penalty worse than every loss told so far, so the optimizer moves away
  from it; before any trial succeeded, nothing (nothing to be worse than, and BO cannot
  take inf/nan).
"""

from collections.abc import Mapping
from typing import Any

from hydra_plugins.milp_sweeper._pruning import estimate, is_complete


class LossBook:
    """Turns trial records into losses for nevergrad (see the module docstring)."""

    def __init__(self, maximize: bool) -> None:
        self.maximize = maximize
        self.losses: list[float] = []
        self.completed: list[list[float]] = []  # running curves of completed trials

    def loss(self, record: Mapping[str, Any]) -> float | None:
        """Loss to tell for a record, or None to skip telling it."""
        if record.get("status") == "ok" and record.get("objective") is not None:
            if record.get("pruned"):
                objective = estimate(record, self.completed)
            else:
                objective = float(record["objective"])
                if is_complete(record):
                    self.completed.append(list(record["running"]))
            loss = -objective if self.maximize else objective
            self.losses.append(loss)
            return loss
        if not self.losses:
            return None
        worst, best = max(self.losses), min(self.losses)
        return worst + max(worst - best, 0.1 * abs(worst), 1e-3)
