"""Fair tuning for `make reproduce`: every method gets the same search budget on the
validation users, and all choices are made before any test user is answered.

Each tuned method has its space in a sweep file (`TUNING_SWEEPS`): retrieval k for
retrieval-in-prompt, learning rate and epochs for the OPPU-style PEFT, MiLP's memory
search (sweeps/milp_bo.yaml), and MiLP's space plus k or plus the sparse-history
repetition for the two MiLP variants. One `python -m milp.train -m` per method runs it
through milp's sweeper with the same trial budget, optimizer, seed, pruning rule and dev
users (`Budget`), on ``split=dev`` and without the sweeper's own test evaluation
(``final_overrides=[]``); the best trial by the dev objective gives the method's settings
(`best.yaml`'s ``params``), which the test runs then use. `check_dev_only` verifies, from
the files the trials wrote, that no tuning job ran on another split.

Writes ``<out>/runs/tune/<method>/`` (the sweep: trials.jsonl, best.yaml, one dir per
trial) and ``<out>/tuning.json`` (per method: space, budget, split, dev users, trials,
distinct configurations, best trial, dev objective, chosen settings, wall time).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from jobs import ROOT, run, train_command

from milp.files import atomic_write_text

#: method -> the sweep file (sweeps/<name>.yaml) that holds its tuning space.
TUNING_SWEEPS = {
    "rag": "tune_rag",
    "oppu": "tune_oppu",
    "milp": "milp_bo",
    "milp_rag": "tune_milp_rag",
    "milp_sparse": "tune_milp_sparse",
}
#: Methods that are not tuned, and why.
NOT_TUNED = {
    "zero_shot": "no settings to tune",
    "milp_default": "the default memory configuration, untuned on purpose (the search's reference)",
}
TUNING_SPLIT = "dev"


@dataclass(frozen=True)
class Budget:
    """What every tuned method gets: the same trials, optimizer, seed, pruning, users."""

    trials: int
    optimizer: str = "BO"
    seed: int = 0
    pruning: bool = True
    dev_users: int | None = None  # the first N validation users per trial; None: all

    def overrides(self) -> list[str]:
        return [
            f"split={TUNING_SPLIT}",
            f"hydra.sweeper.optim.budget={self.trials}",
            f"hydra.sweeper.optim.optimizer={self.optimizer}",
            f"hydra.sweeper.optim.seed={self.seed}",
            f"hydra.sweeper.pruning.enabled={str(self.pruning).lower()}",
            "hydra.sweeper.final_overrides=[]",
            "hydra.sweeper.wandb.enabled=false",
            *([f"data.users.max_users={self.dev_users}"] if self.dev_users else []),
        ]


def composed_space(
    experiment: str, method: str, overrides: list[str]
) -> tuple[dict[str, Any], str]:
    """The method's tuning space as its sweep file composes (``hydra.sweeper.params``;
    a dimension that `overrides` sets to a plain value is fixed at it, as the sweeper
    does) and the objective it is tuned for."""
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
    space = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    for override in overrides:
        key, _, value = override.partition("=")
        if key in space:
            space[key] = f"fixed: {value}"
    return space, str(cfg.objective)


def applicable(space: dict[str, Any], space_overrides: list[str]) -> list[str]:
    """The sweep overrides (e.g. layer-window bounds for a deeper model) whose key is a
    dimension of this method's space (and not fixed by the run's own overrides); the
    others would add dimensions it does not have."""
    return [
        o
        for o in space_overrides
        if not str(space.get(o.split("=", 1)[0], "fixed:")).startswith("fixed:")
    ]


def read_trials(sweep_dir: Path) -> list[dict[str, Any]]:
    log = sweep_dir / "trials.jsonl"
    if not log.is_file():
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
        job = Path(trial["job_dir"])
        job = job if job.is_absolute() else ROOT / job
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        metrics_file = job / "metrics.json"
        split = json.loads(metrics_file.read_text())["split"] if metrics_file.is_file() else None
        if config.get("split") != TUNING_SPLIT or split not in (None, TUNING_SPLIT):
            raise SystemExit(f"reproduce: tuning job {job} ran on split {split or config['split']}")
        users |= {json.loads(p.read_text())["user_id"] for p in (job / "users").glob("*.json")}
    return users


def tune_method(
    method: str,
    *,
    experiment: str,
    budget: Budget,
    out: Path,
    data: list[str],
    space_overrides: list[str],
) -> dict[str, Any]:
    """Run (or resume) one method's tuning sweep on the dev users; return its record."""
    sweep_dir = out / "runs" / "tune" / method
    space, objective = composed_space(experiment, method, data)
    extra = applicable(space, space_overrides)
    record_file = sweep_dir / "reproduce_tuning.json"
    done = len([t for t in read_trials(sweep_dir) if t["status"] in ("ok", "failed")])
    if not (sweep_dir / "best.yaml").is_file() or done < budget.trials:
        seconds = run(
            train_command(
                experiment,
                f"+method={method}",
                f"+sweep={TUNING_SWEEPS[method]}",
                f"hydra.sweep.dir={sweep_dir}",
                "logger=none",
                "callbacks=none",
                *data,
                *extra,
                *budget.overrides(),
                multirun=True,
            ),
            out / "logs" / f"tune-{method}.log",
        )
        atomic_write_text(record_file, json.dumps({"wall_seconds": seconds}))
    users = check_dev_only(sweep_dir)
    trials = read_trials(sweep_dir)
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    if "params" not in best:
        raise SystemExit(f"{sweep_dir / 'best.yaml'}: no `params:`; re-run the tuning")
    distinct = {json.dumps(t["params"], sort_keys=True) for t in trials}
    for override in extra:  # the space as run: the sweep file's, then the command line's
        key, value = override.split("=", 1)
        space[key] = value
    return {
        "method": method,
        "sweep": f"sweeps/{TUNING_SWEEPS[method]}.yaml",
        "space": space,
        "split": TUNING_SPLIT,
        "budget": asdict(budget),
        "trials": len(trials),
        "distinct_configurations": len(distinct),
        "pruned": sum(1 for t in trials if t.get("pruned")),
        "dev_user_ids": sorted(users),
        "best_trial": best["trial"],
        "objective_name": objective,
        "dev_objective": best["objective"],
        "params": best["params"],
        "settings": settings(best["params"]),
        "wall_seconds": json.loads(record_file.read_text())["wall_seconds"]
        if record_file.is_file()
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
