"""Fair tuning for `make reproduce`: every method gets the same search budget on the
validation users, and all choices are made before any test user is answered.

Each tuned method has its space in a sweep file (`TUNING_SWEEPS`): retrieval k for
retrieval-in-prompt, learning rate and epochs for the OPPU-style PEFT, MiLP's memory
search (sweeps/milp_bo.yaml), and MiLP's space plus the sparse-history repetition
(MiLP + retrieval combines MiLP's and retrieval's choices: experiments/evaluation.py).
One `python -m milp.train -m` per method runs it through milp's sweeper with the same
trial budget, optimizer, seed, pruning rule and dev users (`Budget`), on ``split=dev``
and without the sweeper's own test evaluation (``final_overrides=[]``); a space of at
most that many configurations (retrieval's k) is instead tried whole, once each (a grid:
the optimizer would spend trials on repeats).
The best trial by the dev objective gives the method's settings, which the test runs
then use. `check_dev_only` verifies, from the files the trials wrote, that no tuning job
ran on another split.

Writes ``<out>/runs/tune/<method>/`` (the sweep's trials.jsonl and best.yaml, or
grid.jsonl; one dir per trial) and ``<out>/tuning.json`` (per method: space, budget,
split, dev users, trials, distinct configurations, tuner, best trial, dev objective,
chosen settings, wall time).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from jobs import ROOT, run, train_command
from stats import lower_is_better

from milp.run.files import atomic_write_text
from milp.run.store import metrics_file, read_run_file, user_results

#: method -> the sweep file (sweeps/<name>.yaml) that holds its tuning space.
TUNING_SWEEPS = {
    "rag": "tune_rag",
    "oppu": "tune_oppu",
    "milp": "milp_bo",
    "milp_sparse": "tune_milp_sparse",
}
#: Methods that are not tuned, and why.
NOT_TUNED = {
    "zero_shot": "no settings to tune",
    "milp_default": "the experiment's memory configuration (conf/experiment), not searched here",
    "milp_task_ft": "a control: MiLP's chosen settings, trained on pooled train-user items",
    "milp_swapped": "a control: MiLP's memories, each user answered with another test user's",
    "milp_rag": "MiLP's memories with retrieval's chosen k in the prompt (each tuned alone)",
}
TUNING_SPLIT = "dev"
GRID_LOG = "grid.jsonl"


@dataclass(frozen=True)
class Budget:
    """What every tuned method gets: the same trials, optimizer, seed, pruning, users."""

    trials: int
    optimizer: str = "BO"
    seed: int = 0
    pruning: bool = True
    dev_users: int | None = None  # the first N validation users per trial; None: all
    objective: str = "rougeL"  # the dev metric every method is tuned for

    def overrides(self) -> list[str]:
        return [
            f"split={TUNING_SPLIT}",
            f"objective={self.objective}",
            f"hydra.sweeper.optim.maximize={str(not lower_is_better(self.objective)).lower()}",
            f"hydra.sweeper.optim.budget={self.trials}",
            f"hydra.sweeper.optim.optimizer={self.optimizer}",
            f"hydra.sweeper.optim.seed={self.seed}",
            f"hydra.sweeper.pruning.enabled={str(self.pruning).lower()}",
            "hydra.sweeper.final_overrides=[]",
            "hydra.sweeper.wandb.enabled=false",
            # A trial is scored by its objective; the attribution matrix is for test runs.
            "attribution.enabled=false",
            *([f"data.users.max_users={self.dev_users}"] if self.dev_users else []),
        ]


def composed_space(
    experiment: str, method: str, overrides: list[str]
) -> tuple[dict[str, Any], str]:
    """The method's tuning space as its sweep file composes (``hydra.sweeper.params``)
    and the objective it is tuned for."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"+experiment={experiment}",
                f"+method={method}",
                f"+sweep={TUNING_SWEEPS[method]}",
                *overrides,
            ],
            return_hydra_config=True,
        )
    return OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True), str(cfg.objective)


def space_as_run(params: dict[str, Any], overrides: list[str], extra: list[str]) -> dict[str, Any]:
    """The space a sweep runs: the sweep file's dimensions, a dimension that the run's
    own `overrides` set to a plain value fixed at it (as the sweeper does), then the
    command line's sweep overrides (`extra`) as written."""
    space = dict(params)
    for override in overrides:
        key, _, value = override.partition("=")
        if key in space:
            space[key] = f"fixed: {value}"
    for override in extra:
        key, value = override.split("=", 1)
        space[key] = value
    return space


