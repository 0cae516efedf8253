"""Sample efficiency of the search, in user-trainings: BO vs. RandomSearch, with and without
pruning, replayed on a cached grid (`make bench-search`).

1. Enumerate a memory-injection space with real milp runs on a few validation users of the
   embedded default (``SPACE``: window start x length x rank x num_loras x target modules
   x lr, 192 configurations), one Hydra multirun (``multirun/bench_search/grid-<hash>``).
   Every configuration's per-user dev metrics are cached in
   ``experiments/search/results/bench_grid.json``: the benchmark then replays in seconds
   (a killed build resumes: finished users and jobs are skipped). Rebuild it with
   ``python experiments/search/bench_search.py --rebuild``.
2. Replay nevergrad's ``RandomSearch`` and ``BO`` over that space, for ``--seeds`` seeds,
   as the ``milp_nevergrad`` sweeper runs them: the sweeper's own search-space code
   (``make_optimizer``) and tells (``LossBook``), and with pruning milp's own rule
   (``milp.run.prune``) on the running objective in the seeded user order, each trial told
   what the sweeper tells (a stopped trial: the paired estimate). The cost of a trial is
   the users it trained (a stopped trial: the users before its stop).
3. Report, per method, the median user-trainings to reach 95% / 99% of the grid optimum
   and best-so-far vs. user-trainings (table and PNG). The last line is
   ``pruned-BO/BO user-trainings to 99%: N.NNx``.

Outputs (``experiments/search/results/``): ``bench_grid.json`` (the cached grid),
``bench_search.txt`` (the report), ``bench_search.png`` (the plot).

    python experiments/search/bench_search.py                  # cached grid + replays
    python experiments/search/bench_search.py --jobs 2 --seeds 40 --percentile 60
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_grid import SETTINGS, SPACE, load_or_build_grid

from hydra_plugins.milp_sweeper._pruning import completed_curves
from hydra_plugins.milp_sweeper._search_space import (
    ChoiceParam,
    ScalarParam,
    SearchSpace,
    make_optimizer,
)
from hydra_plugins.milp_sweeper._tell import LossBook
from milp.errors import run_command
from milp.evaluation.report import average
from milp.run.prune import PruneRule, seeded_order

RESULTS = Path(__file__).resolve().parent / "results"

#: How the optimizers see the space (the sweeper's specs): ordered values as an integer
#: index (neighbouring indices are similar settings), target modules as a choice.
SPECS = {
    key: ChoiceParam(key, tuple(values))
    if key == "memory.target_modules"
    else ScalarParam(key, lower=0, upper=len(values) - 1, integer=True)
    for key, values in SPACE.items()
}
OBJECTIVE = "rougeL"
TARGETS = (0.95, 0.99)
METHODS = ("RandomSearch", "BO", "pruned RandomSearch", "pruned BO")
#: The pruning rule of the "pruned" methods (the sweeper's defaults in sweeps/milp_bo.yaml).
DEFAULT_RULE = {"percentile": 50.0, "min_users": 1, "min_trials": 3}

Config = tuple[Any, ...]


# ---- 2. the searches, replayed on the grid ---------------------------------------------


def lookup(grid: dict[str, Any]) -> dict[Config, dict[str, Any]]:
    """Configuration -> its grid entry."""
    return {tuple(c[k] for k in SPACE): c for c in grid["configs"]}


def decode(point: dict[str, Any]) -> Config:
    """The configuration of a point asked by nevergrad (indices -> values)."""
    return tuple(
        point[k] if isinstance(SPECS[k], ChoiceParam) else SPACE[k][int(point[k])] for k in SPACE
    )


def running_curve(users: dict[str, dict], order: Sequence[str]) -> list[float]:
    """The running objective after 1..N users in ``order``: milp.train's own aggregation."""
    results = [{"memory": users[u]} for u in order]
    return [average(results[:k], "memory")[OBJECTIVE] for k in range(1, len(results) + 1)]


