"""`python -m milp.attribute store=RUN`: does a memory know its owner?

For the N users of a run that have a stored memory, every user's held-out queries with a
gold output are scored (the gold's mean token NLL, `milp.inject.answer.gold_nll`, on the
run's own prompts) under every user's memory, under no memory, and optionally under a
*task memory*: one memory trained like the users' memories, on histories pooled from the
train split's users (never the run's users). That separates adapting to the data set's
domain (any memory helps) from personalization (the owner's memory helps most).

The owner is picked as the memory with the lowest NLL, two ways: per user (the mean NLL
over the user's queries; `per_user`) and per query (`per_query`). Only the N users'
memories compete (the task memory and no memory are reported beside them). Ties, NLLs
within `TIE_TOLERANCE` nats of each other, are broken at random in expectation: an owner
tied with k-1 others for the lowest NLL gets credit 1/k, and its rank is the mean of the
tied ranks. N identical memories therefore give top-1 accuracy exactly 1/N (chance) and
mean rank exactly (N+1)/2.

Memories are served through the routed `MemoryBank` (as `milp.generate engine=routed`),
one memory at a time over all queries, so equal memories give bit-equal NLLs. Writes
`attribution.json` (summary and both NLL matrices) and `attribution.png` (heatmap) into
the run directory, and the task memory, a peft adapter, under `task_memory/`.

    python -m milp.attribute store=outputs/2026-01-01/12-00-00 task_memory=true
"""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, open_dict

from milp.adapters import (
    MEMORY_INDEX,
    adapter_config,
    memory_info,
    read_bank_weights,
    save_memory,
    stored_memory_config,
)
from milp.data.datamodule import QueryCollator, UserDataModule
from milp.data.users import HistoryPair, User
from milp.errors import MilpError
from milp.files import atomic_write_bytes, atomic_write_text
from milp.inject.answer import gold_nll, gold_targets
from milp.inject.bank import MemoryBank, memory_targets
from milp.memory import MemoryConfig, MemoryPlacement

log = logging.getLogger("milp")
TIE_TOLERANCE = 1e-6  # nats: NLLs this close count as a tie
TASK_MEMORY, NO_MEMORY = "task memory", "no memory"
TASK_USER = "__task__"  # the pooled train-split user the task memory is trained as


@dataclass
class AttributionPlan:
    """What an attribution run needs besides the run's model and memories, checked early:
    the train-split users a task memory pools (None: no task memory)."""

    task_users: list[User] | None
    task_items: int | None
    batch_size: int | None


