"""Attribution's figures: who owns a memory, from an NLL matrix (`milp/attribute.py` makes it).

The owner is picked as the memory with the lowest NLL, per user (the mean NLL over the
user's queries) and per query; only the N users' memories compete (the task memory and no
memory are reported beside them). NLLs within `TIE_TOLERANCE` nats are ties, broken at
random in expectation: an owner tied with k-1 others for the lowest NLL gets credit 1/k,
and its rank is the mean of the tied ranks, so N identical memories give top-1 accuracy
exactly 1/N and mean rank exactly (N+1)/2.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

TIE_TOLERANCE = 1e-6  # nats: NLLs this close count as a tie
TASK_MEMORY, NO_MEMORY = "task memory", "no memory"


def owner_credit(scores: Sequence[float], owner: int) -> tuple[float, float]:
    """The owner's top-1 credit and rank (1 = lowest NLL) among `scores`, ties shared:
    credit 1/k if the owner is among k tied lowest, rank the mean of its tied ranks."""
    scores = np.asarray(scores, dtype=float)
    own = scores[owner]
    lowest = scores <= scores.min() + TIE_TOLERANCE
    credit = 1.0 / lowest.sum() if lowest[owner] else 0.0
    better = int((scores < own - TIE_TOLERANCE).sum())
    tied = int((np.abs(scores - own) <= TIE_TOLERANCE).sum()) - 1
    return float(credit), 1.0 + better + tied / 2


def summarize_attribution(
    users: Sequence[str], queries: Sequence[tuple[str, str]], scores: dict[str, list[float]]
) -> dict[str, Any]:
    """Owner accuracy, ranks and the NLL matrices from per-query scores; `scores` holds one
    row per user in `users` (keyed by user id) and optionally TASK_MEMORY / NO_MEMORY."""
    n = len(users)
    owner_of = [users.index(user_id) for user_id, _ in queries]
    rows = list(users) + [k for k in (TASK_MEMORY, NO_MEMORY) if k in scores]
    query_nll = np.array([scores[r] for r in rows], dtype=float)  # [memory, query]
    columns = [[q for q, o in enumerate(owner_of) if o == u] for u in range(n)]
    user_nll = np.stack([query_nll[:, c].mean(axis=1) for c in columns], axis=1)
    per_user = [owner_credit(user_nll[:n, u], u) for u in range(n)]
    per_query = [owner_credit(query_nll[:n, q], o) for q, o in enumerate(owner_of)]
    own = np.diag(user_nll[:n])
    others = user_nll[:n][~np.eye(n, dtype=bool)]

    def beats(row: str) -> dict | None:
        if row not in scores:
            return None
        wins = int((own < user_nll[rows.index(row)] - TIE_TOLERANCE).sum())
        return {"users": wins, "of": n, "fraction": wins / n}

    mean_nll = {"own memory": float(own.mean()), "other users' memories": float(others.mean())}
    for row in (TASK_MEMORY, NO_MEMORY):
        if row in scores:
            mean_nll[row] = float(user_nll[rows.index(row)].mean())
    return {
        "users": n,
        "queries": len(queries),
        "chance": 1.0 / n,
        "chance_mean_rank": (n + 1) / 2,
        "per_user": {
            "top1": float(np.mean([c for c, _ in per_user])),
            "mean_owner_rank": float(np.mean([r for _, r in per_user])),
        },
        "per_query": {
            "top1": float(np.mean([c for c, _ in per_query])),
            "mean_owner_rank": float(np.mean([r for _, r in per_query])),
        },
        "own_beats_no_memory": beats(NO_MEMORY),
        "own_beats_task_memory": beats(TASK_MEMORY),
        "mean_nll": mean_nll,
        "tie_tolerance": TIE_TOLERANCE,
        "matrix": {
            "memories": rows,
            "users": list(users),
            "user_nll": user_nll.tolist(),
            "queries": [{"user_id": u, "id": q} for u, q in queries],
            "query_nll": query_nll.tolist(),
        },
    }


def heatmap_png(result: dict[str, Any]) -> bytes:
    """The per-user NLL matrix as a PNG: colour = NLL minus the user's no-memory NLL
    (or minus the column mean without a no-memory row); the owner's cell is outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = result["matrix"]
    values = np.array(matrix["user_nll"])
    rows, users = matrix["memories"], matrix["users"]
    if NO_MEMORY in rows:
        delta, label = values - values[rows.index(NO_MEMORY)], "NLL - no-memory NLL (nats)"
    else:
        delta, label = values - values.mean(axis=0), "NLL - column mean (nats)"
    n = len(users)
    size = max(4.0, 0.5 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.5, size * len(rows) / max(n, 1) + 1))
    bound = float(np.abs(delta).max()) or 1.0
    image = ax.imshow(delta, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(n), users, rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel("user whose held-out golds are scored")
    ax.set_ylabel("memory")
    for u in range(n):
        ax.add_patch(plt.Rectangle((u - 0.5, u - 0.5), 1, 1, fill=False, lw=1.5, ec="black"))
        if n <= 16:
            for r in range(len(rows)):
                dark = abs(delta[r, u]) > bound / 2
                ax.text(
                    u,
                    r,
                    f"{values[r, u]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if dark else "black",
                )
    ax.set_title(
        f"owner top-1 {result['per_user']['top1']:.2f} per user, "
        f"{result['per_query']['top1']:.2f} per query (chance {result['chance']:.2f})",
        fontsize=8,
    )
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def format_attribution(result: dict[str, Any]) -> str:
    """The summary lines printed after a run's table."""
    u, q = result["per_user"], result["per_query"]
    lines = [
        f"attribution: {result['users']} users, {result['queries']} queries (gold NLL under "
        "every user's memory; the lowest picks the owner)",
        f"  owner top-1: {u['top1']:.3f} per user, {q['top1']:.3f} per query "
        f"(chance {result['chance']:.3f})",
        f"  mean owner rank: {u['mean_owner_rank']:.2f} per user, "
        f"{q['mean_owner_rank']:.2f} per query (chance {result['chance_mean_rank']:.2f})",
    ]
    for key, name in (("own_beats_no_memory", NO_MEMORY), ("own_beats_task_memory", TASK_MEMORY)):
        if result.get(key):
            lines.append(f"  own memory beats {name}: {result[key]['users']}/{result[key]['of']}")
    lines.append("  mean NLL: " + ", ".join(f"{k} {v:.4f}" for k, v in result["mean_nll"].items()))
    return "\n".join(lines)
