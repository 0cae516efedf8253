"""The Markdown tables of `make reproduce`'s results file, from the runs' records.

`results` maps a method to its test runs (one record per seed, as `reproduce.py` writes
them: overall metrics, wall time, and per user: id, history size, metrics, per-example
ROUGE). Per-user figures are first averaged over seeds, then compared by user
(experiments/stats.py): a paired bootstrap interval for the mean of (reference - baseline) and
wins / ties / losses. Metrics a run does not report (e.g. likelihood scores from older
runs) are left out rather than shown empty.
"""

from __future__ import annotations

import statistics
from typing import Any

from stats import bootstrap_aggregate, compare, lower_is_better, seed_spread

METHODS = {
    "zero_shot": "zero-shot",
    "rag": "retrieval-in-prompt (BM25)",
    "oppu": "one PEFT per user (OPPU-style)",
    "milp": "MiLP (searched memory)",
    "milp_rag": "MiLP + retrieval",
    "milp_default": "memory, the experiment's config (not searched)",
    "milp_sparse": "MiLP + sparse-history repetition",
    "milp_task_ft": "task fine-tune, step-matched (MiLP's memory on pooled train users)",
    "milp_swapped": "swapped memory (MiLP's memory of another test user)",
}
LABELS = {
    "rouge1": "ROUGE-1",
    "rougeL": "ROUGE-L",
    "persona_f1": "persona-F1",
    "bleu": "BLEU",
    "nll": "NLL",
}
#: Metrics whose per-example scores LaMP aggregates with rouge_score's bootstrap.
LAMP_AGGREGATED = ("rouge1", "rougeL")
BUCKETS = (("≤5", 0, 5), ("6–20", 6, 20), (">20", 21, 10**9))


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


def present(results: dict[str, list[dict]], metric: str) -> bool:
    """Whether every run of every method reports `metric` overall."""
    return all(metric in (r["metrics"] or {}) for runs in results.values() for r in runs)


def mean_std(values: list[float]) -> str:
    """Mean ± std over seeds; one seed is shown as one seed, never as "± 0"."""
    return seed_spread(values)


def lamp_aggregate(runs: list[dict], metric: str, seed: int = 0) -> float:
    """rouge_score's bootstrap mid (1,000 resamples, numpy seed `seed`) of the examples'
    scores, per run, averaged over the runs (seeds)."""
    return statistics.mean(
        bootstrap_aggregate(
            [e[metric] for u in r["per_user"] for e in u["example_scores"]], seed=seed
        ).estimate
        for r in runs
    )


