"""Attribution's figures: who owns a memory, from the NLL matrix that
`milp/evaluation/attribution.py` makes.

The owner is picked as the memory with the lowest NLL, per user (the mean NLL over the
user's queries) and per query; only the N users' memories compete (the task memory and no
memory are reported beside them). NLLs within `TIE_TOLERANCE` nats are ties, broken at
random in expectation: an owner tied with k-1 others for the lowest NLL gets credit 1/k,
and its rank is the mean of the tied ranks, so N identical memories give top-1 accuracy
exactly 1/N and mean rank exactly (N+1)/2.

Whether the per-user top-1 beats chance by more than luck is a permutation test
(`owner_permutation_p`): under H0 the owner labels carry no information, so every
assignment of the N memories to the N users is as likely as the true one.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import permutations as all_permutations
from typing import Any

import numpy as np

from milp.data.controls import namespace
from milp.errors import MilpError

TIE_TOLERANCE = 1e-6  # nats: NLLs this close count as a tie
TASK_MEMORY, NO_MEMORY = "task memory", "no memory"
#: Owner permutation p-values enumerate all N! assignments up to this many users (8! = 40,320).
EXACT_PERMUTATION_USERS = 8
_CHUNK_CELLS = 1 << 22  # permutations x users scored at once: memory stays ~32 MB


@dataclass(frozen=True)
class PermutationP:
    """A permutation p-value: the observed statistic, p, how many rearrangements it was
    computed from, whether that was all of them (`exact`: p = reached / all) or `seed`ed
    random draws (p = (reached + 1) / (draws + 1), never 0)."""

    observed: float
    p: float
    permutations: int
    exact: bool
    seed: int | None


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


def credit_matrix(user_nll: np.ndarray) -> np.ndarray:
    """[user, memory] -> the top-1 credit memory m would get were it user u's owner: 1/k
    for each of the k memories tied (`TIE_TOLERANCE`) for u's lowest NLL, else 0 (as
    `owner_credit`)."""
    lowest = user_nll <= user_nll.min(axis=1, keepdims=True) + TIE_TOLERANCE
    return lowest / lowest.sum(axis=1, keepdims=True)


def owner_permutation_p(
    user_nll: Sequence[Sequence[float]] | np.ndarray,
    *,
    permutations: int = 10_000,
    seed: int = 0,
    exact_users: int = EXACT_PERMUTATION_USERS,
    groups: Sequence[str] | None = None,
) -> PermutationP:
    """One-sided (greater) permutation p-value of the per-user owner top-1.

    `user_nll` is [user, memory]: row u the mean NLL of user u's queries, column m user
    m's memory (same order, so the owner sits on the diagonal). The observed top-1 (mean
    tie-shared credit of each user's own memory) is set against random owner labels: a
    uniformly random permutation says whose memory is whose. p is the share of assignments
    whose top-1 reaches the observed one (within 1e-9): all N! of them when N <=
    `exact_users`, else `permutations` drawn from ``numpy.random.default_rng(seed)`` with
    p = (b+1)/(m+1). With `groups` (one label per user, e.g. each Shakespeare
    character's play) holding more than one label, owners are shuffled only within their
    group, always by random draws: the test then asks whether a memory knows its owner
    beyond knowing the owner's group.
    """
    matrix = np.asarray(user_nll, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise MilpError(
            f"owner_permutation_p: needs a square users x memories NLL matrix of at least "
            f"2 users, got shape {matrix.shape}"
        )
    if not np.isfinite(matrix).all():
        raise MilpError("owner_permutation_p: the NLL matrix holds a NaN or inf")
    if permutations < 1:
        raise MilpError("owner_permutation_p: permutations must be >= 1")
    credit = credit_matrix(matrix)
    n = len(credit)
    rows = np.arange(n)
    observed = float(credit[rows, rows].mean())
    bar = observed - 1e-9

    def reached(assignments: np.ndarray) -> int:
        return int((credit[rows, assignments].mean(axis=1) >= bar).sum())

    labels = list(groups) if groups is not None else [""] * n
    if len(labels) != n:
        raise MilpError(f"owner_permutation_p: {len(labels)} group labels for {n} users")
    blocks = [np.flatnonzero(np.array(labels) == g) for g in sorted(set(labels))]
    if len(blocks) == 1 and n <= exact_users:
        every = np.array(list(all_permutations(range(n))))
        return PermutationP(observed, reached(every) / len(every), len(every), True, None)
    rng = np.random.default_rng(seed)
    b = 0
    chunk = max(1, _CHUNK_CELLS // n)
    for start in range(0, permutations, chunk):
        count = min(chunk, permutations - start)
        drawn = np.tile(rows, (count, 1))
        for block in blocks:  # each group's owners shuffled among themselves
            drawn[:, block] = rng.permuted(np.tile(block, (count, 1)), axis=1)
        b += reached(drawn)
    return PermutationP(observed, (b + 1) / (permutations + 1), permutations, False, seed)


def summarize_attribution(
    users: Sequence[str],
    queries: Sequence[tuple[str, str]],
    scores: dict[str, list[float]],
    *,
    permutations: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Owner accuracy, ranks, the NLL matrices and the per-user top-1's permutation p-value
    (`owner_permutation_p` with `permutations` and `seed`) from per-query scores; `scores`
    holds one row per user in `users` (keyed by user id) and optionally TASK_MEMORY /
    NO_MEMORY."""
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
        # Whether top-1 above chance is more than luck, against owner labels shuffled
        # within each id namespace (a play's characters among themselves).
        "per_user_top1_permutation": asdict(
            owner_permutation_p(
                user_nll[:n].T,
                permutations=permutations,
                seed=seed,
                groups=[namespace(u) for u in users],
            )
        ),
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
    test = result.get("per_user_top1_permutation")
    if test:  # a stored summary may lack it
        how = "exact" if test["exact"] else f"{test['permutations']:,} random"
        lines.append(
            f"  per-user top-1 above chance: permutation p {test['p']:.4g} "
            f"({how} owner assignments)"
        )
    for key, name in (("own_beats_no_memory", NO_MEMORY), ("own_beats_task_memory", TASK_MEMORY)):
        if result.get(key):
            lines.append(f"  own memory beats {name}: {result[key]['users']}/{result[key]['of']}")
    lines.append("  mean NLL: " + ", ".join(f"{k} {v:.4f}" for k, v in result["mean_nll"].items()))
    return "\n".join(lines)
