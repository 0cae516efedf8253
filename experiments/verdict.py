"""The verdict of `make reproduce` on a real source: the paper's claims, each tested on the
test users with paired statistics, and the figures behind them.

Per user, a method's score is the mean over the user's queries, averaged over its seeds.
Each claim compares two methods on the users both answered: the mean paired difference
with its Student-t 95% interval over users, a paired sign-flip permutation p-value and
wins / ties / losses (stats.paired_test). The claims are tested together: their
p-values are Holm-adjusted over all the claims of the table. A claim **holds** where the
whole interval lies on the claimed side and its adjusted p is below 0.05, **does not
hold** where the interval lies wholly on the other side with adjusted p below 0.05, and
is **inconclusive** otherwise (or where a method it needs did not run).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from results_tables import METHODS, per_user
from stats import lower_is_better, nll_decomposition, paired_test, seed_spread

from milp.run.store import attribution_files, read_run_file

ALPHA = 0.05


@dataclass(frozen=True)
class Claim:
    """`method` beats `baseline` on `metric` (lower is better for NLL)."""

    text: str
    method: str
    baseline: str
    metric: str


CLAIMS = (
    Claim("memory beats no memory (ROUGE-L)", "milp", "zero_shot", "rougeL"),
    Claim("memory beats no memory (held-out NLL)", "milp", "zero_shot", "nll"),
    Claim("personalization: own memory < another user's (swapped)", "milp", "milp_swapped", "nll"),
    Claim(
        "personalization: own memory < step-matched task fine-tune",
        "milp",
        "milp_task_ft",
        "nll",
    ),
    Claim("searched MiLP beats OPPU-style (NLL)", "milp", "oppu", "nll"),
    Claim("searched MiLP beats OPPU-style (ROUGE-L)", "milp", "oppu", "rougeL"),
    Claim("MiLP + retrieval beats MiLP alone (ROUGE-L)", "milp_rag", "milp", "rougeL"),
    Claim("MiLP + retrieval beats retrieval alone (ROUGE-L)", "milp_rag", "rag", "rougeL"),
)


def name(method: str) -> str:
    return METHODS.get(method, method)


def test_claim(results: dict[str, list[dict]], claim: Claim, seed: int = 0) -> dict:
    """One verdict row: the claim, its status and the figures."""
    row = {"claim": claim.text, "method": claim.method, "baseline": claim.baseline}
    missing = [m for m in (claim.method, claim.baseline) if m not in results]
    if missing:
        return row | {"status": "inconclusive", "figures": f"not run: {', '.join(missing)}"}
    a = per_user(results[claim.method], claim.metric)
    b = per_user(results[claim.baseline], claim.metric)
    if len(set(a) & set(b)) < 2:
        return row | {"status": "inconclusive", "figures": "fewer than 2 users scored by both"}
    test = paired_test(a, b, claim.metric, seed=seed)
    spread = {
        m: seed_spread([r["metrics"][claim.metric] for r in results[m]])
        for m in (claim.method, claim.baseline)
    }
    figures = (
        f"{claim.metric}{' (lower is better)' if lower_is_better(claim.metric) else ''}: "
        f"{test.mean_a:.4f} vs {test.mean_b:.4f}; {test.format()}; over seeds "
        f"{spread[claim.method]} vs {spread[claim.baseline]}"
    )
    return row | {"side": test.better(), "figures": figures, "p": test.sign_flip.p}


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of `p_values` (same order), controlling the chance
    of any false claim over the whole table."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def decide(rows: list[dict], alpha: float = ALPHA) -> list[dict]:
    """Each tested row's status from its interval side and its Holm-adjusted p."""
    tested = [r for r in rows if "p" in r]
    for row, p in zip(tested, holm([r["p"] for r in tested]), strict=True):
        side = row["side"] if p < alpha else None
        row["status"] = {"a": "holds", "b": "does not hold", None: "inconclusive"}[side]
        row["figures"] += f"; Holm-adjusted p {p:.4g} over {len(tested)} claims"
    return rows


def best_fixed_baseline(results: dict[str, list[dict]]) -> str | None:
    """The better of zero-shot and retrieval by mean ROUGE-L over users."""
    candidates = [m for m in ("zero_shot", "rag") if m in results]
    if not candidates:
        return None
    return max(candidates, key=lambda m: statistics.mean(per_user(results[m], "rougeL").values()))


def claim_rows(results: dict[str, list[dict]], ablations: str | None) -> list[dict]:
    """Every claim's row, the ablations' last."""
    rows = [test_claim(results, c) for c in CLAIMS]
    best = best_fixed_baseline(results)
    if best is not None:
        rows.append(
            test_claim(
                results,
                Claim(
                    f"memory ROUGE-L above the better fixed baseline ({name(best)})",
                    "milp",
                    best,
                    "rougeL",
                ),
            )
        )
    rows = decide(rows)
    rows.append(
        {
            "claim": "several LoRAs vs one; the layer choice (ablations on dev users)",
            "status": "see the ablation tables" if ablations else "not run",
            "figures": "on dev users, not a test of the test users"
            if ablations
            else "ablations not run for this source (--ablate)",
        }
    )
    return rows


def verdict_table(rows: list[dict]) -> str:
    lines = ["| claim | verdict | figures |", "|---|---|---|"]
    lines += [f"| {r['claim']} | **{r['status']}** | {r['figures']} |" for r in rows]
    return "\n".join(lines)


def decomposition(results: dict[str, list[dict]]) -> str:
    """The memory's NLL gain split into its domain part (no memory -> another user's
    memory) and its owner part (another user's -> the user's own)."""
    needed = ("zero_shot", "milp_swapped", "milp")
    if any(m not in results for m in needed):
        return "(needs zero-shot, swapped and MiLP runs)"
    none, swapped, own = (per_user(results[m], "nll") for m in needed)
    parts = nll_decomposition(none, swapped, own)
    lines = ["| part | mean NLL reduction (nats) | test |", "|---|---:|---|"]
    for key, label in (
        ("domain", "domain: no memory → swapped"),
        ("owner", "owner: swapped → own"),
        ("total", "total: no memory → own"),
    ):
        lines.append(f"| {label} | {parts[key].difference.mean:+.4f} | {parts[key].format()} |")
    return "\n".join(lines)


def attribution_lines(out: Path, method: str, seeds: list[int]) -> str:
    """Per seed: owner top-1 per user against chance, with its permutation p."""
    lines = []
    for seed in seeds:
        path, _ = attribution_files(out / "runs" / method / f"seed{seed}")
        if not path.is_file():
            continue
        s = read_run_file(path)
        top1, perm = s["per_user"]["top1"], s.get("per_user_top1_permutation") or {}
        p = f"permutation p {perm['p']:.4g}" if "p" in perm else "no permutation test"
        lines.append(
            f"- seed {seed}: owner top-1 {top1:.3f} per user over {s['users']} users "
            f"(chance {s['chance']:.3f}), {p}"
        )
    return "\n".join(lines) or "(no attribution in the test runs)"


def counts(results: dict[str, list[dict]]) -> str:
    """Users and queries each method was scored on, and its seeds."""
    lines = ["| method | seeds | users | scored queries per seed |", "|---|---:|---:|---:|"]
    for method, runs in results.items():
        users = {u["user_id"] for r in runs for u in r["per_user"]}
        queries = sorted({sum(len(u["example_scores"]) for u in r["per_user"]) for r in runs})
        lines.append(
            f"| {name(method)} | {len(runs)} | {len(users)} | {', '.join(map(str, queries))} |"
        )
    return "\n".join(lines)
