"""``milp_nevergrad``: a resumable Hydra sweeper driven by nevergrad (BO by default).

Contract: each trial is one Hydra job. ``sweep`` validates the whole configuration
(``_checks``; nothing is written on an error), then asks nevergrad for ``num_workers``
points at a time, turns them into override lists (``_search_space``, ``_overrides``),
launches them together through the configured Hydra launcher with job number = trial
number, appends one record per trial to ``<sweep dir>/trials.jsonl`` and tells nevergrad
the results (``_trial_log``). Re-running the same command on the same sweep dir replays
that log and runs only the missing trials. After the search it writes ``best.yaml`` and
``optimization_results.yaml``, optionally runs the best trial once more with
``final_overrides`` (e.g. ``split=test``), and optionally writes a W&B summary run
(``_wandb``).

Modules: this one is the plugin (Hydra API, ask / launch / tell, resume, final
evaluation); the ``_``-prefixed modules hold the implementation. Hydra's plugin scanner
imports every module under ``hydra_plugins`` in *every* Hydra app but skips names starting
with ``_``, so those load only when a sweep runs; nevergrad (~3 s to import) and wandb are
imported inside the functions that use them, after the configuration checks. No
``from __future__ import annotations`` in the scanned modules (this one, config.py,
callbacks.py, sweeps.py): the scanner executes them before registering them in
``sys.modules``, where dataclasses with string annotations crash, and a crash there would
break every Hydra app.
"""

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf

from hydra_plugins.milp_sweeper._checks import key_exists, validated_space
from hydra_plugins.milp_sweeper._overrides import (
    final_job_overrides,
    format_value,
    param_name,
    to_native,
)
from hydra_plugins.milp_sweeper._pruning import progress_fields, write_history
from hydra_plugins.milp_sweeper._search_space import SearchSpace, make_optimizer
from hydra_plugins.milp_sweeper._tell import LossBook
from hydra_plugins.milp_sweeper._trial_log import (
    FINAL_FILE,
    ReplayMismatch,
    TimedTask,
    Trial,
    append_jsonl,
    best_record,
    check_replay,
    contiguous_runs,
    job_record,
    log_best,
    read_json,
    read_trial_log,
    results_summary,
    reused_record,
    write_atomic,
    write_summary,
)
from hydra_plugins.milp_sweeper._wandb import write_summary_run

log = logging.getLogger(__name__)


