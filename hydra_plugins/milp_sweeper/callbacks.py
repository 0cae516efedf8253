"""Hydra callbacks for sweeps of apps that log to W&B (enabled in ``sweeps/*.yaml``).

Launchers such as Hydra's basic launcher run every job of a multirun in the same process.
Lightning's ``WandbLogger`` reuses a W&B run that is still open ("There is a wandb run
already in progress"), and ``finalize`` does not close it, so without this callback all
trials of a sweep would be logged into the first trial's run. ``FinishWandbRun`` closes
the job's run when the job ends: one W&B run per trial.

Import-cheap on purpose (Hydra imports every module under ``hydra_plugins``): wandb is
only touched if the job already imported it.
"""

import logging
import sys
from typing import Any

from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)


class FinishWandbRun(Callback):
    """``hydra.callbacks.<name>._target_`` = this: finish the W&B run a job left open."""

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        wandb = sys.modules.get("wandb")
        if wandb is None or getattr(wandb, "run", None) is None:
            return
        try:
            failed = getattr(job_return, "status", None) == JobStatus.FAILED
            wandb.finish(exit_code=1 if failed else 0)
        except Exception as err:  # never fail a finished job because of its logger
            log.warning("wandb.finish() after the job failed: %s", err)
