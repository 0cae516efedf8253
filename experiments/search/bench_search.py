"""Sample efficiency of the search: exhaustive grid vs. RandomSearch vs. BO (`make bench-search`).

1. Enumerate a small memory-injection space with real milp runs on a few validation users
   of the embedded default: rank {1,2,4,8} x layers {all, top_half, bottom_half,
   every_other} x num_loras {1,2} = 32 configurations, one Hydra multirun
   (``multirun/bench_search/grid-<hash>``). Each configuration's objective (dev ROUGE-L)
   is cached in ``experiments/search/results/bench_grid.json``, so a re-run is instant
   (and a killed grid resumes: finished users are skipped).
2. Run nevergrad's ``RandomSearch`` and ``BO`` over the same space as lookups into that
   table, through the sweeper plugin's own parametrization code (``nevergrad_parameter``),
   for the same seeds; the grid itself in Hydra's enumeration order.
3. Print best-so-far vs. trials for each method and the number of trials each needs to
   reach 95% (also 99% and 100%) of the grid optimum; save the curves as a PNG.

Outputs (``experiments/search/results/``): ``bench_grid.json`` (the table),
``bench_search.txt`` (the printed report), ``bench_search.png`` (the plot).

    python experiments/search/bench_search.py                  # grid (cached) + search
    python experiments/search/bench_search.py --seeds 5 --budget 16
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from hydra_plugins.milp_sweeper._search_space import ChoiceParam, ScalarParam, nevergrad_parameter

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"

#: The enumerated space: override key -> values (Hydra's grid order: last key fastest).
SPACE: dict[str, list[Any]] = {
    "memory.rank": [1, 2, 4, 8],
    "memory.layers": ["all", "top_half", "bottom_half", "every_other"],
    "memory.num_loras": [1, 2],
}
#: Every grid job: a few dev users with short histories, few epochs, no extras (~20 s each
#: on 2 shared cores, ~10 min for the grid).
SETTINGS = [
    "+experiment=lamp",
    "split=dev",
    "data.users.max_users=8",
    "data.users.max_history=12",
    "trainer.max_epochs=4",
    "compare_without_memory=false",
    "logger=none",
    "callbacks=none",
    "trainer.enable_progress_bar=false",
]
#: How the optimizers see the space (the sweeper's specs): rank as an ordinal exponent
#: (rank = 2**x), layers as a categorical choice, num_loras as an integer.
SPECS = {
    "memory.rank": ScalarParam("memory.rank", lower=0, upper=3, integer=True),
    "memory.layers": ChoiceParam("memory.layers", tuple(SPACE["memory.layers"])),
    "memory.num_loras": ScalarParam("memory.num_loras", lower=1, upper=2, integer=True),
}
TARGETS = (0.95, 0.99, 1.0)
METHODS = ("grid", "RandomSearch", "BO")
DISTINCT = " (distinct)"

Config = tuple[Any, ...]


# ---- 1. the grid, with real milp runs -------------------------------------------------


def grid_configs() -> list[Config]:
    """All configurations in Hydra's basic-sweeper order (the last key varies fastest)."""
    return list(itertools.product(*SPACE.values()))


def settings_hash(settings: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps([list(settings), SPACE]).encode()).hexdigest()[:8]


