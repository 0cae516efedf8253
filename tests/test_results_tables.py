"""The results file's tables (experiments/results_tables.py) on hand-built run records."""

import sys

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import results_tables as tables  # noqa: E402 (a script folder, not a package)
from stats import bootstrap_aggregate  # noqa: E402


def run_record(scores: dict[str, tuple[float, ...]], nll: dict[str, float] | None = None) -> dict:
    """One test run as reproduce.py records it: user -> per-example ROUGE-L."""
    per_user = []
    for user, examples in scores.items():
        mean = float(np.mean(examples))
        per_user.append(
            {
                "user_id": user,
                "history_size": 4 if user == "u0" else 30,
                "rouge1": mean,
                "rougeL": mean,
                **({"nll": nll[user]} if nll else {}),
                "example_scores": [{"rouge1": x, "rougeL": x} for x in examples],
            }
        )
    overall = float(np.mean([x for ex in scores.values() for x in ex]))
    metrics = {"rouge1": overall, "rougeL": overall, "persona_f1": 0.1}
    if nll:
        metrics["nll"] = float(np.mean(list(nll.values())))
    return {
        "metrics": metrics,
        "per_user": per_user,
        "wall_seconds": 10.0,
        "trainable_parameters": 0,
    }


MEMORY = {"u0": (0.9, 0.8), "u1": (0.6, 0.7), "u2": (0.5, 0.5), "u3": (0.95, 0.85)}
BASE = {"u0": (0.1, 0.2), "u1": (0.2, 0.3), "u2": (0.5, 0.5), "u3": (0.4, 0.4)}


def test_comparison_rows_pair_users_and_skip_metrics_a_run_lacks():
    results = {
        "milp": [run_record(MEMORY, nll={"u0": 2.0, "u1": 2.5, "u2": 3.0, "u3": 1.0})],
        "zero_shot": [run_record(BASE)],  # no NLL reported
    }
    rows = tables.comparisons(
        results, "milp", ["rougeL", "nll"], tolerance=0.01, resamples=2000, seed=0
    )
    assert [r["comparison"].metric for r in rows] == ["rougeL"]  # nll: absent for zero-shot
    c = rows[0]["comparison"]
    assert (c.wins, c.ties, c.losses) == (3, 1, 0)
    assert c.difference.estimate == pytest.approx(np.mean([0.7, 0.4, 0.0, 0.5]))
    table = tables.comparison_table(rows, "milp")
    assert "| zero-shot | ROUGE-L | 4 |" in table and "3 / 1 / 0" in table
    assert c.difference.low > 0  # the whole interval on MiLP's side
    # The NLL column is shown only when every run reports it.
    methods = tables.methods_table(results, {}, ["rougeL", "nll"])
    assert "NLL" not in methods and "ROUGE-L LaMP agg." in methods


def test_methods_table_shows_lamps_aggregation_beside_the_mean():
    results = {"milp": [run_record(MEMORY)], "zero_shot": [run_record(BASE)]}
    table = tables.methods_table(results, {"milp": {"wall_seconds": 42.0}}, ["rougeL"])
    flat = [x for ex in MEMORY.values() for x in ex]
    row = next(line for line in table.splitlines() if line.startswith("| MiLP"))
    assert f"| {np.mean(flat):.4f} (1 seed) |" in row  # one seed: no spread shown
    assert f"| {bootstrap_aggregate(flat, seed=0).estimate:.4f} |" in row
    assert "| 42 |" in row  # the tuning wall time


def test_nll_comparison_counts_lower_as_better():
    nll_memory = {"u0": 2.0, "u1": 2.1, "u2": 1.9, "u3": 2.0}
    nll_base = {"u0": 2.5, "u1": 2.6, "u2": 2.4, "u3": 2.5}
    results = {
        "milp": [run_record(MEMORY, nll_memory)],
        "rag": [run_record(MEMORY, nll_base)],  # same ROUGE: a tie there
    }
    rows = tables.comparisons(
        results, "milp", ["rougeL", "nll"], tolerance=0.01, resamples=500, seed=0
    )
    nll = next(r["comparison"] for r in rows if r["comparison"].metric == "nll")
    assert (nll.wins, nll.losses) == (4, 0) and nll.difference.estimate == pytest.approx(-0.5)
    assert nll.difference.high < 0  # lower NLL: the whole interval on MiLP's side
    rouge = next(r["comparison"] for r in rows if r["comparison"].metric == "rougeL")
    assert rouge.difference.low <= 0 <= rouge.difference.high  # the same ROUGE: a tie
    assert "NLL (lower is better)" in tables.comparison_table(rows, "milp")
