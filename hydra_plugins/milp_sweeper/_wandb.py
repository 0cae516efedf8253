"""The sweep's optional W&B summary run (``hydra.sweeper.wandb.enabled: true``).

Contract: ``log_wandb_summary`` writes one run, offline (``mode`` is checked to be
``offline`` or ``disabled`` before any trial), under ``$WANDB_DIR`` or the sweep dir, in
group ``wandb.group`` (default: the sweep dir's name): ``objective`` and ``best_so_far``
per trial, a trials table, and the best params (and the final ``test_result``) in its
summary. wandb is imported only here, only when enabled; ``write_summary_run`` logs a
W&B failure instead of failing a finished sweep.
"""

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_summary_run(**kwargs: Any) -> None:
    """``log_wandb_summary``; a W&B problem is logged, it must not fail a finished sweep."""
    try:
        log_wandb_summary(**kwargs)
    except Exception as err:
        log.warning("W&B summary run failed: %s", err)


def log_wandb_summary(
    settings: Mapping[str, Any],
    sweep_dir: Path,
    records: Sequence[Mapping[str, Any]],
    best: Mapping[str, Any] | None,
    run_config: Mapping[str, Any],
    maximize: bool,
    final: Mapping[str, Any] | None = None,
) -> None:
    """Write the sweep's W&B summary run (offline, into $WANDB_DIR or the sweep dir)."""
    import wandb

    group = str(settings.get("group") or sweep_dir.name)
    init_kwargs = dict(
        project=settings.get("project") or "milp",
        group=group,
        name=f"{group}-summary",
        job_type="sweep-summary",
        mode=settings.get("mode") or "offline",
        dir=os.environ.get("WANDB_DIR") or str(sweep_dir),
        config=dict(run_config),
    )
    try:
        # A separate run even if a trial (same process with the basic launcher) left one open.
        run = wandb.init(reinit="create_new", **init_kwargs)
    except Exception:  # wandb < 0.19 only knows reinit=True
        run = wandb.init(reinit=True, **init_kwargs)
    pick = max if maximize else min
    best_so_far: float | None = None
    table = wandb.Table(columns=["trial", "status", "objective", "params"])
    for step, record in enumerate(records):
        objective = record.get("objective")
        row: dict[str, Any] = {"trial": record["trial"], "failed": int(objective is None)}
        if objective is not None:
            best_so_far = objective if best_so_far is None else pick(best_so_far, objective)
            row["objective"] = objective
        if best_so_far is not None:
            row["best_so_far"] = best_so_far
        run.log(row, step=step)
        table.add_data(
            record["trial"], record.get("status"), objective, json.dumps(record.get("params"))
        )
    run.log({"trials": table})
    if best is not None:
        run.summary["best_objective"] = best["objective"]
        run.summary["best_trial"] = best["trial"]
        run.summary["best_params"] = dict(best["params"])
    if final is not None and final.get("objective") is not None:
        run.summary["test_result"] = final["objective"]
        run.summary["test_overrides"] = list(final["overrides"])
    run.finish()