def grid_points(params: dict[str, Any], arguments: list[str]) -> list[dict[str, Any]] | None:
    """Every configuration of a space made only of choices and integer ranges (the
    sweeper's own reading of `params` and the command line), or None if it has a
    continuous dimension."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.milp_sweeper._search_space import build_search_space

    axes: dict[str, list[Any]] = {}
    for key, spec in build_search_space(params, arguments, OverridesParser.create()).params.items():
        if hasattr(spec, "options"):  # no isinstance: Hydra's plugin scan reloads the module
            axes[key] = list(spec.options)
        elif spec.integer and spec.lower is not None and spec.upper is not None:
            axes[key] = list(range(int(spec.lower), int(spec.upper) + 1))
        else:
            return None
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def applicable(
    params: dict[str, Any], overrides: list[str], space_overrides: list[str]
) -> list[str]:
    """The sweep overrides (e.g. layer-window bounds for a deeper model) whose key is a
    dimension of this method's space and not fixed by the run's own `overrides`; the
    others would add dimensions it does not have."""
    fixed = {o.split("=", 1)[0] for o in overrides}
    return [
        o
        for o in space_overrides
        if o.split("=", 1)[0] in params and o.split("=", 1)[0] not in fixed
    ]


def read_trials(sweep_dir: Path) -> list[dict[str, Any]]:
    """A tuning's trials: the sweeper's trials.jsonl, or grid.jsonl for a grid."""
    log = next((p for p in (sweep_dir / GRID_LOG, sweep_dir / "trials.jsonl") if p.is_file()), None)
    if log is None:
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def check_dev_only(sweep_dir: Path) -> set[str]:
    """Every job of a tuning sweep ran on the validation split: its config and its
    metrics.json say ``split=dev`` and no test evaluation exists. Returns the user ids
    the jobs answered (from their ``users/`` dirs)."""
    if list(sweep_dir.glob("final-trial*")):
        raise SystemExit(f"reproduce: {sweep_dir} holds a test evaluation; tuning must not")
    users: set[str] = set()
    for trial in read_trials(sweep_dir):
        # Every job lives in the sweep dir (`<sweep dir>/<trial>`): found there, so a
        # results folder checked out or copied elsewhere still verifies.
        job = sweep_dir / Path(trial["job_dir"]).name
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        finished = metrics_file(job).is_file()
        split = read_run_file(metrics_file(job))["split"] if finished else None
        if config.get("split") != TUNING_SPLIT or split not in (None, TUNING_SPLIT):
            raise SystemExit(f"reproduce: tuning job {job} ran on split {split or config['split']}")
        users |= {result["user_id"] for result in user_results(job)}
    return users


def run_sweep(method: str, experiment: str, budget: Budget, sweep_dir: Path, args: list[str]):
    """The method's sweep with the budget (resumed if it was cut short); returns the
    best trial (trial, objective, params) from the sweeper's best.yaml."""
    done = [t for t in read_trials(sweep_dir) if t["status"] in ("ok", "failed")]
    if not (sweep_dir / "best.yaml").is_file() or len(done) < budget.trials:
        command = train_command(
            experiment,
            f"+method={method}",
            f"+sweep={TUNING_SWEEPS[method]}",
            f"hydra.sweep.dir={sweep_dir}",
            *args,
            *budget.overrides(),
            multirun=True,
        )
        _record_wall(sweep_dir, run(command, sweep_dir.parents[2] / "logs" / f"tune-{method}.log"))
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    if "params" not in best:
        raise SystemExit(f"{sweep_dir / 'best.yaml'}: no `params:`; re-run the tuning")
    return best


