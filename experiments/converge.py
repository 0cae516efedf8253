"""Does memory converge on the real model? Memory settings tried on dev users only.

Each setting is one `python -m milp.train +experiment=<source> split=dev` run with
attribution on: every dev user's memory trained on their history, then every dev
user's held-out golds scored under no memory, their own memory, every other dev user's
memory and a task memory (one memory trained the same way on the train split's users,
pooled). The table reports, per setting, the mean held-out gold NLL of each, how many
users' own memory beats no memory and beats the task memory, owner top-1 (chance 1/N),
ROUGE-L with and without memory, and the run's wall time. The test split is never
read: choose a setting here, then run it on the test users.

    python experiments/converge.py --source chitchat                 # the default grid
    python experiments/converge.py --source shakespeare --settings experiment,epochs6
    python experiments/converge.py --setting "mine=trainer.max_epochs=4 optim.lr=2e-3"

Runs go under outputs/converge/<source>/<setting>/ and are resumed (finished users are
skipped); the table is written to experiments/results/converge_<source>.md, where rows
of settings not run this time are kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jobs import ROOT, run, train_command

from milp.errors import run_command
from milp.run.files import atomic_write_text
from milp.run.store import attribution_files, metrics_file, read_run_file

# name -> overrides of +experiment=<source>; each states the memory's start and rate, so a
# row means the same whatever the experiment's own setting is.
FRESH = ["memory.init=fresh", "optim.lr=1e-3"]
SETTINGS = {
    "experiment": [],
    "history32-epochs2": ["data.users.max_history=32", "trainer.max_epochs=2", *FRESH],
    "epochs6": ["data.users.max_history=32", "trainer.max_epochs=6", *FRESH],
    "history64-epochs4": ["data.users.max_history=64", "trainer.max_epochs=4", *FRESH],
    "history64-epochs2": ["data.users.max_history=64", "trainer.max_epochs=2", *FRESH],
    "epochs6-lr3e-3": [
        "data.users.max_history=32",
        "trainer.max_epochs=6",
        "memory.init=fresh",
        "optim.lr=3e-3",
    ],
    # Each user's memory starts from the task memory (trained first on the train users).
    "task-init": ["memory.init=task", "optim.lr=1e-3", "attribution.task_lr=1e-3"],
    # The same, the users' stage 2 at a lower rate; the task memory (the control) keeps
    # 1e-3, so it is the very memory of the fresh settings.
    "task-init-lr3e-4": ["memory.init=task", "optim.lr=3e-4", "attribution.task_lr=1e-3"],
    # Twice the history per user at the same 32 steps (fresh memory).
    "history128-epochs2": ["data.users.max_history=128", "trainer.max_epochs=2", *FRESH],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="chitchat", help="an experiment: chitchat | shakespeare")
    p.add_argument("--settings", default=",".join(SETTINGS), help="names from SETTINGS")
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        help='an extra setting, "name=override override ..."',
    )
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "converge")
    p.add_argument("--results", type=Path, default=ROOT / "experiments" / "results")
    p.add_argument("--extra", nargs="*", default=[], help="overrides for every setting")
    return p.parse_args(argv)


def chosen_settings(args) -> dict[str, list[str]]:
    settings = {}
    for name in filter(None, args.settings.split(",")):
        if name not in SETTINGS:
            raise SystemExit(f"--settings: unknown setting {name!r} (known: {', '.join(SETTINGS)})")
        settings[name] = SETTINGS[name]
    for spec in args.setting:
        name, sep, overrides = spec.partition("=")
        if not sep or not name:
            raise SystemExit(f'--setting {spec!r}: expected "name=override override ..."')
        settings[name] = overrides.split()
    return settings


def run_setting(source: str, overrides: list[str], run_dir: Path) -> float | None:
    """One dev run (resumed where it stopped); its wall seconds, None if already done."""
    if attribution_files(run_dir)[0].exists() and metrics_file(run_dir).exists():
        return None
    command = train_command(
        source,
        "split=dev",
        "attribution.enabled=true",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        *overrides,
    )
    seconds = run(command, run_dir.with_suffix(".log"))
    (run_dir / "converge_seconds.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def summarize(run_dir: Path) -> dict:
    """The row of one setting from its run's metrics.json and attribution.json."""
    metrics = read_run_file(metrics_file(run_dir))
    summary = read_run_file(attribution_files(run_dir)[0])
    nll = summary["mean_nll"]
    timing = run_dir / "converge_seconds.json"
    return {
        "users": summary["users"],
        "no_memory_nll": nll.get("no memory"),
        "task_memory_nll": nll.get("task memory"),
        "own_nll": nll["own memory"],
        "others_nll": nll["other users' memories"],
        "beats_none": summary.get("own_beats_no_memory"),
        "beats_task": summary.get("own_beats_task_memory"),
        "top1": summary["per_user"]["top1"],
        "chance": summary["chance"],
        "rougeL": metrics["memory"]["rougeL"],
        "rougeL_none": (metrics.get("no_memory") or {}).get("rougeL"),
        "seconds": json.loads(timing.read_text())["seconds"] if timing.exists() else None,
    }


def table_rows(text: str) -> dict[str, str]:
    """The settings' rows of a table written by `table`, by setting name."""
    rows = {}
    for line in text.splitlines():
        cells = line.split("|")
        if len(cells) > 2 and line.startswith("| ") and cells[2].strip().startswith("`"):
            rows[cells[1].strip()] = line
    return rows


def table(
    source: str, settings: dict[str, list[str]], rows: dict[str, dict], earlier: dict[str, str]
) -> str:
    """The markdown table: `earlier` rows (from the file, settings not run now) kept in
    their place, this run's settings replacing or following them."""

    def f(x, spec=".4f"):
        return "-" if x is None else format(x, spec)

    def frac(x):
        return "-" if x is None else f"{x['users']}/{x['of']}"

    lines = [
        f"# Convergence on dev users: +experiment={source} split=dev",
        "",
        "Held-out gold NLL (mean token NLL, nats; lower is better) of each dev user's",
        "queries. Generated by `python experiments/converge.py --source " + source + "`.",
        "",
        "| setting | overrides | no memory | task memory | own memory | others' memories "
        "| own < none | own < task | top-1 (chance) | ROUGE-L memory / none | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    body = dict(earlier)
    for name, r in rows.items():
        wall = "-" if r["seconds"] is None else f"{r['seconds'] / 60:.1f} min"
        body[name] = (
            f"| {name} | `{' '.join(settings[name]) or '(experiment as is)'}` "
            f"| {f(r['no_memory_nll'])} | {f(r['task_memory_nll'])} | {f(r['own_nll'])} "
            f"| {f(r['others_nll'])} | {frac(r['beats_none'])} | {frac(r['beats_task'])} "
            f"| {r['top1']:.2f} ({r['chance']:.2f}) | {f(r['rougeL'])} / {f(r['rougeL_none'])} "
            f"| {wall} |"
        )
    lines += body.values()
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = chosen_settings(args)
    target = args.results / f"converge_{args.source}.md"
    # Settings run before (their run dirs may be gone) keep their rows.
    earlier = table_rows(target.read_text()) if target.exists() else {}
    rows = {}
    for name, overrides in settings.items():
        run_dir = args.out / args.source / name
        run_setting(args.source, [*overrides, *args.extra], run_dir)
        rows[name] = summarize(run_dir)
        text = table(args.source, settings, rows, earlier)
        print(text, flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, text)
    print(f"wrote {target}")


if __name__ == "__main__":
    run_command(main)  # a broken run file: one line naming it
