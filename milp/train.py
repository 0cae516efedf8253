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

from milp.adapters import adapter_config, memory_digest, memory_info, save_memory, verify_memory
from milp.assemble import make_injector
from milp.attribution import (
    attribute,
    plan_attribution,
    plan_from_train_config,
    pooled_history,
    task_items,
    train_task_memory,
)
from milp.attribution_stats import format_attribution
from milp.build import build
from milp.data.controls import check_history_of, pooled_histories, swapped_histories
from milp.data.datamodule import UserDataModule
from milp.data.users import User, user_hash
from milp.errors import MilpError, exit_with, os_fault
from milp.inject import Injector, TrainedUser, quiet_lightning
from milp.inject.fast import FastPath
from milp.memory import MemoryConfig, MemoryPlacement, place_memory
from milp.metrics import OBJECTIVE_NAMES
from milp.models.hf import BaseModel, model_identity
from milp.prune import Pruner
from milp.report import average, format_table, summarize, table_rows
from milp.settings import check_train_settings
from milp.shard import current_shard
from milp.store import RunStore, config_fingerprint, run_fingerprint, run_lock

log = logging.getLogger("milp")

# Settings that do not change a user's results, left out of the run's fingerprint.
VOLATILE_KEYS = ("logger", "paths", "callbacks", "prune_file", "attribution")


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


def plan_task_start(cfg: DictConfig, datamodule: UserDataModule, memory: MemoryConfig):
    """For `memory.init=task`, the train-split users the task memory pools (checked before
    anything trains; sized like the attribution's task memory, which is then the same
    one); None otherwise."""
    if not memory.enabled or memory.init != "task" or memory.trained_in:
        return None
    settings = cfg.get("attribution") or {}
    try:
        return plan_attribution(
            cfg,
            datamodule.users,
            task_memory=True,
            task_items=settings.get("task_items"),
            batch_size=None,
            task_lr=settings.get("task_lr"),
        )
    except MilpError as err:
        raise MilpError(f"memory.init=task: {err}") from None


def assign_histories(cfg: DictConfig, datamodule: UserDataModule, history_of: str) -> None:
    """Give every user the history a control run trains their memory on
    (`milp/data/controls.py`); `own` leaves the users as they are."""
    if history_of == "swapped":
        datamodule.users = swapped_histories(datamodule.users)
    elif history_of == "pooled_train":
        settings = cfg.get("attribution") or {}
        try:
            pool = plan_attribution(
                cfg,
                datamodule.users,
                task_memory=True,
                task_items=settings.get("task_items"),
                batch_size=None,
            )
        except MilpError as err:
            raise MilpError(f"history_of=pooled_train: {err}") from None
        # After the items the task memory trains on, so the control sees new task data.
        skip = task_items(pool, datamodule.users)
        need = max(len(u.history) for u in datamodule.users)
        items = pooled_history(pool.task_users, skip + need)
        datamodule.users = pooled_histories(datamodule.users, items, skip)


