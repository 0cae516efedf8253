"""Ablations around the best configuration found by the BO search (`make ablate`).

For each dimension (layers, rank, number of LoRAs, target modules) this runs the plain
Hydra multirun ``python -m milp.train -m +experiment=lamp +sweep=ablate_<dim> <best>``:
``sweeps/ablate_<dim>.yaml`` varies that one dimension on the validation users, and
``<best>`` fixes every other searched setting at the best trial of
``multirun/milp_bo/best.yaml`` (or at the defaults of ``conf/`` if there is no search
result yet, which it says). One Markdown table per dimension (value x ROUGE-1 / ROUGE-L /
persona-F1, dev users) is written to ``experiments/search/results/ablate_<dim>.md`` from
each job's ``metrics.json``, and the same rows as data to ``ablate_<dim>.json``.

Each ablation runs in ``multirun/ablate_<dim>/<hash of its overrides>``, so running this
again with the same best configuration resumes (finished users and jobs are skipped) and a
new best gets fresh directories.

    python experiments/search/ablate.py                         # all four dimensions
    python experiments/search/ablate.py --only rank,layers data.users.max_users=4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from hydra_plugins.milp_sweeper._overrides import format_value
from milp.errors import run_command
from milp.run.store import metrics_file, read_run_file

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"

#: dimension -> (the key its sweep varies, keys of the best config it replaces)
DIMENSIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "layers": ("memory.layers", ("memory.layers", "memory.window_start", "memory.window_length")),
    "rank": ("memory.rank", ("memory.rank",)),
    "num_loras": ("memory.num_loras", ("memory.num_loras",)),
    "target_modules": ("memory.target_modules", ("memory.target_modules",)),
}
#: Keys of best.yaml that describe the search itself, not the configuration found.
NOT_CARRIED = ("+sweep", "sweep", "++sweep", "+experiment", "experiment", "split")
METRICS = (("rouge1", "ROUGE-1"), ("rougeL", "ROUGE-L"), ("persona_f1", "persona-F1"))


def best_overrides(best_file: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The best trial's settings (key -> value) and the best.yaml content, if any."""
    if not best_file.is_file():
        print(
            f"ablate: no {best_file} (run `make sweep` first); ablating around the defaults "
            "of conf/ instead",
            flush=True,
        )
        return {}, None
    best = yaml.safe_load(best_file.read_text())
    settings = {
        str(k): v
        for k, v in (best.get("overrides") or {}).items()
        if str(k) not in NOT_CARRIED and not str(k).startswith(("hydra.", "~"))
    }
    print(
        f"ablate: fixing the other dimensions at trial {best.get('trial')} of {best_file} "
        f"(dev objective {best.get('objective')})",
        flush=True,
    )
    return settings, best


def ablation_overrides(dimension: str, settings: dict[str, Any], extra: list[str]) -> list[str]:
    """The best settings minus the ablated dimension and the keys ``extra`` sets, then
    ``extra`` (the user's overrides win)."""
    _, replaced = DIMENSIONS[dimension]
    dropped = set(replaced) | {o.split("=", 1)[0].lstrip("+~") for o in extra}
    kept = [f"{k}={format_value(v)}" for k, v in settings.items() if k.lstrip("+") not in dropped]
    return kept + list(extra)


def sweep_dir(dimension: str, overrides: list[str], jobs: Path = ROOT / "multirun") -> Path:
    """``<jobs>/ablate_<dim>/<hash>``: same overrides, same directory (resumable)."""
    digest = hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:8]
    return jobs / f"ablate_{dimension}" / digest


def group_overrides(dimension: str, overrides: list[str]) -> list[str]:
    """``logger.group=ablate_<dim>`` (the W&B runs of one ablation, grouped), unless the
    overrides pick another logger (csv and none have no ``group``) or set the group."""
    keys = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[-1] for o in overrides}
    if keys.get("logger", "wandb") != "wandb" or "logger.group" in keys:
        return []
    return [f"logger.group=ablate_{dimension}"]


def run_ablation(dimension: str, overrides: list[str], directory: Path) -> None:
    """The ablation multirun, in a subprocess (output streamed)."""
    command = [
        sys.executable,
        "-m",
        "milp.train",
        "-m",
        "+experiment=lamp",
        f"+sweep=ablate_{dimension}",
        *overrides,
        *group_overrides(dimension, overrides),
        f"hydra.sweep.dir={directory}",
    ]
    print("ablate: $", " ".join(command[1:]), flush=True)
    env = os.environ | {"WANDB_SILENT": "true"}
    subprocess.run(command, cwd=ROOT, env=env, check=True)


