"""The PNG plots of `make reproduce`'s results: methods, paired differences, tuning
curves, ablations."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from results_tables import METHODS, label, present
from stats import lower_is_better
from tuning import read_trials


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def methods_plot(results: dict[str, list[dict]], metrics: list[str], path: Path) -> Path:
    """Bars: each method's test score per metric, mean ± std over seeds."""
    plt = _pyplot()
    # Scores in [0, 1] only: likelihoods (NLL) are on another scale.
    shown = [m for m in metrics if present(results, m) and not lower_is_better(m)]
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(results)
    width = 0.8 / max(len(shown), 1)
    for i, metric in enumerate(shown):
        values = [[r["metrics"][metric] for r in results[m]] for m in names]
        ax.bar(
            [x + i * width for x in range(len(names))],
            [statistics.mean(v) for v in values],
            width,
            yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in values],
            label=label(metric),
            capsize=3,
        )
    ax.set_xticks(
        [x + width * (len(shown) - 1) / 2 for x in range(len(names))],
        [METHODS.get(m, m) for m in names],
        rotation=15,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel("score (test users, mean ± std over seeds)")
    ax.set_title("Methods on the same test users")
    ax.set_ylim(0, 1.12)  # room for the legend above the bars
    ax.legend(ncol=max(len(shown), 1), loc="upper center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def differences_plot(rows: list[dict[str, Any]], reference: str, path: Path) -> Path:
    """Per metric: Δ (reference - baseline) with its paired 95% bootstrap interval."""
    plt = _pyplot()
    metrics = list(dict.fromkeys(r["comparison"].metric for r in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        mine = [r for r in rows if r["comparison"].metric == metric]
        for y, row in enumerate(mine):
            d = row["comparison"].difference
            ax.errorbar(
                d.estimate,
                y,
                xerr=[[d.estimate - d.low], [d.high - d.estimate]],
                fmt="o",
                capsize=4,
            )
        ax.axvline(0, color="gray", linewidth=1)
        ax.set_yticks(range(len(mine)), [METHODS.get(r["baseline"], r["baseline"]) for r in mine])
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel(f"Δ {label(metric)} ({METHODS.get(reference, reference)} − baseline)")
    fig.suptitle("Paired by user: mean difference and 95% bootstrap interval", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tuning_plot(tuning: dict[str, dict], path: Path) -> Path | None:
    """Best-so-far dev objective per trial, one line per tuned method."""
    objective = next(
        (r["objective_name"] for r in tuning.values() if "objective_name" in r), "rougeL"
    )
    sign = -1 if lower_is_better(objective) else 1
    curves = {}
    for method, record in tuning.items():
        if "sweep_dir" not in record:
            continue
        # The sweep beside the plot (`<out>/runs/tune/<method>`), wherever `out` now is.
        sweep = path.parent / "runs" / "tune" / method
        trials = sorted(read_trials(sweep), key=lambda t: t["trial"])
        best, curve = float("-inf"), []
        for t in trials:
            if t.get("objective") is not None and not t.get("pruned"):
                best = max(best, sign * t["objective"])
            curve.append(sign * best if best > float("-inf") else float("nan"))
        curves[method] = curve
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=METHODS.get(method, method))
    ax.set_xlabel("trial (same budget for every method)")
    ax.set_ylabel(f"best dev {label(objective)} so far")
    ax.set_title("Tuning on validation users")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ablations_plot(ablations: Path, path: Path) -> Path | None:
    """One panel per ablated dimension: dev ROUGE-L / ROUGE-1 per value."""
    files = sorted(ablations.glob("ablate_*.json"))
    if not files:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(files), figsize=(4 * len(files), 3.5), squeeze=False)
    for ax, file in zip(axes[0], files, strict=True):
        rows = json.loads(file.read_text())["rows"]
        labels = [str(r["value"]) for r in rows]
        ax.plot(labels, [r["rougeL"] for r in rows], marker="o", label="ROUGE-L")
        ax.plot(labels, [r["rouge1"] for r in rows], marker="s", label="ROUGE-1")
        ax.set_xlabel(file.stem.removeprefix("ablate_"))
        ax.set_ylabel("validation score")
        ax.tick_params(axis="x", labelsize=7, rotation=20)
        ax.legend(fontsize=7)
    fig.suptitle("Ablations around the best configuration")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