def run(cfg: DictConfig, held: ExitStack) -> float | None:
    """Run memory injection over all users of the split; return the objective. The run
    directory's lock is entered on `held`, which the caller closes when the run ends."""
    output_dir = HydraConfig.get().runtime.output_dir
    if cfg.objective not in OBJECTIVE_NAMES:
        raise MilpError(f"objective: {cfg.objective!r} is not one of {', '.join(OBJECTIVE_NAMES)}")
    # Everything is built and validated before the first user trains.
    FastPath.from_config(cfg.injection.get("fast"))  # before the model loads
    memory: MemoryConfig = build(cfg.memory)
    check_train_settings(cfg, memory)
    history_of = check_history_of(cfg.get("history_of", "own"))
    if history_of != "own" and not memory.enabled:
        raise MilpError(f"history_of={history_of}: a control of the memory needs a memory")
    if memory.trained_in and (cfg.get("attribution") or {}).get("enabled"):
        raise MilpError(
            "memory.trained_in: attribution trains a task memory and scores the run's own "
            "memories (set attribution.enabled=false)"
        )
    datamodule: UserDataModule = build(cfg.data)
    assign_histories(cfg, datamodule, history_of)
    base: BaseModel = build(cfg.model)
    datamodule.attach_tokenizer(base.tokenizer)
    placement = place_memory(memory, base.model) if memory.enabled else None
    if placement is not None:
        log.info(
            "memory: %d module(s) of rank %d on layers %s, modules %s",
            memory.num_loras,
            memory.rank,
            placement.layers,
            placement.modules,
        )
    with quiet_lightning():
        instantiate(cfg.trainer, logger=False)  # fails now, not after the first user
    injector = make_injector(cfg, base, memory, placement, datamodule)
    for user in datamodule.users:  # every resume_from / trained_in memory, before training
        injector.stored_memory(user)
    attribution = plan_from_train_config(cfg, datamodule, memory)  # checked before training
    if attribution is not None and history_of != "own":
        raise MilpError(
            f"history_of={history_of}: attribution needs every user's own memory "
            "(set attribution.enabled=false)"
        )
    task_start = plan_task_start(cfg, datamodule, memory)

    fingerprint_cfg = {
        k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in VOLATILE_KEYS
    }
    if task_start is not None:  # the task memory decides where users start
        fingerprint_cfg["task_start_items"] = task_start.task_items
        fingerprint_cfg["task_start_lr"] = task_start.task_lr
    data_hashes = {u.user_id: user_hash(u) for u in datamodule.users}  # as trained
    fingerprint = {
        "config": config_fingerprint(fingerprint_cfg),
        "model": model_identity(base, cfg.paths.cache_dir),
        "data": config_fingerprint(data_hashes),
    }
    if injector.trained_root is not None:
        made_with = run_fingerprint(injector.trained_root.parent)
        if made_with.get("model") != fingerprint["model"]:
            raise MilpError(
                f"memory.trained_in: {injector.trained_root.parent} was trained on another "
                "base model (or is not a run directory) than this run's"
            )
    # Under torchrun/srun each process takes its share of the users (milp/shard.py).
    shard = current_shard()
    held.enter_context(run_lock(output_dir, shard.rank, shard.world_size))  # first write
    store = RunStore(output_dir, fingerprint)
    if shard.world_size == 1:  # alone in the run directory: a killed run's temporaries go
        store.remove_leftovers()
    shard.pin_device(cfg)
    logger = instantiate(cfg.logger) if cfg.get("logger") and shard.is_main else None
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    def summary_of(results: list[dict]) -> dict:
        return summarize(
            results,
            data=datamodule.name,
            data_path=datamodule.path,
            data_source=datamodule.source,
            gold_in_history=datamodule.gold_in_history,
            prompt_fit=datamodule.prompt_fit,
            split=cfg.split,
            objective=cfg.objective,
            memory_enabled=memory.enabled,
        )

    start = None  # the stored memory users start from (the task memory)
    if task_start is not None:
        if shard.world_size > 1:
            raise MilpError("memory.init=task runs in one process (train the task memory once)")
        store.begin()
        start, info = train_task_memory(
            task_start,
            injector,
            base,
            memory,
            placement,
            datamodule.users,
            Path(output_dir),
            store.run_hash,
        )
        log.info("memory.init=task: every user starts from %s (%s)", start, info)

    users = shard.users(datamodule.users, datamodule.batch_size)
    # A search trial with pruning (milp/prune.py) takes its users in a fixed, seeded order
    # and stops after the first user at which it trails the completed trials.
    pruner = Pruner.from_config(
        cfg.get("prune_file"),
        lambda results: (average(results, "memory") or {}).get(cfg.objective),
        output_dir,
        shard.world_size,
    )
    users = pruner.order(users) if pruner else users
    inputs = users_inputs(store, injector, users, data_hashes, start)
    reused = {u.user_id: store.reusable(u, inputs[u.user_id]) for u in users}
    done = {user_id: result for user_id, result in reused.items() if result is not None}
    todo = [u for u in users if u.user_id not in done]
    if pruner and pruner.should_stop(done):  # a resumed trial that had stopped already
        todo = []
    progress = tqdm(total=len(users), initial=len(done), desc="users", unit="user")
    try:
        trained_users = injector.run(todo, start=start, report=progress.set_postfix_str)
        for index, trained in enumerate(trained_users, start=len(done)):
            user = trained.user
            result = store_user(store, trained, memory, placement, base, inputs[user.user_id])
            done[user.user_id] = result
            progress.update()
            if logger is not None and result["memory"]:
                logger.log_metrics(
                    {f"user/{k}": v for k, v in result["memory"].items()}, step=index
                )
            if shard.is_main:
                results = [done[u.user_id] for u in users if u.user_id in done]
                store.write_outputs(results, summary_of(results))
            if pruner and pruner.should_stop(done):
                break
    finally:  # closed before any error line is printed
        progress.close()

    shard.wait_for_all()
    if not shard.is_main:
        return None
    users = datamodule.users
    if pruner:  # a stopped trial's objective is over the users it evaluated
        users = [u for u in users if u.user_id in pruner.evaluated]
    missing = [u.user_id for u in users if u.user_id not in done and not store.is_done(u)]
    if missing:
        raise MilpError(
            f"{len(missing)} user(s) have no results in {output_dir} (e.g. {missing[0]}): "
            "all processes of a run must share one hydra.run.dir"
        )
    results = [done.get(u.user_id) or store.load_result(u) for u in users]
    summary = summary_of(results) | (pruner.summary() if pruner else {})
    if attribution is not None:  # every user's memory on every user's queries
        summary["attribution"] = attribute(
            attribution,
            injector=injector,
            base=base,
            datamodule=datamodule,
            memory=memory,
            placement=placement,
            users=users,
            run_dir=output_dir,
            run_hash=store.run_hash,
        )
    store.write_outputs(results, summary)
    rows = table_rows(summary, memory, datamodule.retrieval_k)
    print(f"\n{datamodule.name} / split {cfg.split} / {len(users)} users\n{format_table(rows)}")
    if summary.get("attribution"):
        print(format_attribution(summary["attribution"]))
    print(f"outputs: {output_dir}")
    if logger is not None:
        flat = {f"{split}/{k}": v for split, m in rows.items() for k, v in (m or {}).items()}
        logger.log_metrics(flat | {"objective": summary["objective"] or 0.0})
        logger.finalize("success")
    return summary["objective"]


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Hydra entrypoint; user errors print as one line (single runs) or fail the trial."""
    try:
        try:
            with ExitStack() as held:
                return run(cfg, held)
        except OSError as err:  # a run directory that cannot be written (read-only, full)
            raise os_fault(err) from err
    except MilpError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper records the trial as failed
        exit_with(err)


if __name__ == "__main__":
    main()