class MilpNevergradSweeper(Sweeper):
    """Hydra sweeper: nevergrad ask/launch/tell with a durable, resumable trial log."""

    def __init__(
        self,
        optim: Mapping[str, Any],
        params: Mapping[str, Any] | None = None,
        trials_file: str = "trials.jsonl",
        wandb: Mapping[str, Any] | None = None,
        final_overrides: Sequence[str] | None = None,
        pruning: Mapping[str, Any] | None = None,
    ) -> None:
        self.optim = _plain(optim)
        self.pruning = _plain(pruning or {})
        self.params = _plain(params or {})
        self.trials_file = trials_file
        self.wandb = _plain(wandb or {})
        self.final_overrides = [str(o) for o in _plain(final_overrides or [])]
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.space = SearchSpace()
        self.records: dict[int, dict[str, Any]] = {}
        self.sweep_dir = Path(".")
        # Added to every launched job, not part of a trial's recorded overrides.
        self.launch_extra: list[str] = []
        self._launched = 0  # jobs launched by this invocation (0: a re-run with nothing to do)
        self._book = LossBook(maximize=True)

    # ---- Hydra plugin API ---------------------------------------------------------

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        """Keep the composed config and create the launcher (with timed task function)."""
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=TimedTask(task_function), config=config
        )

    def sweep(self, arguments: list[str]) -> dict[str, Any]:
        """Validate, (re)run the missing trials, then write the summary files."""
        assert self.config is not None and self.hydra_context is not None
        self.space = validated_space(  # raises before anything is written
            self.config,
            self.hydra_context,
            arguments,
            optim=self.optim,
            params=self.params,
            trials_file=self.trials_file,
            wandb=self.wandb,
            final_overrides=self.final_overrides,
            pruning=self.pruning,
        )
        self.sweep_dir = Path(str(self.config.hydra.sweep.dir))
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        self.records = read_trial_log(self.trial_log_path)
        self.launch_extra = self._group_overrides()
        budget = int(self.optim["budget"])
        if self.records:
            log.info(
                "Resuming sweep in %s: %d of %d trials already finished",
                self.sweep_dir,
                len(self.records),
                budget,
            )
        log.info(
            "milp_nevergrad: %s, budget %d, %d per batch, %s; searching %s",
            self.optim["optimizer"],
            budget,
            self.optim["num_workers"],
            "maximize" if self.optim["maximize"] else "minimize",
            ", ".join(self.space.params),
        )
        if len(self.records) < budget:
            self._search()
        else:
            log.info("All %d trials are already in %s", budget, self.trial_log_path)
        best = best_record(self.records, maximize=bool(self.optim["maximize"]))
        log_best(self.records, best)
        final = self._final_evaluation(best) if self.final_overrides and best else None
        return self._finish(best, final)

    @property
    def trial_log_path(self) -> Path:
        """``<sweep dir>/<trials_file>``."""
        return self.sweep_dir / self.trials_file

    def wandb_group(self) -> str:
        """The sweep's W&B group: ``wandb.group`` or the sweep dir's name."""
        return str(self.wandb.get("group") or self.sweep_dir.name)

    def _group_overrides(self) -> list[str]:
        """``<trial_group_key>=<group>`` if that key is in the task config (and not set
        on the command line), else nothing."""
        key = self.wandb.get("trial_group_key")
        if not key or param_name(key) in self.space.fixed or param_name(key) in self.space.params:
            return []
        assert self.config is not None
        if not key_exists(self.config, key):
            log.info("%s is not in the task config: trials are not given a W&B group", key)
            return []
        return [f"{key}={format_value(self.wandb_group())}"]

    # ---- ask / launch / tell ------------------------------------------------------

    def _new_optimizer(self) -> Any:
        """A fresh, seeded optimizer (same seed, same points) and a fresh loss book."""
        optimizer, _ = make_optimizer(self.space, self.optim)
        self._book = LossBook(maximize=bool(self.optim["maximize"]))
        return optimizer

    def _search(self) -> None:
        """Run trials until ``budget`` are finished, resuming from the trial log.

        Exact resume: with a seed, asking again from a fresh optimizer reproduces the
        logged points, so the loop replays them (telling the logged results, not
        launching) and launches only the missing trial numbers. If a replayed point differs
        from the log (seed, budget, optimizer or search space changed), fall back: tell the
        logged trials to a fresh optimizer as points it did not ask, then run the remaining
        trials with new job numbers after the largest logged one.
        """
        budget = int(self.optim["budget"])
        replayable = all(0 <= num < budget for num in self.records)
        if not self.records or (self.optim.get("seed") is not None and replayable):
            try:
                self._run_batches(self._new_optimizer(), first=0, count=budget, replay=True)
                return
            except ReplayMismatch as mismatch:
                log.warning("%s; resuming by telling the logged trials instead", mismatch)
        optimizer = self._new_optimizer()
        told = self._tell_logged(optimizer)
        log.info("Told the optimizer %d logged trials", told)
        first = max(self.records, default=-1) + 1
        self._run_batches(optimizer, first=first, count=budget - len(self.records), replay=False)

    def _run_batches(self, optimizer: Any, first: int, count: int, replay: bool) -> None:
        """Trials ``first .. first+count-1`` in batches of ``num_workers``: ask, launch
        the ones without a logged record, tell all of them in trial order."""
        num_workers = int(self.optim["num_workers"])
        num, end = first, first + count
        while num < end:
            batch = [self._ask(optimizer, n) for n in range(num, min(num + num_workers, end))]
            if replay:
                check_replay(self.records, batch)
            todo = [t for t in batch if t.num not in self.records and not self._reuse(t)]
            self._launch(todo, batch_first=num)
            for trial in batch:
                self._tell(optimizer, trial.candidate, self.records[trial.num])
            num += len(batch)

    def _ask(self, optimizer: Any, num: int) -> Trial:
        """Ask one point and turn it into the job's override list."""
        candidate = optimizer.ask()
        params = {name: to_native(value) for name, value in candidate.value.items()}
        searched = [
            f"{spec.key}={format_value(params[name])}" for name, spec in self.space.params.items()
        ]
        return Trial(num, params, self.space.fixed_overrides() + searched, candidate)

    def _tell(self, optimizer: Any, candidate: Any, record: Mapping[str, Any]) -> None:
        """Tell a trial's loss (or a penalty for a failure; see ``LossBook``)."""
        loss = self._book.loss(record)
        if loss is not None:
            optimizer.tell(candidate, loss)

    def _tell_logged(self, optimizer: Any) -> int:
        """Tell every logged trial as a point the optimizer did not ask (nevergrad allows
        it, BO included); trials outside the current search space are skipped."""
        told = 0
        for num in sorted(self.records):
            record = self.records[num]
            try:
                candidate = optimizer.parametrization.spawn_child(new_value=record["params"])
            except Exception as err:
                log.warning("Trial %d does not fit the search space, not told: %s", num, err)
                continue
            self._tell(optimizer, candidate, record)
            told += 1
        return told

    def _launch(self, trials: Sequence[Trial], batch_first: int) -> None:
        """Launch trials (contiguous job numbers per launch) and log each result. With
        pruning, every trial of the batch starting at ``batch_first`` gets the same
        history: the trials logged below ``batch_first``."""
        extra = list(self.launch_extra)
        if trials and self.pruning.get("enabled"):
            history = write_history(
                self.sweep_dir,
                batch_first,
                self.records,
                self.pruning,
                maximize=bool(self.optim["maximize"]),
                seed=self.optim.get("seed"),
            )
            extra.append(f"{self.pruning['trial_key']}={format_value(str(history))}")
        for group in contiguous_runs(trials):
            nums = f"#{group[0].num}" + (f"..#{group[-1].num}" if len(group) > 1 else "")
            log.info("Launching batch of %d trial(s): %s", len(group), nums)
            assert self.launcher is not None
            self._launched += len(group)
            results = self.launcher.launch(
                [t.overrides + extra for t in group], initial_job_idx=group[0].num
            )
            for trial, result in zip(group, results, strict=True):
                self._record(trial, result)

    def _reuse(self, trial: Trial) -> bool:
        """Log a repeated configuration with its earlier result; returns whether it did."""
        record = reused_record(self.records, trial)
        if record is not None:
            append_jsonl(self.trial_log_path, record)
            self.records[trial.num] = record
            log.info("Trial %d: as trial %d, result reused", trial.num, record["reused_from"])
        return record is not None

    def _record(self, trial: Trial, result: JobReturn) -> None:
        """Append the trial's record to the log (durably) and report it."""
        record = job_record(trial, result)
        if self.pruning.get("enabled"):
            record |= progress_fields(record["job_dir"])
        append_jsonl(self.trial_log_path, record)
        self.records[trial.num] = record
        if record.get("pruned"):
            log.info(
                "Trial %d: stopped after %d users, objective so far %.6g  %s",
                trial.num,
                record["users_evaluated"],
                record["objective"],
                trial.params,
            )
        elif record["error"] is None:
            log.info("Trial %d: objective %.6g  %s", trial.num, record["objective"], trial.params)
        else:
            log.warning("Trial %d failed (search goes on): %s", trial.num, record["error"])

    # ---- end of sweep -------------------------------------------------------------

    def _final_evaluation(self, best: Mapping[str, Any]) -> dict[str, Any]:
        """Run the best trial once more with ``final_overrides`` (e.g. ``split=test``).

        One job in ``<sweep dir>/final-trial<N>`` (N: the best trial). A re-run of a sweep
        whose final evaluation already succeeded for the same best trial and overrides
        reuses the recorded result instead of launching it again.
        """
        overrides = final_job_overrides(best["overrides"], self.final_overrides)
        subdir = f"final-trial{best['trial']}"
        record_path = self.sweep_dir / FINAL_FILE
        previous = read_json(record_path)
        what = " ".join(self.final_overrides)
        if (
            previous
            and previous.get("status") == "ok"
            and previous.get("trial") == best["trial"]
            and previous.get("overrides") == overrides
        ):
            log.info(
                "Final evaluation (%s) of best trial %d already done: objective %.6g; job %s",
                what,
                best["trial"],
                previous["objective"],
                previous.get("job_dir"),
            )
            return previous
        log.info(
            "Final evaluation: best trial %d with %s, in %s",
            best["trial"],
            what,
            self.sweep_dir / subdir,
        )
        assert self.launcher is not None
        self._launched += 1
        [result] = self.launcher.launch(
            [[*overrides, *self.launch_extra, f"hydra.sweep.subdir={subdir}"]],
            initial_job_idx=max(self.records, default=-1) + 1,
        )
        final = Trial(int(best["trial"]), dict(best["params"]), overrides)
        job = job_record(final, result) | {"search_objective": best["objective"]}
        order = ("trial", "status", "objective", "search_objective", "duration_s", "error")
        record = {k: job[k] for k in (*order, "overrides", "job_dir", "finished_at")}
        write_atomic(record_path, json.dumps(record, indent=1, default=str) + "\n")
        if record["error"] is None:
            log.info(
                "Final evaluation (%s) of best trial %d: objective %.6g (search: %.6g); job %s",
                what,
                best["trial"],
                record["objective"],
                best["objective"],
                record["job_dir"],
            )
        else:
            log.warning("Final evaluation failed (re-run the sweep to retry): %s", record["error"])
        return record

    def _finish(
        self, best: Mapping[str, Any] | None, final: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write best.yaml and optimization_results.yaml; the W&B summary run."""
        results = results_summary(
            self.optim,
            self.records,
            best,
            final,
            self.final_overrides,
            pruning=bool(self.pruning.get("enabled")),
        )
        previous = write_summary(self.sweep_dir, results, best, self.space)
        if self.wandb.get("enabled"):
            if self._launched or previous != results:
                write_summary_run(
                    settings=self.wandb,
                    sweep_dir=self.sweep_dir,
                    records=[self.records[n] for n in sorted(self.records)],
                    best=best,
                    run_config={"optim": self.optim, "search_space": list(self.space.params)},
                    maximize=bool(self.optim["maximize"]),
                    final=final,
                )
            else:
                log.info("Nothing new since the last W&B summary run; not writing another")
        return results


def _plain(node: Any) -> Any:
    """OmegaConf node -> plain container (Hydra passes DictConfig kwargs)."""
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node) if isinstance(node, Mapping) else node
