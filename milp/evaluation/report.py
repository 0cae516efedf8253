"""What a run reports: per-user results averaged into metrics.json and the printed table."""

from __future__ import annotations

from typing import Any

from milp.evaluation.metrics import LIKELIHOOD_NAMES, METRIC_NAMES, perplexity
from milp.memory.space import MemoryConfig


def average(results: list[dict], key: str) -> dict[str, float] | None:
    """Example-weighted mean of per-user metrics (LaMP averages over examples)."""
    scored = [r[key] for r in results if r.get(key)]
    total = sum(m["examples"] for m in scored)
    if not total:
        return None
    names = METRIC_NAMES + tuple(n for n in LIKELIHOOD_NAMES if all(n in m for m in scored))
    mean = {n: sum(m[n] * m["examples"] for m in scored) / total for n in names}
    if "nll" in mean:
        mean["ppl"] = perplexity(mean["nll"])
    return mean | {"examples": total, "users": len(scored)}


def format_table(rows: dict[str, dict[str, float] | None]) -> str:
    """A plain-text table of methods x metrics, as printed at the end of a run."""
    header = (
        f"{'method':<26}{'ROUGE-1':>9}{'ROUGE-L':>9}{'persona-F1':>12}{'BLEU':>8}"
        f"{'NLL':>8}{'users':>7}{'examples':>10}"
    )
    lines = [header, "-" * len(header)]
    for name, m in rows.items():
        if m:
            lines.append(
                f"{name:<26}{m['rouge1']:>9.4f}{m['rougeL']:>9.4f}{m['persona_f1']:>12.4f}"
                f"{m['bleu']:>8.4f}{format(m['nll'], '.4f') if 'nll' in m else '-':>8}"
                f"{m['users']:>7}{m['examples']:>10}"
            )
    return "\n".join(lines)


def method_name(memory: MemoryConfig, retrieval_k: int) -> str:
    """How the main row of the results table is labelled."""
    if retrieval_k:
        if memory.enabled:
            return f"memory + retrieval (k={retrieval_k})"
        return f"retrieval (k={retrieval_k})"
    return "memory injection" if memory.enabled else "zero-shot (memory=none)"


def summarize(
    results: list[dict],
    *,
    data: str,
    data_path: str | None,
    gold_in_history: dict | None,
    data_source: dict | None = None,
    prompt_fit: dict | None = None,
    split: str,
    objective: str,
    memory_enabled: bool,
) -> dict[str, Any]:
    """Overall metrics of the users finished so far, as written to metrics.json."""
    with_memory = average(results, "memory")
    return {
        "data": data,
        "data_path": data_path,
        "data_source": data_source,
        "split": split,
        "users": len(results),
        "memory_enabled": memory_enabled,
        "objective_name": objective,
        "objective": with_memory[objective] if with_memory else None,
        "memory": with_memory,
        "no_memory": average(results, "no_memory"),
        # queries whose gold is in the user's history (milp/data/checks.py find_gold_leaks)
        "gold_in_history": gold_in_history,
        # how the queries' prompts were fitted to the token budget (PromptFormat.fit)
        "prompt_fit": prompt_fit,
        "seconds": round(sum(r["seconds"] for r in results), 2),
        "per_user": {
            r["user_id"]: {k: r[k] for k in ("history_size", "memory", "no_memory", "seconds")}
            for r in results
        },
    }


def table_rows(summary: dict[str, Any], memory: MemoryConfig, retrieval_k: int) -> dict:
    """The rows of the final table: the method, and no memory on the same users."""
    rows = {method_name(memory, retrieval_k): summary["memory"]}
    if summary.get("no_memory"):
        rows["no memory (same users)"] = summary["no_memory"]
    return rows
