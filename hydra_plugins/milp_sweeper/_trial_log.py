"""The trial log and the sweep's result files, all written so that a kill loses nothing.

Contract:

- ``<sweep dir>/trials.jsonl``: one JSON line per finished trial, appended durably
  (flush + fsync) as soon as its batch returns: ``trial, status (ok|failed), objective,
  duration_s, error, params, overrides, job_dir, finished_at``. ``read_trial_log`` returns
  the records by trial number and skips a line a kill left half-written.
- ``job_record`` turns a Hydra ``JobReturn`` into such a record: a job that raised or
  returned a non-number / NaN / inf is ``failed``; ``duration_s`` is the task function's
  wall time, left in the job dir by ``TimedTask``.
- ``check_replay`` says whether a re-asked batch is the logged one (exact resume) or not
  (``ReplayMismatch``).
- ``write_summary`` writes ``best.yaml`` and ``optimization_results.yaml`` atomically
  (temp file + ``os.replace``); ``FINAL_FILE`` records the final evaluation.
"""

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.milp_sweeper._overrides import to_native
from hydra_plugins.milp_sweeper._search_space import SearchSpace

#: File a job leaves in its output dir with its wall time (read back and deleted).
DURATION_FILE = ".milp_sweeper_duration.json"
#: Record of the final evaluation (``final_overrides``) in the sweep dir.
FINAL_FILE = "final_evaluation.json"

log = logging.getLogger(__name__)


@dataclass
class Trial:
    """A point asked from nevergrad, numbered like its Hydra job (``hydra.job.num``)."""

    num: int
    params: dict[str, Any]
    overrides: list[str]
    candidate: Any = None  # ng.p.Parameter


def contiguous_runs(trials: Sequence[Trial]) -> Iterator[list[Trial]]:
    """Split trials into runs of consecutive numbers (one launcher call each, so that job
    numbers and output dirs stay equal to trial numbers)."""
    group: list[Trial] = []
    for trial in trials:
        if group and trial.num != group[-1].num + 1:
            yield group
            group = []
        group.append(trial)
    if group:
        yield group


class ReplayMismatch(Exception):
    """Replaying the trial log asked a point other than the logged one."""


