"""Pruning, the sweeper side: hand trials the completed trials' curves, log what they did.

The stop decision is made inside the trial (milp: ``milp/run/prune.py``), because trials run
through any Hydra launcher, in this process or in others. Contract with the task:

- Before each batch, ``write_history`` writes ``<sweep dir>/pruning/before-trial<N>.json``
  (N: the batch's first trial): the rule (``percentile``, ``min_users``, ``min_trials``,
  ``maximize``), the ``seed`` of the trials' user order, and ``completed``: the
  running-objective curves (one value per user count) of the trials numbered below N that
  evaluated all their users. Every trial of the batch gets ``<trial_key>=<that file>``.
  The file depends only on the trial log, so a resumed sweep hands a re-launched trial
  the very file the uninterrupted sweep did.
- The task writes ``pruning.json`` in its job dir (``running``, ``users_evaluated``,
  ``pruned``) and returns its objective over the users it evaluated. ``progress_fields``
  reads it into the trial record (``pruned``, ``users_evaluated``, ``running``).
- ``estimate`` is what the optimizer is told for a stopped trial: its running objective
  after k users plus the mean, over the completed trials told before it, of (final value
  - value after the same k users). All trials see the same users in the same order, so
  that gap is the part of the k-user value that the k users' own difficulty explains, and
  the sum is the paired estimate of the trial's full objective (see the README for why
  this is sound). A stopped trial is never the best trial.
"""

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra_plugins.milp_sweeper._overrides import SweepConfigError
from hydra_plugins.milp_sweeper._trial_log import read_json, write_atomic

#: What a pruning task leaves in its job dir (milp.run.prune.PROGRESS_FILE).
PROGRESS_FILE = "pruning.json"
#: Folder of the per-batch history files, in the sweep dir.
HISTORY_DIR = "pruning"
#: The rule's settings, as the task reads them from the history file.
RULE_KEYS = ("percentile", "min_users", "min_trials")


def check_pruning_settings(pruning: Mapping[str, Any]) -> None:
    """``hydra.sweeper.pruning``: thresholds in range, a task key to pass the file by."""
    if not pruning.get("enabled"):
        return
    where = "hydra.sweeper.pruning"
    percentile = pruning.get("percentile")
    if isinstance(percentile, bool) or not isinstance(percentile, int | float):
        raise SweepConfigError(f"{where}.percentile: must be a number, got {percentile!r}")
    if not 0 < percentile < 100:
        raise SweepConfigError(f"{where}.percentile: must be in (0, 100), got {percentile}")
    for name in ("min_users", "min_trials"):
        value = pruning.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SweepConfigError(f"{where}.{name}: must be an integer >= 1, got {value!r}")
    if not pruning.get("trial_key"):
        raise SweepConfigError(f"{where}.trial_key: must name the task's pruning-file key")


def completed_curves(records: Mapping[int, Mapping[str, Any]], before: int) -> list[list[float]]:
    """Running-objective curves of the trials below ``before`` that evaluated all users."""
    return [
        list(records[n]["running"])
        for n in sorted(records)
        if n < before and is_complete(records[n])
    ]


def is_complete(record: Mapping[str, Any]) -> bool:
    """An ok trial that was not stopped early and has its running curve."""
    return record.get("status") == "ok" and not record.get("pruned") and bool(record.get("running"))


def write_history(
    sweep_dir: Path,
    first: int,
    records: Mapping[int, Mapping[str, Any]],
    pruning: Mapping[str, Any],
    maximize: bool,
    seed: int | None,
) -> Path:
    """The history file for the batch starting at trial ``first`` (absolute path)."""
    folder = sweep_dir.resolve() / HISTORY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"before-trial{first}.json"
    history = {k: pruning[k] for k in RULE_KEYS}
    history |= {"maximize": maximize, "seed": 0 if seed is None else int(seed)}
    history["completed"] = completed_curves(records, before=first)
    write_atomic(path, json.dumps(history) + "\n")
    return path


def progress_fields(job_dir: str | None) -> dict[str, Any]:
    """``pruned``, ``users_evaluated`` and ``running`` of a job, from its ``pruning.json``
    (``running: None`` if the task wrote none, e.g. it failed before its first user)."""
    progress = read_json(Path(job_dir) / PROGRESS_FILE) if job_dir else None
    if progress is None:
        return {"pruned": False, "users_evaluated": None, "running": None}
    return {
        "pruned": bool(progress.get("pruned")),
        "users_evaluated": progress.get("users_evaluated"),
        "running": progress.get("running"),
    }


def estimate(record: Mapping[str, Any], completed: Sequence[Sequence[float]]) -> float:
    """The value told for a stopped trial (see the module docstring); its own running
    objective when no completed trial reached that point."""
    k = int(record["users_evaluated"])
    value = float(record["objective"])
    gaps = [curve[-1] - curve[k - 1] for curve in completed if len(curve) >= k]
    return value + statistics.fmean(gaps) if gaps else value