def plan_attribution(
    cfg: DictConfig,
    test_users: Sequence[User],
    *,
    task_memory: bool,
    task_items: int | None,
    batch_size: int | None,
    key: str = "attribution",
) -> AttributionPlan:
    """Validate the settings (`key` names them in errors) and load the train split's users
    for a task memory, before anything trains."""
    for name, value in (("task_items", task_items), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise MilpError(f"{key}.{name} must be a positive integer or null, got {value!r}")
        if value is not None and value < 1:
            raise MilpError(f"{key}.{name} must be a positive integer or null, got {value}")
    if not isinstance(task_memory, bool):
        raise MilpError(f"{key}.task_memory must be true or false, got {task_memory!r}")
    if not task_memory:
        return AttributionPlan(None, task_items, batch_size)
    from milp.train import build  # the command's builder (milp.train imports this lazily)

    train_cfg = cfg.copy()
    with open_dict(train_cfg):
        train_cfg.split = "train"
    try:
        users = build(train_cfg.data).users
    except MilpError as err:
        raise MilpError(f"{key}.task_memory needs the train split's users: {err}") from None
    shared = sorted({u.user_id for u in users} & {u.user_id for u in test_users})
    if shared:
        raise MilpError(
            f"{key}.task_memory: the train split shares {len(shared)} user(s) with split "
            f"{cfg.split} (e.g. {shared[0]}); a task memory must not see the scored users"
        )
    return AttributionPlan(users, task_items, batch_size)


def plan_from_train_config(
    cfg: DictConfig, datamodule: UserDataModule, memory: MemoryConfig
) -> AttributionPlan | None:
    """The plan of `milp.train`'s attribution step (`attribution.*`), or None where it is
    off or the run has no memory to attribute."""
    settings = cfg.get("attribution")
    if not settings or not settings.get("enabled"):
        return None
    if not memory.enabled:
        log.info("attribution: skipped, the run has no memory")
        return None
    return plan_attribution(
        cfg,
        datamodule.users,
        task_memory=settings.get("task_memory", False),
        task_items=settings.get("task_items"),
        batch_size=settings.get("batch_size"),
    )


def pooled_history(users: Sequence[User], items: int) -> list[HistoryPair]:
    """Up to `items` history pairs drawn round-robin from the users (each user's most
    recent first), so that as many users as possible contribute."""
    queues = [list(reversed(u.history)) for u in users]
    pooled: list[HistoryPair] = []
    depth = 0
    while len(pooled) < items and any(depth < len(q) for q in queues):
        pooled += [q[depth] for q in queues if depth < len(q)][: items - len(pooled)]
        depth += 1
    return pooled


def train_task_memory(
    plan: AttributionPlan,
    injector: Any,
    base: Any,
    memory: MemoryConfig,
    placement: MemoryPlacement,
    test_users: Sequence[User],
    run_dir: Path,
) -> tuple[Path, dict]:
    """The task memory, trained by the run's own injector (same trainer, optimizer and
    seeding as the users' memories) and saved under `run_dir/task_memory`; a stored one
    made from the same users and items is reused. Default size: the scored users' mean
    history length, the budget one user's memory gets."""
    items = plan.task_items or max(1, round(np.mean([len(u.history) for u in test_users])))
    history = pooled_history(plan.task_users, items)
    info = {"train_users": [u.user_id for u in plan.task_users], "items": len(history)}
    directory = run_dir / "task_memory"
    index = directory / MEMORY_INDEX
    if index.is_file() and json.loads(index.read_text()).get("task") == info:
        return directory, info
    log.info("task memory: %d items from %d train users", len(history), len(plan.task_users))
    pooled = User(TASK_USER, history, [], [])
    trained = next(iter(injector.run([pooled])))
    record = memory_info(memory, placement) | {
        "user_id": TASK_USER,
        "task": info,
        "train_loss": trained.train_loss,
        "train_seconds": round(trained.train_seconds, 3),
    }
    save_memory(directory, trained.memory, adapter_config(memory, placement, base.model), record)
    return directory, info


def score_memories(
    model: torch.nn.Module,
    tokenizer: Any,
    datamodule: UserDataModule,
    users: Sequence[User],
    memories: dict[str, Path | None],
    batch_size: int,
) -> tuple[list[tuple[str, str]], dict[str, list[float]]]:
    """Every gold query of `users` scored under each memory (None: no memory); returns the
    queries as (user_id, query_id) and each memory's NLL per query."""
    requests = [(u.user_id, q) for u in users for q in u.queries if q.gold is not None]
    collate = QueryCollator(tokenizer, datamodule.format)
    batches = []
    for first in range(0, len(requests), batch_size):
        batch = collate(requests[first : first + batch_size])
        batches.append((batch, gold_targets(datamodule.format, tokenizer, batch["golds"])))
    stored = [p for p in memories.values() if p is not None]
    shape = stored_memory_config(stored[0]) if stored else None
    bank = targets = None
    if shape is not None:
        targets = memory_targets(model, shape)
        bank = MemoryBank(targets, 1, shape, device=next(model.parameters()).device)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    scores: dict[str, list[float]] = {}
    try:
        if bank is not None:
            bank.attach(model)
        for name, directory in memories.items():
            if directory is not None:
                bank.load_user(0, read_bank_weights(directory, targets, shape))
            values: list[float] = []
            for batch, golds in batches:
                slots = [0] * len(golds) if directory is not None else None
                if bank is None:
                    values += gold_nll(model, batch, golds, tokenizer.pad_token_id)
                else:
                    with bank.routing(slots):
                        values += gold_nll(model, batch, golds, tokenizer.pad_token_id)
            scores[name] = values
    finally:
        if bank is not None:
            bank.detach(model)
        for m, mode in modes.items():
            m.training = mode
    return [(user_id, q.id) for user_id, q in requests], scores


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


def attribute(
    plan: AttributionPlan,
    *,
    injector: Any,
    base: Any,
    datamodule: UserDataModule,
    memory: MemoryConfig,
    placement: MemoryPlacement | None,
    users: Sequence[User],
    run_dir: str | Path,
) -> dict[str, Any] | None:
    """Score, summarize and write attribution.json / attribution.png into `run_dir`;
    returns the summary (without the matrices), or None where fewer than 2 of `users`
    have a stored memory and a gold query."""
    run_dir = Path(run_dir)
    adapters = run_dir / "adapters"
    scored = [
        u
        for u in users
        if (adapters / u.slug / MEMORY_INDEX).is_file() and any(q.gold for q in u.queries)
    ]
    if len(scored) < 2:
        print(f"attribution: skipped ({len(scored)} user(s) with a stored memory and a gold)")
        return None
    memories: dict[str, Path | None] = {u.user_id: adapters / u.slug for u in scored}
    task = None
    if plan.task_users is not None:
        directory, task = train_task_memory(
            plan, injector, base, memory, placement, scored, run_dir
        )
        memories[TASK_MEMORY] = directory
    memories[NO_MEMORY] = None
    batch_size = plan.batch_size or datamodule.eval_batch_size
    queries, scores = score_memories(
        base.model, base.tokenizer, datamodule, scored, memories, batch_size
    )
    result = summarize_attribution([u.user_id for u in scored], queries, scores)
    if task is not None:
        result["task_memory"] = {"path": "task_memory"} | task
    atomic_write_text(run_dir / "attribution.json", json.dumps(result, indent=1))
    atomic_write_bytes(run_dir / "attribution.png", heatmap_png(result))
    return {k: v for k, v in result.items() if k != "matrix"}


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Attribution for a stored run, with the run's own model, data and memory settings."""
    from milp.generate import run_config
    from milp.memory import place_memory
    from milp.train import build, make_injector

    store = Path(cfg.store)
    run_cfg = run_config(store) if store.is_dir() else None
    if run_cfg is None:
        raise MilpError(f"store={store}: not a milp.train run directory (no .hydra/config.yaml)")
    with open_dict(run_cfg):
        run_cfg.paths = cfg.paths
    memory: MemoryConfig = build(run_cfg.memory)
    if not memory.enabled:
        raise MilpError(f"store={store}: the run has no memory (memory.num_loras=0)")
    datamodule: UserDataModule = build(run_cfg.data)
    plan = plan_attribution(
        run_cfg,
        datamodule.users,
        task_memory=cfg.task_memory,
        task_items=cfg.task_items,
        batch_size=cfg.batch_size,
        key="attribute",
    )
    base = build(run_cfg.model)
    if cfg.device:
        base.model.to(cfg.device)
    datamodule.attach_tokenizer(base.tokenizer)
    placement = place_memory(memory, base.model)
    injector = make_injector(run_cfg, base, memory, placement, datamodule)
    summary = attribute(
        plan,
        injector=injector,
        base=base,
        datamodule=datamodule,
        memory=memory,
        placement=placement,
        users=datamodule.users,
        run_dir=store,
    )
    if summary is not None:
        print(format_attribution(summary))
        print(f"outputs: {store / 'attribution.json'}, {store / 'attribution.png'}")
    return summary


@hydra.main(config_path="../conf", config_name="attribute", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entrypoint; user errors print as one line."""
    try:
        run(cfg)
    except MilpError as err:
        print(f"milp: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