def one_blas_thread() -> contextlib.AbstractContextManager:
    """BO's small GP fits run several times faster with one BLAS thread on shared cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


def replay(
    grid: dict[str, Any], optimizer: str, seed: int, budget: int, rule: PruneRule | None
) -> dict[str, Any]:
    """One seeded search of at most ``budget`` user-trainings, as the sweeper runs it.

    Returns per trial: ``cost`` (user-trainings so far), ``best`` (best full objective of
    a completed trial so far, None before the first), ``pruned``. Stops early once the grid
    optimum is found (nothing can improve after that).
    """
    table = lookup(grid)
    optimum = max(c["objective"] for c in grid["configs"])
    order = seeded_order(list(grid["configs"][0]["users"]), seed)
    settings = {"optimizer": optimizer, "budget": budget, "num_workers": 1, "seed": seed}
    with warnings.catch_warnings(), one_blas_thread():
        warnings.simplefilter("ignore")
        ng_optimizer, _ = make_optimizer(SearchSpace(params=dict(SPECS)), settings)
        book, records = LossBook(maximize=True), {}
        spent, best, trials = 0, None, []
        while spent < budget:
            candidate = ng_optimizer.ask()
            curve = running_curve(table[decode(candidate.value)]["users"], order)
            num = len(records)
            stop = rule.first_stop(curve, completed_curves(records, before=num)) if rule else None
            used = len(curve) if stop is None else stop
            records[num] = {
                "status": "ok",
                "objective": curve[used - 1],
                "pruned": stop is not None,
                "users_evaluated": used,
                "running": curve[:used],
            }
            ng_optimizer.tell(candidate, book.loss(records[num]))
            spent += used
            if stop is None:
                best = curve[-1] if best is None else max(best, curve[-1])
            trials.append({"cost": spent, "best": best, "pruned": stop is not None})
            if best is not None and best >= optimum - 1e-12:
                break
    return {"optimizer": optimizer, "seed": seed, "trials": trials}


def cost_to_reach(run: dict[str, Any], target: float) -> int | None:
    """User-trainings until a completed trial reaches ``target``, or None."""
    return next(
        (t["cost"] for t in run["trials"] if t["best"] is not None and t["best"] >= target - 1e-12),
        None,
    )


def best_at(run: dict[str, Any], cost: int) -> float | None:
    """Best completed objective within ``cost`` user-trainings (flat after the optimum)."""
    within = [t["best"] for t in run["trials"] if t["cost"] <= cost and t["best"] is not None]
    return within[-1] if within else None


# ---- 3. report and plot ----------------------------------------------------------------


def median_cost(costs: Sequence[int | None], budget: int) -> float:
    """Median over seeds; a seed that never reached the target counts as budget + 1."""
    return statistics.median(budget + 1 if c is None else c for c in costs)


def cost_text(costs: Sequence[int | None], budget: int) -> str:
    """'median (reached/seeds)'; a median past the budget reads '>budget'."""
    median = median_cost(costs, budget)
    shown = f"{median:g}" if median <= budget else f">{budget}"
    return f"{shown} ({sum(c is not None for c in costs)}/{len(costs)})"


def report(
    grid: dict[str, Any], runs: dict[str, list[dict]], budget: int, rule: dict[str, Any]
) -> tuple[str, dict[str, dict[float, float]]]:
    """The printed report and the median costs per method and target."""
    configs = grid["configs"]
    users = len(configs[0]["users"])
    values = sorted((c["objective"] for c in configs), reverse=True)
    optimum, best = values[0], max(configs, key=lambda c: c["objective"])
    grid_order = [users * (i + 1) for i in range(len(configs))]
    lines = [
        f"Grid: {len(configs)} configurations ({' x '.join(str(len(v)) for v in SPACE.values())}"
        f" of {', '.join(SPACE)}), real milp runs on {users} dev users; settings: "
        + " ".join(grid["settings"]),
        f"Grid build: {grid['wall_seconds']:.0f} s wall (the jobs' files), sum of job times "
        f"{sum(c['seconds'] for c in configs):.0f} s; one configuration = {users} "
        "user-trainings",
        f"Grid optimum: dev ROUGE-L {optimum:.4f} at "
        + ", ".join(f"{k}={best[k]}" for k in SPACE)
        + f"; median {statistics.median(values):.4f}, worst {values[-1]:.4f}",
        "Configurations within 95% / 99% of the optimum: "
        + " / ".join(str(sum(v >= t * optimum - 1e-12 for v in values)) for t in TARGETS),
        f"Replays: {len(runs['BO'])} seeds each (0..{len(runs['BO']) - 1}; the seed also orders "
        f"the users), budget {budget} user-trainings; pruning rule: percentile "
        f"{rule['percentile']:g}, min_users {rule['min_users']}, min_trials {rule['min_trials']}",
        "",
        "User-trainings to reach a fraction of the grid optimum: median over seeds "
        "(seeds that reached it)",
    ]
    header = f"{'method':<22}" + "".join(f"{f'{t:.0%}':>16}" for t in TARGETS)
    header += f"{'trials':>9}{'stopped':>9}"
    lines += [header, "-" * len(header)]
    medians: dict[str, dict[float, float]] = {}
    for method in METHODS:
        costs = {t: [cost_to_reach(r, t * optimum) for r in runs[method]] for t in TARGETS}
        medians[method] = {t: median_cost(c, budget) for t, c in costs.items()}
        trials = [len(r["trials"]) for r in runs[method]]
        stopped = [sum(t["pruned"] for t in r["trials"]) / len(r["trials"]) for r in runs[method]]
        lines.append(
            f"{method:<22}"
            + "".join(f"{cost_text(costs[t], budget):>16}" for t in TARGETS)
            + f"{statistics.mean(trials):>9.1f}{statistics.mean(stopped):>9.0%}"
        )
    reach = [
        next(
            g
            for g, v in zip(grid_order, (c["objective"] for c in configs), strict=True)
            if v >= t * optimum - 1e-12
        )
        for t in TARGETS
    ]
    lines.append(f"{'grid order':<22}" + "".join(f"{r:>16}" for r in reach))
    lines += [
        "",
        "Best-so-far dev ROUGE-L vs. user-trainings (mean over seeds; '-': a seed "
        "has no completed trial yet)",
    ]
    checkpoints = [c for c in (6, 12, 24, 36, 48, 72, 96, 144, 192, 240, 288) if c <= budget]
    lines.append(f"{'users':>6}" + "".join(f"{m:>22}" for m in METHODS))
    for cost in checkpoints:
        cells = []
        for method in METHODS:
            at = [best_at(r, cost) for r in runs[method]]
            cells.append(f"{statistics.mean(at):>22.4f}" if None not in at else f"{'-':>22}")
        lines.append(f"{cost:>6}" + "".join(cells))
    bo, pruned_bo = medians["BO"][0.99], medians["pruned BO"][0.99]
    reached = {m: sum(cost_to_reach(r, 0.99 * optimum) is not None for r in runs[m]) for m in runs}
    lines += [
        "",
        "Seeds reaching 99% within the budget: "
        + ", ".join(f"{m} {reached[m]}/{len(runs[m])}" for m in METHODS)
        + f". A seed that did not counts as {budget + 1} in a median; where BO's median is "
        f"past the budget, the ratio below is an upper bound.",
        f"BO vs RandomSearch user-trainings to 99% (median): {bo:g} vs "
        f"{medians['RandomSearch'][0.99]:g}; to 95%: {medians['BO'][0.95]:g} vs "
        f"{medians['RandomSearch'][0.95]:g}",
        f"pruned-BO/BO user-trainings to 99%: {pruned_bo / bo:.2f}x",
    ]
    return "\n".join(lines) + "\n", medians


def plot(grid: dict[str, Any], runs: dict[str, list[dict]], budget: int, path: Path) -> None:
    """Best-so-far vs. user-trainings, mean over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    optimum = max(c["objective"] for c in grid["configs"])
    floor = min(c["objective"] for c in grid["configs"])
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = {"RandomSearch": "tab:blue", "BO": "tab:red"}
    x = np.arange(1, budget + 1)
    for method in METHODS:
        base = method.removeprefix("pruned ")
        curves = [[best_at(r, c) or floor for c in x] for r in runs[method]]
        ax.plot(
            x,
            np.mean(curves, axis=0),
            color=colors[base],
            ls="--" if method.startswith("pruned") else "-",
            lw=1.8,
            label=f"{method} (mean of {len(curves)} seeds)",
        )
    ax.axhline(optimum, color="black", lw=1, ls="--", label=f"grid optimum {optimum:.4f}")
    ax.axhline(0.99 * optimum, color="black", lw=1, ls=":", label="99% of the optimum")
    ax.set_xlabel("user-trainings (users whose memory was trained)")
    ax.set_ylabel("best dev ROUGE-L so far (completed trials)")
    ax.set_title(f"Search cost on a {len(grid['configs'])}-configuration grid")
    ax.set_xlim(1, budget)
    ax.set_ylim(max(floor, 0.9 * optimum), optimum * 1.005)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="repetitions (seeds 0..N-1)")
    parser.add_argument("--jobs", type=int, default=1, help="replay processes")
    parser.add_argument("--budget", type=int, default=288, help="user-trainings per search")
    parser.add_argument("--percentile", type=float, default=DEFAULT_RULE["percentile"])
    parser.add_argument("--min-users", type=int, default=DEFAULT_RULE["min_users"])
    parser.add_argument("--min-trials", type=int, default=DEFAULT_RULE["min_trials"])
    parser.add_argument("--rebuild", action="store_true", help="run the grid jobs again")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the grid jobs")
    args = parser.parse_args(argv)

    grid = load_or_build_grid(
        args.out / "bench_grid.json", [*SETTINGS, *args.overrides], args.rebuild
    )
    rule = {
        "percentile": args.percentile,
        "min_users": args.min_users,
        "min_trials": args.min_trials,
    }
    runs: dict[str, list[dict]] = {}
    for method in METHODS:
        started = time.perf_counter()
        prune = PruneRule(**rule) if method.startswith("pruned") else None
        optimizer = method.removeprefix("pruned ")
        one = functools.partial(replay, grid, optimizer, budget=args.budget, rule=prune)
        with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
            runs[method] = list(pool.map(one, range(args.seeds)))
        print(f"bench: {method}: {time.perf_counter() - started:.1f} s", flush=True)
    text, _ = report(grid, runs, args.budget, rule)
    print("\n" + text, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_search.txt").write_text(text)
    plot(grid, runs, args.budget, args.out / "bench_search.png")
    print(f"written: {args.out / 'bench_search.txt'}, {args.out / 'bench_search.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))  # a broken run file: one line naming it
