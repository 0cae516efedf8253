"""`python -m milp.train`: inject each user's memory, answer their queries, report metrics.

For every user of the split, the injector (`conf/injection`) trains fresh memory modules
on the user's history inside the frozen base model and answers the user's queries; this
page stores each user as soon as it is done (adapters, then the result record) and
reports. The run returns the objective (validation ROUGE-L by default), so a Hydra
sweeper can search the memory configuration. `memory=none` runs the same loop with no
memory: the zero-shot baseline.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from milp.data.users import User
from milp.errors import MilpError, run_command
from milp.evaluation.attribution import (
    attribute,
    train_task_memory,
)
from milp.evaluation.attribution_stats import format_attribution
from milp.evaluation.report import average, format_table, summarize, table_rows
from milp.inject import TrainedUser
from milp.inject.injector import Injector
from milp.memory.adapters import (
    adapter_config,
    memory_digest,
    memory_info,
    save_memory,
    verify_memory,
)
from milp.memory.space import MemoryConfig, MemoryPlacement
from milp.models.hf import BaseModel
from milp.run.assemble import Run, assemble_run
from milp.run.prune import Pruner
from milp.run.shard import Shard, current_shard
from milp.run.store import RunStore, run_lock

log = logging.getLogger("milp")


def store_user(
    store: RunStore,
    trained: TrainedUser,
    memory: MemoryConfig,
    placement: MemoryPlacement | None,
    base: BaseModel,
    inputs: dict[str, Any],
) -> dict[str, Any]:
    """Save a finished user's memory, then its result record (written last: the marker
    that the user is done) with the hashes of its `inputs` and of the memory's files as
    written; returns the record."""
    store.begin()
    files = None
    if trained.memory is not None:
        info = memory_info(memory, placement) | {"user_id": trained.user.user_id}
        config = adapter_config(memory, placement, base.model)
        directory = save_memory(store.adapter_dir(trained.user), trained.memory, config, info)
        files = verify_memory(directory)
    result = trained.record() | {"inputs": inputs, "memory_sha256": files}
    store.save_result(result)
    return result


def users_inputs(
    store: RunStore,
    injector: Injector,
    users: list[User],
    data: dict[str, str],
    start: Path | None = None,
) -> dict[str, dict]:
    """Each user's inputs as its result record stores them (`RunStore.inputs`): `data`,
    the users' hashes as trained (after a control run replaced histories), and the memory
    each starts from (`start` for those without their own stored one)."""
    digests: dict[Path, str] = {}
    inputs = {}
    for user in users:
        first = injector.stored_memory(user, start)
        if first is not None and first not in digests:
            digests[first] = memory_digest(first)
        inputs[user.user_id] = store.inputs(user, data[user.user_id], digests.get(first))
    return inputs


def run(cfg: DictConfig, held: ExitStack) -> float | None:
    """Run memory injection over all users of the split; return the objective. The run
    directory's lock is entered on `held`, which the caller closes when the run ends."""
    output_dir = HydraConfig.get().runtime.output_dir
    parts = assemble_run(cfg)  # everything built and checked before anything is written
    shard = current_shard()  # under torchrun/srun each process takes its share of users
    held.enter_context(run_lock(output_dir, shard.rank, shard.world_size))  # first write
    store = RunStore(output_dir, parts.fingerprint)
    if shard.world_size == 1:  # alone in the run directory: a killed run's temporaries go
        store.remove_leftovers()
    shard.pin_device(cfg)
    logger = instantiate(cfg.logger) if cfg.get("logger") and shard.is_main else None
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    start = task_start(parts, store, shard)
    done, pruner = train_users(cfg, parts, store, shard, logger, start)
    shard.wait_for_all()
    if not shard.is_main:
        return None
    return report(cfg, parts, store, logger, done, pruner)


def summary_of(cfg: DictConfig, parts: Run, results: list[dict]) -> dict:
    """The run's metrics.json over `results` (the users finished so far)."""
    datamodule = parts.datamodule
    return summarize(
        results,
        data=datamodule.name,
        data_path=datamodule.path,
        data_source=datamodule.source,
        gold_in_history=datamodule.gold_in_history,
        prompt_fit=datamodule.prompt_fit,
        split=cfg.split,
        objective=cfg.objective,
        memory_enabled=parts.memory.enabled,
    )