def check_replay(records: Mapping[int, Mapping[str, Any]], batch: Iterable[Trial]) -> None:
    """Raise ``ReplayMismatch`` if an asked point differs from its logged record."""
    for trial in batch:
        record = records.get(trial.num)
        if record is not None and record.get("params") != trial.params:
            raise ReplayMismatch(
                f"Trial {trial.num}: replay asked {trial.params} but the log has "
                f"{record.get('params')}"
            )


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line durably (flush + fsync): a killed sweep loses no trial."""
    line = json.dumps(record, sort_keys=False, default=str) + "\n"
    with open(path, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":  # a kill mid-write left a partial line
                handle.write(b"\n")
        handle.write(line.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def read_trial_log(path: Path) -> dict[int, dict[str, Any]]:
    """Finished trials by trial number; unreadable (partially written) lines are skipped."""
    records: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return records
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[int(record["trial"])] = record
        except (ValueError, KeyError, TypeError):
            log.warning("%s:%d: skipping unreadable trial record", path, lineno)
    return records


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file, or None if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_atomic(path: Path, text: str) -> None:
    """Write a file via temp file + fsync + os.replace (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def dump_yaml(data: Any) -> str:
    """Readable YAML, keys in insertion order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


class TimedTask:
    """Wraps the task function to leave the job's wall time in its output dir.

    Hydra's ``JobReturn`` carries no timing and launchers may run jobs in other
    processes, so the job itself writes ``DURATION_FILE``; the return value is untouched.
    Module-level class so that launchers which pickle the task (joblib) can do so.
    """

    def __init__(self, task_function: TaskFunction) -> None:
        self.task_function = task_function

    def __call__(self, cfg: DictConfig) -> Any:
        start = time.perf_counter()
        try:
            return self.task_function(cfg)
        finally:
            self._write(time.perf_counter() - start)

    @staticmethod
    def _write(seconds: float) -> None:
        try:
            out = Path(HydraConfig.get().runtime.output_dir)
            (out / DURATION_FILE).write_text(json.dumps({"duration_s": seconds}))
        except Exception:  # timing is best effort; never fail the trial because of it
            pass


def job_output_dir(result: JobReturn) -> str | None:
    """Output directory of a finished job, if the launcher reported its Hydra config."""
    if result.hydra_cfg is None:
        return None
    return OmegaConf.select(result.hydra_cfg, "hydra.runtime.output_dir", default=None)


def pop_job_duration(output_dir: str | None) -> float | None:
    """Read (and remove) the wall time a job wrote through ``TimedTask``."""
    if output_dir is None:
        return None
    path = Path(output_dir) / DURATION_FILE
    try:
        seconds = float(json.loads(path.read_text())["duration_s"])
        path.unlink()
        return round(seconds, 6)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def job_objective(result: JobReturn) -> tuple[float | None, str | None]:
    """(objective, None) for a usable return value, else (None, error message)."""
    if result.status != JobStatus.COMPLETED:
        error = getattr(result, "_return_value", None)  # the exception the job raised
        return None, f"{type(error).__name__}: {error}"
    value = result.return_value
    if value is None or isinstance(value, bool | str | bytes):
        return None, f"task returned {value!r}; it must return the objective (a number)"
    try:
        objective = float(value)
    except (TypeError, ValueError):
        return None, f"task returned a non-numeric {type(value).__name__}: {value!r:.200}"
    if not math.isfinite(objective):
        return None, f"task returned a non-finite objective: {objective}"
    return objective, None


def now_utc() -> str:
    """Timestamp of a record (UTC, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def job_record(trial: Trial, result: JobReturn) -> dict[str, Any]:
    """The trial log record of a finished job."""
    objective, error = job_objective(result)
    output_dir = job_output_dir(result)
    return {
        "trial": trial.num,
        "status": "ok" if error is None else "failed",
        "objective": objective,
        "duration_s": pop_job_duration(output_dir),
        "error": error,
        "params": trial.params,
        "overrides": trial.overrides,
        "job_dir": output_dir,
        "finished_at": now_utc(),
    }


def reused_record(records: Mapping[int, Mapping[str, Any]], trial: Trial) -> dict | None:
    """The log record of a trial whose configuration an earlier trial already evaluated:
    that trial's result under the new number (training is seeded, so a re-run would give
    the same numbers), or None. Failed trials are not reused: a failure may be transient."""
    earlier = next(
        (
            r
            for _, r in sorted(records.items())
            if r.get("status") == "ok" and r.get("params") == trial.params
        ),
        None,
    )
    if earlier is None:
        return None
    return dict(earlier) | {
        "trial": trial.num,
        "overrides": trial.overrides,
        "duration_s": 0.0,
        "reused_from": earlier["trial"],
        "finished_at": now_utc(),
    }


def best_record(
    records: Mapping[int, Mapping[str, Any]], maximize: bool
) -> Mapping[str, Any] | None:
    """Best ok trial that evaluated all its users (earliest on ties), or None."""
    ok = [r for r in records.values() if r.get("status") == "ok" and not r.get("pruned")]
    if not ok:
        return None
    sign = -1.0 if maximize else 1.0
    return min(ok, key=lambda r: (sign * float(r["objective"]), int(r["trial"])))


def log_best(records: Mapping[int, Mapping[str, Any]], best: Mapping[str, Any] | None) -> None:
    """Report the best trial (or that none succeeded)."""
    n_failed = sum(r.get("status") != "ok" for r in records.values())
    if best is None:
        log.warning("No trial succeeded (%d failed); no best.yaml", len(records))
        return
    log.info(
        "Best trial %d of %d (%d failed): objective %.6g with %s",
        best["trial"],
        len(records),
        n_failed,
        best["objective"],
        " ".join(best["overrides"]),
    )


def override_mapping(space: SearchSpace, record: Mapping[str, Any]) -> dict[str, Any]:
    """key -> value of everything a trial overrode (fixed values, then searched)."""
    mapping = {f.key: to_native(f.value) for f in space.fixed.values() if f.key[0] != "~"}
    for name, spec in space.params.items():
        mapping[spec.key] = record["params"].get(name)
    return mapping


def write_summary(
    sweep_dir: Path,
    results: Mapping[str, Any],
    best: Mapping[str, Any] | None,
    space: SearchSpace,
) -> dict[str, Any] | None:
    """Write ``optimization_results.yaml`` (``results``) and, if a trial succeeded,
    ``best.yaml``; return the previous ``optimization_results.yaml`` (None if absent)."""
    results_file = sweep_dir / "optimization_results.yaml"
    previous = yaml.safe_load(results_file.read_text()) if results_file.is_file() else None
    write_atomic(results_file, dump_yaml(dict(results)))
    if best is not None:
        best_file = {
            "objective": best["objective"],
            "trial": best["trial"],
            # params: the searched dimensions only; overrides: the whole trial job.
            "params": dict(best["params"]),
            "overrides": override_mapping(space, best),
        }
        write_atomic(sweep_dir / "best.yaml", dump_yaml(best_file))
    return previous


def results_summary(
    optim: Mapping[str, Any],
    records: Mapping[int, Mapping[str, Any]],
    best: Mapping[str, Any] | None,
    final: Mapping[str, Any] | None,
    final_overrides: Sequence[str],
    pruning: bool = False,
) -> dict[str, Any]:
    """The content of ``optimization_results.yaml`` (with pruning: ``n_pruned`` and
    ``user_evaluations``, the users evaluated by all trials together)."""
    n_ok = sum(r.get("status") == "ok" for r in records.values())
    results: dict[str, Any] = {
        "name": "milp_nevergrad",
        "optimizer": optim["optimizer"],
        "budget": int(optim["budget"]),
        "num_workers": int(optim["num_workers"]),
        "seed": optim.get("seed"),
        "maximize": bool(optim["maximize"]),
        "n_trials": len(records),
        "n_ok": n_ok,
        "n_failed": len(records) - n_ok,
        "best_trial": None if best is None else best["trial"],
        "best_evaluated_params": None if best is None else best["params"],
        "best_evaluated_result": None if best is None else best["objective"],
    }
    if pruning:
        results["n_pruned"] = sum(bool(r.get("pruned")) for r in records.values())
        results["user_evaluations"] = sum(
            int(r.get("users_evaluated") or 0) for r in records.values()
        )
    if final is not None:
        results["final_overrides"] = list(final_overrides)
        results["test_result"] = final["objective"]
        results["test_job_dir"] = final["job_dir"]
        results["test_status"] = final["status"]
    return results