def methods_table(
    results: dict[str, list[dict]], tuning: dict[str, dict], metrics: list[str]
) -> str:
    """Methods x metrics: plain mean ± std over seeds, LaMP's aggregation, wall times."""
    shown = [m for m in metrics if present(results, m)]
    aggregated = [m for m in LAMP_AGGREGATED if m in shown]
    head = ["method", *(f"{label(m)} mean" for m in shown)]
    head += [f"{label(m)} LaMP agg." for m in aggregated]
    head += ["test wall (s / run)", "tuning wall (s)", "trainable params / user"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method, runs in results.items():
        cells = [mean_std([r["metrics"][m] for r in runs]) for m in shown]
        cells += [f"{lamp_aggregate(runs, m):.4f}" for m in aggregated]
        wall = tuning.get(method, {}).get("wall_seconds")
        cells += [
            f"{statistics.mean(r['wall_seconds'] for r in runs):.0f}",
            f"{wall:.0f}" if wall is not None else "–",
            f"{runs[0]['trainable_parameters']:,}",
        ]
        lines.append(f"| {METHODS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_user(runs: list[dict], metric: str) -> dict[str, float]:
    """user id -> the user's score averaged over the runs (seeds) that scored it."""
    values: dict[str, list[float]] = {}
    for run in runs:
        for user in run["per_user"]:
            if user.get(metric) is not None:
                values.setdefault(user["user_id"], []).append(user[metric])
    return {u: statistics.mean(v) for u, v in values.items()}


def comparisons(
    results: dict[str, list[dict]],
    reference: str,
    metrics: list[str],
    *,
    tolerance: float,
    resamples: int,
    seed: int,
) -> list[dict[str, Any]]:
    """The reference method against every other method, per metric both report."""
    rows = []
    for other in results:
        if other == reference:
            continue
        for metric in metrics:
            a, b = per_user(results[reference], metric), per_user(results[other], metric)
            if not a or not b:
                continue
            result = compare(a, b, metric, tolerance=tolerance, resamples=resamples, seed=seed)
            rows.append({"baseline": other, "comparison": result})
    return rows


def comparison_table(rows: list[dict[str, Any]], reference: str) -> str:
    """Reference vs each baseline: means, the paired 95% interval of the difference, W/T/L."""
    if not rows:
        return "(no method to compare with)"
    name = METHODS.get(reference, reference)
    lines = [
        f"| baseline | metric | users | {name} | baseline | Δ (mean over users) "
        "| 95% CI of Δ | W / T / L |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        c = row["comparison"]
        d = c.difference
        mark = " *" if d.excludes_zero() else ""
        lines.append(
            f"| {METHODS.get(row['baseline'], row['baseline'])} | {label(c.metric)}"
            f"{' (lower is better)' if lower_is_better(c.metric) else ''} | {c.users} "
            f"| {c.mean_a:.4f} | {c.mean_b:.4f} | {d.estimate:+.4f}{mark} "
            f"| [{d.low:+.4f}, {d.high:+.4f}] | {c.wins} / {c.ties} / {c.losses} |"
        )
    return "\n".join(lines)


def tuning_table(tuning: dict[str, dict]) -> str:
    """What each method was tuned on and what was chosen."""
    lines = [
        "| method | space (sweep file) | tuner | split | dev users | trials (distinct, pruned) "
        "| best trial | dev objective | chosen settings | wall (s) |",
        "|---|---|---|---|---:|---|---:|---:|---|---:|",
    ]
    for method, t in tuning.items():
        name = METHODS.get(method, method)
        if "not_tuned" in t:
            lines.append(f"| {name} | – | not tuned: {t['not_tuned']} | – | – | | | | | |")
            continue
        space = ", ".join(f"`{k}`" for k, v in t["space"].items() if not _fixed(v))
        wall = f"{t['wall_seconds']:.0f}" if t.get("wall_seconds") is not None else "–"
        lines.append(
            f"| {name} | {space} (`{t['sweep']}`) | {t['tuner']} | {t['split']} "
            f"| {len(t['dev_user_ids'])} "
            f"| {t['trials']} ({t['distinct_configurations']}, {t['pruned']}) "
            f"| {t['best_trial']} | {t['dev_objective']:.4f} "
            f"| `{' '.join(t['settings']) or '(defaults)'}` | {wall} |"
        )
    return "\n".join(lines)


def _fixed(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("fixed:")


def bucket_means(runs: list[dict], key: str) -> dict[str, tuple[float, int]]:
    """Mean of a metric per history-size bucket (users of all seeds pooled)."""
    means = {}
    for name, low, high in BUCKETS:
        values = [
            u[key]
            for r in runs
            for u in r["per_user"]
            if low <= u["history_size"] <= high and u.get(key) is not None
        ]
        users = sum(1 for u in runs[0]["per_user"] if low <= u["history_size"] <= high)
        means[name] = (statistics.mean(values) if values else float("nan"), users)
    return means


def sparse_table(results: dict[str, list[dict]]) -> str:
    buckets = bucket_means(next(iter(results.values())), "rougeL")
    cells = [f"{n} items ({u} user{'' if u == 1 else 's'})" for n, (_, u) in buckets.items()]
    lines = ["| method | " + " | ".join(cells) + " |", "|" + "---|" * (len(BUCKETS) + 1)]
    for method, runs in results.items():
        cells = [f"{v:.4f}" for v, _ in bucket_means(runs, "rougeL").values()]
        lines.append(f"| {METHODS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