def task_start(parts: Run, store: RunStore, shard: Shard) -> Path | None:
    """For `memory.init=task`, the task memory every user starts from (trained now, or
    reused when stored from the same inputs); None otherwise."""
    if parts.task_start is None:
        return None
    if shard.world_size > 1:
        raise MilpError("memory.init=task runs in one process (train the task memory once)")
    store.begin()
    start, info = train_task_memory(
        parts.task_start,
        parts.injector,
        parts.base,
        parts.memory,
        parts.placement,
        parts.datamodule.users,
        store.root,
        store.run_hash,
    )
    log.info("memory.init=task: every user starts from %s (%s)", start, info)
    return start


def train_users(
    cfg: DictConfig, parts: Run, store: RunStore, shard: Shard, logger: Any, start: Path | None
) -> tuple[dict[str, dict], Pruner | None]:
    """Train and answer this process's users, each stored as soon as it is done; users
    whose stored result still holds are reused. Returns their results by id and the
    pruner (a search trial's, or None)."""
    users = shard.users(parts.datamodule.users, parts.datamodule.batch_size)
    # A search trial with pruning (milp/run/prune.py) takes its users in a fixed, seeded order
    # and stops after the first user at which it trails the completed trials.
    pruner = Pruner.from_config(
        cfg.get("prune_file"),
        lambda results: (average(results, "memory") or {}).get(cfg.objective),
        store.root,
        shard.world_size,
    )
    users = pruner.order(users) if pruner else users
    inputs = users_inputs(store, parts.injector, users, parts.data_hashes, start)
    reused = {u.user_id: store.reusable(u, inputs[u.user_id]) for u in users}
    done = {user_id: result for user_id, result in reused.items() if result is not None}
    todo = [u for u in users if u.user_id not in done]
    if pruner and pruner.should_stop(done):  # a resumed trial that had stopped already
        todo = []
    progress = tqdm(total=len(users), initial=len(done), desc="users", unit="user")
    try:
        trained_users = parts.injector.run(todo, start=start, report=progress.set_postfix_str)
        for index, trained in enumerate(trained_users, start=len(done)):
            user_inputs = inputs[trained.user.user_id]
            result = store_user(
                store, trained, parts.memory, parts.placement, parts.base, user_inputs
            )
            done[trained.user.user_id] = result
            progress.update()
            if logger is not None and result["memory"]:
                logger.log_metrics(
                    {f"user/{k}": v for k, v in result["memory"].items()}, step=index
                )
            if shard.is_main:
                results = [done[u.user_id] for u in users if u.user_id in done]
                store.write_outputs(results, summary_of(cfg, parts, results))
            if pruner and pruner.should_stop(done):
                break
    finally:  # closed before any error line is printed
        progress.close()
    return done, pruner


def report(
    cfg: DictConfig,
    parts: Run,
    store: RunStore,
    logger: Any,
    done: dict[str, dict],
    pruner: Pruner | None,
) -> float | None:
    """Gather every user's result (all processes'), add attribution where on, write
    metrics.json, print the table and return the objective."""
    users = parts.datamodule.users
    if pruner:  # a stopped trial's objective is over the users it evaluated
        users = [u for u in users if u.user_id in pruner.evaluated]
    missing = [u.user_id for u in users if u.user_id not in done and not store.is_done(u)]
    if missing:
        raise MilpError(
            f"{len(missing)} user(s) have no results in {store.root} (e.g. {missing[0]}): "
            "all processes of a run must share one hydra.run.dir"
        )
    results = [done.get(u.user_id) or store.load_result(u) for u in users]
    summary = summary_of(cfg, parts, results) | (pruner.summary() if pruner else {})
    if parts.attribution is not None:  # every user's memory on every user's queries
        summary["attribution"] = attribute(
            parts.attribution,
            injector=parts.injector,
            base=parts.base,
            datamodule=parts.datamodule,
            memory=parts.memory,
            placement=parts.placement,
            users=users,
            run_dir=store.root,
            run_hash=store.run_hash,
        )
    store.write_outputs(results, summary)
    datamodule = parts.datamodule
    rows = table_rows(summary, parts.memory, datamodule.retrieval_k)
    print(f"\n{datamodule.name} / split {cfg.split} / {len(users)} users\n{format_table(rows)}")
    if summary.get("attribution"):
        print(format_attribution(summary["attribution"]))
    print(f"outputs: {store.root}")
    if logger is not None:
        flat = {f"{split}/{k}": v for split, m in rows.items() for k, v in (m or {}).items()}
        logger.log_metrics(flat | {"objective": summary["objective"] or 0.0})
        logger.finalize("success")
    return summary["objective"]


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Hydra entrypoint; user errors print as one line (single runs) or fail the trial."""

    def body() -> float | None:
        with ExitStack() as held:
            return run(cfg, held)

    return run_command(body, reraise=HydraConfig.get().mode == RunMode.MULTIRUN)


if __name__ == "__main__":
    main()