def run_grid(settings: Sequence[str], sweep_dir: Path) -> float:
    """The whole grid as one Hydra multirun (jobs share one process); returns seconds."""
    sweeps = [f"{key}={','.join(str(v) for v in values)}" for key, values in SPACE.items()]
    command = [sys.executable, "-m", "milp.train", "-m", *settings, *sweeps]
    command.append(f"hydra.sweep.dir={sweep_dir}")
    print("bench: $", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    # One thread: the tiny model gains little from more, and on shared cores
    # oversubscribed OpenMP threads make every job several times slower.
    env = os.environ | {
        "WANDB_SILENT": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1"),
    }
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def read_grid(sweep_dir: Path) -> dict[Config, dict[str, Any]]:
    """Objective and metrics of every finished grid job, by configuration."""
    table: dict[Config, dict[str, Any]] = {}
    for job in sweep_dir.iterdir():
        if not (job.name.isdigit() and (job / "metrics.json").is_file()):
            continue
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        given = dict(o.split("=", 1) for o in overrides)
        config = tuple(
            type(values[0])(given[key]) if not isinstance(values[0], str) else given[key]
            for key, values in SPACE.items()
        )
        metrics = json.loads((job / "metrics.json").read_text())
        table[config] = {
            "objective": metrics["objective"],
            "rouge1": metrics["memory"]["rouge1"],
            "persona_f1": metrics["memory"]["persona_f1"],
            "seconds": metrics["seconds"],
            "job": int(job.name),
        }
    return table


def load_or_build_grid(cache: Path, settings: Sequence[str]) -> dict[str, Any]:
    """The grid table from the cache, or built with real runs (and cached)."""
    key = settings_hash(settings)
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("hash") == key and len(cached["configs"]) == len(grid_configs()):
            print(f"bench: grid table from {cache.relative_to(ROOT)} (cached)", flush=True)
            return cached
    sweep_dir = ROOT / "multirun" / "bench_search" / f"grid-{key}"
    seconds = run_grid(settings, sweep_dir)
    table = read_grid(sweep_dir)
    missing = [c for c in grid_configs() if c not in table]
    if missing:
        raise SystemExit(f"bench: {len(missing)} grid jobs have no metrics, e.g. {missing[0]}")
    built = {
        "hash": key,
        "space": SPACE,
        "settings": list(settings),
        "sweep_dir": str(sweep_dir.relative_to(ROOT)),
        "wall_seconds": round(seconds, 1),
        "configs": [dict(zip(SPACE, c, strict=True), **table[c]) for c in grid_configs()],
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(built, indent=1) + "\n")
    return built


# ---- 2. the searches, as lookups into the grid -----------------------------------------


def lookup_fn(grid: dict[str, Any]) -> Callable[[dict[str, Any]], float]:
    """Objective of a point asked by nevergrad (rank given as its exponent)."""
    table = {tuple(c[k] for k in SPACE): c["objective"] for c in grid["configs"]}

    def objective(point: dict[str, Any]) -> float:
        config = (2 ** int(point["memory.rank"]), point["memory.layers"], point["memory.num_loras"])
        return table[config]

    return objective


def one_blas_thread() -> contextlib.AbstractContextManager:
    """BO's small GP fits run ~3x faster with one BLAS thread than with oversubscribed
    ones on shared cores (measured: 12.7 s vs 39.2 s for 32 BO trials)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


def run_optimizer(
    name: str, seed: int, budget: int, objective: Callable[[dict[str, Any]], float]
) -> list[float]:
    """Objectives of ``budget`` sequential trials of a seeded nevergrad optimizer."""
    import nevergrad as ng

    parametrization = ng.p.Dict(**{k: nevergrad_parameter(s) for k, s in SPECS.items()})
    parametrization.random_state = np.random.RandomState(seed)
    with warnings.catch_warnings(), one_blas_thread():
        warnings.simplefilter("ignore")
        optimizer = ng.optimizers.registry[name](parametrization=parametrization, budget=budget)
        values = []
        for _ in range(budget):
            candidate = optimizer.ask()
            value = objective(candidate.value)
            optimizer.tell(candidate, -value)  # nevergrad minimizes
            values.append(value)
    return values


def first_occurrences(points: Sequence[tuple], values: Sequence[float]) -> list[float]:
    """The values of the first trial of each distinct configuration, in trial order."""
    seen: set[tuple] = set()
    kept = []
    for point, value in zip(points, values, strict=True):
        if point not in seen:
            seen.add(point)
            kept.append(value)
    return kept


def best_so_far(values: Sequence[float]) -> list[float]:
    return list(itertools.accumulate(values, max))


def trials_to_reach(curve: Sequence[float], target: float) -> int | None:
    """First trial (1-based) whose best-so-far reaches ``target``, or None."""
    return next((i + 1 for i, v in enumerate(curve) if v >= target - 1e-12), None)


# ---- 3. report and plot ----------------------------------------------------------------


def summarize_reach(reach: Sequence[int | None], budget: int) -> str:
    """'median (mean; n/N reached)' over seeds; misses count as budget+1 in the median."""
    hits = [r for r in reach if r is not None]
    filled = [r if r is not None else budget + 1 for r in reach]
    median = statistics.median(filled)
    median_text = f"{median:g}" if median <= budget else f">{budget}"
    mean_text = f"{statistics.mean(hits):.1f}" if hits else "-"
    return f"{median_text} ({mean_text}; {len(hits)}/{len(reach)})"


def report(
    grid: dict[str, Any], curves: dict[str, list[list[float]]], budget: int, seeds: int
) -> str:
    configs = grid["configs"]
    optimum = max(c["objective"] for c in configs)
    best = max(configs, key=lambda c: c["objective"])
    values = sorted((c["objective"] for c in configs), reverse=True)
    lines = [
        f"Grid: {len(configs)} configurations ({' x '.join(str(len(v)) for v in SPACE.values())}"
        f" of {', '.join(SPACE)}), real milp runs, settings: {' '.join(grid['settings'])}",
        f"Grid wall time: {grid.get('wall_seconds', '?')} s; sum of job times "
        f"{sum(c['seconds'] for c in configs):.0f} s",
        f"Grid optimum: dev ROUGE-L {optimum:.4f} at "
        + ", ".join(f"{k}={best[k]}" for k in SPACE)
        + f"; median config {statistics.median(values):.4f}, worst {values[-1]:.4f}",
        "Configurations within 95% / 99% / 100% of the optimum: "
        + " / ".join(str(sum(v >= t * optimum - 1e-12 for v in values)) for t in TARGETS),
        f"RandomSearch and BO: {seeds} seeds (0..{seeds - 1}), budget {budget} each; "
        "grid: Hydra's enumeration order (deterministic).",
        "",
        "Best-so-far dev ROUGE-L vs. trials (RandomSearch, BO: mean over seeds [min..max])",
    ]
    checkpoints = [n for n in (1, 2, 4, 6, 8, 10, 12, 16, 20, 24, 32) if n <= budget]
    header = f"{'trials':>6}  " + "  ".join(f"{m:>22}" for m in METHODS)
    lines += [header, "-" * len(header)]
    for n in checkpoints:
        cells = []
        for method in METHODS:
            at = [curve[n - 1] for curve in curves[method] if len(curve) >= n]
            if not at:
                cells.append(f"{'':>22}")
            elif len(at) == 1:
                cells.append(f"{at[0]:>22.4f}")
            else:
                cells.append(f"{statistics.mean(at):.4f} [{min(at):.4f}..{max(at):.4f}]".rjust(22))
        lines.append(f"{n:>6}  " + "  ".join(cells))
    lines += [
        "",
        "Trials to reach a fraction of the grid optimum: median (mean of the seeds that "
        "reached it; seeds that reached it within the budget)",
    ]
    header = f"{'target':>8}  " + "  ".join(f"{m:>20}" for m in METHODS)
    lines += [header, "-" * len(header)]
    for target in TARGETS:
        cells = []
        for method in METHODS:
            reach = [trials_to_reach(curve, target * optimum) for curve in curves[method]]
            if method == "grid":
                cells.append(f"{reach[0] if reach[0] else '-':>20}")
            else:
                cells.append(f"{summarize_reach(reach, budget):>20}")
        lines.append(f"{f'{target:.0%}':>8}  " + "  ".join(cells))
    lines += [
        "",
        "The same, counting only distinct configurations as trials (a sweeper that reused a "
        "repeated point's result would pay this):",
        f"{'target':>8}  {'':>20}  " + "  ".join(f"{m:>20}" for m in ("RandomSearch", "BO")),
    ]
    for target in TARGETS:
        cells = []
        for method in ("RandomSearch", "BO"):
            reach = [trials_to_reach(c, target * optimum) for c in curves[method + DISTINCT]]
            cells.append(f"{summarize_reach(reach, budget):>20}")
        lines.append(f"{f'{target:.0%}':>8}  {'':>20}  " + "  ".join(cells))
    unique = {
        m: statistics.mean(len(set(map(tuple, c))) for c in curves[f"{m}:points"])
        for m in ("RandomSearch", "BO")
    }
    lines += [
        "",
        "Distinct configurations among the trials (mean over seeds; a repeat costs a real "
        "trial in a sweep): " + ", ".join(f"{m} {u:.1f}/{budget}" for m, u in unique.items()),
    ]
    return "\n".join(lines) + "\n"


def plot(
    grid: dict[str, Any], curves: dict[str, list[list[float]]], budget: int, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimum = max(c["objective"] for c in grid["configs"])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = {"grid": "tab:gray", "RandomSearch": "tab:blue", "BO": "tab:red"}
    for method in METHODS:
        data = np.array([c[:budget] for c in curves[method]])
        x = np.arange(1, data.shape[1] + 1)
        label = method if method == "grid" else f"{method} (mean of {len(data)} seeds, min-max)"
        ax.plot(x, data.mean(axis=0), label=label, color=colors[method], lw=2)
        if len(data) > 1:
            ax.fill_between(x, data.min(axis=0), data.max(axis=0), color=colors[method], alpha=0.15)
    for method in ("RandomSearch", "BO"):
        distinct = curves[method + DISTINCT]
        length = min(budget, *(len(c) for c in distinct))
        data = np.array([c[:length] for c in distinct])
        ax.plot(
            np.arange(1, length + 1),
            data.mean(axis=0),
            color=colors[method],
            lw=1.2,
            ls="--",
            label=f"{method}, distinct configurations only (mean)",
        )
    ax.axhline(optimum, color="black", lw=1, ls="--", label=f"grid optimum {optimum:.4f}")
    ax.axhline(0.95 * optimum, color="black", lw=1, ls=":", label="95% of the optimum")
    ax.set_xlabel("trials (configurations evaluated)")
    ax.set_ylabel("best dev ROUGE-L so far")
    ax.set_title(f"Search sample efficiency on a {len(grid['configs'])}-configuration grid")
    ax.set_xlim(1, budget)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="repetitions (seeds 0..N-1)")
    parser.add_argument("--budget", type=int, default=len(grid_configs()), help="trials each")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the grid jobs")
    args = parser.parse_args(argv)

    grid = load_or_build_grid(args.out / "bench_grid.json", [*SETTINGS, *args.overrides])
    objective = lookup_fn(grid)
    grid_values = [c["objective"] for c in grid["configs"]]
    curves: dict[str, list[list[float]]] = {"grid": [best_so_far(grid_values)[: args.budget]]}
    runs: list[dict[str, Any]] = []
    for method in ("RandomSearch", "BO"):
        curves[method], curves[f"{method}:points"] = [], []
        started = time.perf_counter()
        for seed in range(args.seeds):
            points: list[tuple] = []

            def recording(point: dict[str, Any], points: list = points) -> float:
                points.append(tuple(point[k] for k in SPACE))
                return objective(point)

            values = run_optimizer(method, seed, args.budget, recording)
            curves[method].append(best_so_far(values))
            curves[f"{method}:points"].append(points)
            runs.append({"method": method, "seed": seed, "points": points, "values": values})
        print(f"bench: {method}: {time.perf_counter() - started:.1f} s", flush=True)
        # What a sweeper that reuses a repeated point's result (instead of re-running it)
        # would pay: only the first occurrence of each configuration counts as a trial.
        curves[f"{method}{DISTINCT}"] = [
            best_so_far(first_occurrences(points, run["values"]))
            for points, run in zip(
                curves[f"{method}:points"], [r for r in runs if r["method"] == method], strict=True
            )
        ]

    text = report(grid, curves, args.budget, args.seeds)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_search.txt").write_text(text)
    (args.out / "bench_search_runs.json").write_text(json.dumps(runs) + "\n")
    plot(grid, curves, args.budget, args.out / "bench_search.png")
    print(f"written: {args.out / 'bench_search.txt'}, {args.out / 'bench_search.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