def run_grid(
    method: str,
    experiment: str,
    budget: Budget,
    sweep_dir: Path,
    args: list[str],
    points: list[dict[str, Any]],
):
    """Every configuration once (a space no larger than the budget), as one Hydra
    multirun on the dev users; logs them to grid.jsonl and returns the best (the first
    of equal ones, in grid order)."""
    from hydra_plugins.milp_sweeper._overrides import format_value

    log = sweep_dir / GRID_LOG
    if not log.is_file():
        axes = {k: [p[k] for p in points] for k in points[0]}
        grid = [
            f"{k}={','.join(format_value(v) for v in dict.fromkeys(vs))}" for k, vs in axes.items()
        ]
        dev = [o for o in budget.overrides() if not o.startswith("hydra.sweeper.")]
        command = train_command(
            experiment,
            f"+method={method}",
            "compare_without_memory=false",
            f"hydra.sweep.dir={sweep_dir}",
            *args,
            *dev,
            *grid,
            multirun=True,
        )
        _record_wall(sweep_dir, run(command, sweep_dir.parents[2] / "logs" / f"tune-{method}.log"))
        trials = []
        for number in range(len(points)):
            job = sweep_dir / str(number)
            overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
            chosen = {o.split("=", 1)[0]: yaml.safe_load(o.split("=", 1)[1]) for o in overrides}
            metrics = read_run_file(metrics_file(job))
            trials.append(
                {
                    "trial": number,
                    "status": "ok",
                    "objective": metrics["objective"],
                    "duration_s": metrics["seconds"],
                    "params": {k: chosen[k] for k in points[0]},
                    "job_dir": str(job),
                }
            )
        atomic_write_text(log, "".join(json.dumps(t) + "\n" for t in trials))
    trials = read_trials(sweep_dir)
    sign = -1 if lower_is_better(budget.objective) else 1  # the first of equal ones wins
    best = max(trials, key=lambda t: (sign * t["objective"], -t["trial"]))
    return {"trial": best["trial"], "objective": best["objective"], "params": best["params"]}


def _record_wall(sweep_dir: Path, seconds: float) -> None:
    atomic_write_text(sweep_dir / "reproduce_tuning.json", json.dumps({"wall_seconds": seconds}))


def tune_method(
    method: str,
    *,
    experiment: str,
    budget: Budget,
    out: Path,
    data: list[str],
    space_overrides: list[str],
) -> dict[str, Any]:
    """Tune one method on the dev users (or resume it); return its record. A space of at
    most `budget.trials` configurations is tried whole (a grid); any other gets the
    sweeper's `budget.trials` trials."""
    sweep_dir = out / "runs" / "tune" / method
    params, _ = composed_space(experiment, method, data)
    extra = applicable(params, data, space_overrides)
    args = ["logger=none", "callbacks=none", *data, *extra]
    points = grid_points(params, [*data, *extra])
    if points is not None and len(points) <= budget.trials:
        tuner = f"grid ({len(points)} configurations)"
        best = run_grid(method, experiment, budget, sweep_dir, args, points)
    else:
        tuner = f"{budget.optimizer} ({budget.trials} trials)"
        best = run_sweep(method, experiment, budget, sweep_dir, args)
    users = check_dev_only(sweep_dir)
    trials = read_trials(sweep_dir)
    wall_file = sweep_dir / "reproduce_tuning.json"
    return {
        "method": method,
        "sweep": f"sweeps/{TUNING_SWEEPS[method]}.yaml",
        "space": space_as_run(params, data, extra),
        "tuner": tuner,
        "split": TUNING_SPLIT,
        "budget": asdict(budget),
        "trials": len(trials),
        "distinct_configurations": len({json.dumps(t["params"], sort_keys=True) for t in trials}),
        "pruned": sum(1 for t in trials if t.get("pruned")),
        "dev_user_ids": sorted(users),
        "best_trial": best["trial"],
        "objective_name": budget.objective,
        "dev_objective": best["objective"],
        "params": best["params"],
        "settings": settings(best["params"]),
        "wall_seconds": json.loads(wall_file.read_text())["wall_seconds"]
        if wall_file.is_file()
        else None,
        "job_seconds": sum(t.get("duration_s") or 0.0 for t in trials),
        "sweep_dir": str(sweep_dir),
    }


def settings(params: dict[str, Any]) -> list[str]:
    """The chosen settings as Hydra overrides, for the test runs."""
    from hydra_plugins.milp_sweeper._overrides import format_value

    return [f"{k}={format_value(v)}" for k, v in params.items()]


def tune_all(
    methods: list[str],
    *,
    experiment: str,
    budget: Budget,
    out: Path,
    data: list[str],
    space_overrides: list[str] = (),
) -> dict[str, dict[str, Any]]:
    """Tune every method of `methods` that has a space, all before any test run; write
    ``<out>/tuning.json`` and return the records (untuned methods: their reason)."""
    records: dict[str, dict[str, Any]] = {}
    for method in methods:
        if method in TUNING_SWEEPS:
            records[method] = tune_method(
                method,
                experiment=experiment,
                budget=budget,
                out=out,
                data=data,
                space_overrides=list(space_overrides),
            )
        else:
            records[method] = {"method": method, "not_tuned": NOT_TUNED[method]}
    atomic_write_text(out / "tuning.json", json.dumps(records, indent=1, default=str))
    return records