def collect(dimension: str, directory: Path) -> list[dict[str, Any]]:
    """One row per job of the ablation: the value of the dimension and its metrics."""
    key, _ = DIMENSIONS[dimension]
    rows = []
    jobs = sorted((p for p in directory.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    for job in jobs:
        if not metrics_file(job).is_file():
            continue
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        value = next(o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key)
        metrics = read_run_file(metrics_file(job))
        where = job.relative_to(ROOT) if job.is_relative_to(ROOT) else job
        rows.append({"value": value, "job_dir": str(where), **metrics})
    return rows


def table_json(dimension: str, rows: list[dict[str, Any]], overrides: list[str]) -> dict:
    """The table as data (``ablate_<dim>.json``): one row per value, its dev metrics."""
    key, _ = DIMENSIONS[dimension]
    return {
        "dimension": dimension,
        "key": key,
        "overrides": overrides,
        "rows": [
            {
                "value": row["value"],
                "memory_enabled": row.get("memory_enabled", True),
                **{m: (row["memory"] or {}).get(m) for m, _ in METRICS},
                "users": (row["memory"] or {}).get("users", 0),
                "examples": (row["memory"] or {}).get("examples", 0),
                "job_dir": row["job_dir"],
            }
            for row in rows
        ],
    }


def markdown_table(
    dimension: str, rows: list[dict[str, Any]], overrides: list[str], best: dict | None
) -> str:
    """The ablation as Markdown: fixed settings, then value x metrics (best ROUGE-L bold)."""
    key, _ = DIMENSIONS[dimension]
    scored = [r for r in rows if r.get("memory")]
    top = max((r["memory"]["rougeL"] for r in scored), default=None)
    source = (
        f"the best BO trial ({best.get('trial')}, dev objective {best.get('objective'):.4f})"
        if best
        else "the defaults (no BO result was found)"
    )
    lines = [
        f"## Ablation: {dimension} (`{key}`)",
        "",
        f"Validation users (`split=dev`); every other setting fixed at {source}:",
        f"`{' '.join(overrides) or '(none)'}`",
        "",
        f"| {key} | " + " | ".join(name for _, name in METRICS) + " | users | examples |",
        "|---|" + "---:|" * (len(METRICS) + 2),
    ]
    for row in rows:
        memory = row.get("memory")
        if memory is None:
            lines.append(f"| {row['value']} | " + " | ".join("-" for _ in METRICS) + " | 0 | 0 |")
            continue
        cells = []
        for metric, _ in METRICS:
            text = f"{memory[metric]:.4f}"
            cells.append(f"**{text}**" if metric == "rougeL" and memory[metric] == top else text)
        value = row["value"] + (" (no memory)" if not row.get("memory_enabled", True) else "")
        lines.append(
            f"| {value} | " + " | ".join(cells) + f" | {memory['users']} | {memory['examples']} |"
        )
    if best:
        _, replaced = DIMENSIONS[dimension]
        own = {k: v for k, v in (best.get("overrides") or {}).items() if k in replaced}
        if own and set(own) != {key}:  # e.g. the best's layer window: not a row above
            lines += [
                "",
                "The best trial's own setting of this dimension, for reference: "
                + ", ".join(f"`{k}={v}`" for k, v in own.items())
                + f" (dev objective {best.get('objective'):.4f} in the search).",
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--best", type=Path, default=ROOT / "multirun" / "milp_bo" / "best.yaml", help="best.yaml"
    )
    parser.add_argument("--only", default=",".join(DIMENSIONS), help="comma-separated dimensions")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the tables go")
    parser.add_argument(
        "--jobs", type=Path, default=ROOT / "multirun", help="where the ablation jobs run"
    )
    parser.add_argument(
        "--no-run", action="store_true", help="only rebuild the tables from existing jobs"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = parser.parse_args(argv)
    dimensions = [d.strip() for d in args.only.split(",") if d.strip()]
    unknown = [d for d in dimensions if d not in DIMENSIONS]
    if unknown:
        parser.error(
            f"--only: unknown dimension {unknown[0]!r}; choose from {', '.join(DIMENSIONS)}"
        )

    settings, best = best_overrides(args.best)
    args.out.mkdir(parents=True, exist_ok=True)
    for dimension in dimensions:
        overrides = ablation_overrides(dimension, settings, args.overrides)
        directory = sweep_dir(dimension, overrides, args.jobs.resolve())
        if not args.no_run:
            run_ablation(dimension, overrides, directory)
        elif not directory.is_dir():
            print(f"ablate: --no-run: no jobs in {directory}; skipping {dimension}")
            continue
        rows = collect(dimension, directory)
        table = markdown_table(dimension, rows, overrides, best)
        out = args.out / f"ablate_{dimension}.md"
        shown = directory.relative_to(ROOT) if directory.is_relative_to(ROOT) else directory
        out.write_text(table + f"\nJobs: `{shown}`\n")
        data = table_json(dimension, rows, overrides)
        (args.out / f"ablate_{dimension}.json").write_text(json.dumps(data, indent=1) + "\n")
        print(f"\n{table}\nwritten: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))  # a broken run file: one line naming it
