"""`python -m milp.train`: inject each user's memory, answer their queries, report metrics.

For every user of the split: fresh memory modules are injected into the frozen base
model, trained on that user's history, used to answer the user's queries, saved, and
removed again. The run returns the objective (validation ROUGE-L by default), so a
Hydra sweeper can search the memory configuration. `memory=none` runs the same loop
with no memory: the zero-shot baseline.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from milp.batched_train import batched_results
from milp.data.datamodule import UserDataModule
from milp.data.users import User, user_seed
from milp.errors import MilpError
from milp.incremental import StoredMemories, split_memory_node, start_memory
from milp.memory import (
    MemoryConfig,
    memory_info,
    place_memory,
    remove_memory,
    save_memory,
    trainable_parameters,
)
from milp.metrics import METRIC_NAMES, tokenize
from milp.models.hf import BaseModel
from milp.module import MemoryInjectionModule
from milp.prune import Pruner  # PRUNE
from milp.shard import current_shard
from milp.store import RunStore, config_fingerprint

log = logging.getLogger("milp")

# Settings that do not change a user's results, left out of the run's fingerprint.
VOLATILE_KEYS = ("logger", "paths", "callbacks", "prune_file")  # PRUNE: + prune_file


def build(node: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, letting our one-line errors through unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, MilpError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def average(results: list[dict], key: str) -> dict[str, float] | None:
    """Example-weighted mean of per-user metrics (LaMP averages over examples)."""
    scored = [r[key] for r in results if r.get(key)]
    total = sum(m["examples"] for m in scored)
    if not total:
        return None
    mean = {n: sum(m[n] * m["examples"] for m in scored) / total for n in METRIC_NAMES}
    return mean | {"examples": total, "users": len(scored)}


def format_table(rows: dict[str, dict[str, float] | None]) -> str:
    """A plain-text table of methods x metrics, as printed at the end of a run."""
    header = (
        f"{'method':<26}{'ROUGE-1':>9}{'ROUGE-L':>9}{'persona-F1':>12}{'BLEU':>8}"
        f"{'users':>7}{'examples':>10}"
    )
    lines = [header, "-" * len(header)]
    for name, m in rows.items():
        if m:
            lines.append(
                f"{name:<26}{m['rouge1']:>9.4f}{m['rougeL']:>9.4f}{m['persona_f1']:>12.4f}"
                f"{m['bleu']:>8.4f}{m['users']:>7}{m['examples']:>10}"
            )
    return "\n".join(lines)


def train_user(
    cfg: DictConfig,
    base: BaseModel,
    memory: MemoryConfig,
    datamodule: UserDataModule,
    user: User,
    store: RunStore,
    stored: Path | None = None,
) -> dict[str, Any]:
    """Inject, train, answer and save one user's memory; return the user's result record.

    `stored`: the user's memory from an earlier run to continue from (memory.resume_from).
    """
    placement = place_memory(memory, base.model) if memory.enabled else None
    L.seed_everything(user_seed(cfg.seed, user.user_id), workers=True, verbose=False)
    started = time.perf_counter()
    model = start_memory(base.model, memory, stored) if memory.enabled else base.model
    try:
        module = MemoryInjectionModule(
            model,
            base.tokenizer,
            **cfg.optim,
            generation=OmegaConf.to_container(cfg.generation),
            compare_without_memory=cfg.compare_without_memory,
            history_tokens={
                user.user_id: {t for text in user.profile_texts for t in tokenize(text)}
            },
        )
        datamodule.select(user)
        callbacks = list(instantiate(cfg.callbacks).values()) if cfg.get("callbacks") else []
        trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks)
        train_loss = None
        if memory.enabled:
            trainer.fit(module, datamodule=datamodule)
            if trainer.interrupted:
                raise KeyboardInterrupt
            train_loss = float(trainer.callback_metrics.get("train/loss", torch.nan))
        train_seconds = time.perf_counter() - started
        trainer.test(module, datamodule=datamodule, verbose=False)
        if memory.enabled:
            info = memory_info(memory, placement) | {"user_id": user.user_id}
            save_memory(model, store.adapter_dir(user), info)
        return {
            "user_id": user.user_id,
            "history_size": len(user.history),
            "queries": len(user.queries),
            "trainable_parameters": trainable_parameters(model) if memory.enabled else 0,
            "train_loss": train_loss,
            "train_seconds": round(train_seconds, 3),
            "seconds": round(time.perf_counter() - started, 3),
            "memory": module.user_metrics(user.user_id, "memory"),
            "no_memory": module.user_metrics(user.user_id, "no_memory"),
            "predictions": module.predictions,
        }
    finally:
        if memory.enabled:
            # Hand the clean base model back for the next user, whatever happened.
            base.model = remove_memory(model)


def run(cfg: DictConfig) -> float | None:
    """Run memory injection over all users of the split; return the objective."""
    output_dir = HydraConfig.get().runtime.output_dir
    if cfg.objective not in METRIC_NAMES:
        raise MilpError(f"objective: {cfg.objective!r} is not one of {', '.join(METRIC_NAMES)}")
    # Validate everything before the first user trains: memory config, data, model.
    memory_node, resume_from = split_memory_node(cfg.memory)
    memory: MemoryConfig = build(memory_node)
    datamodule: UserDataModule = build(cfg.data)
    base: BaseModel = build(cfg.model)
    datamodule.attach_tokenizer(base.tokenizer)
    if memory.enabled:
        placement = place_memory(memory, base.model)
        log.info(
            "memory: %d module(s) of rank %d on layers %s, modules %s",
            memory.num_loras,
            memory.rank,
            placement.layers,
            placement.modules,
        )
    instantiate(cfg.trainer, logger=False)  # fails now, not after the first user
    resume = StoredMemories(resume_from, memory, base.model) if resume_from else None
    find_stored = resume.find if resume else (lambda user: None)
    users_per_batch = int(cfg.get("injection", {}).get("users_per_batch", 1))

    fingerprint_cfg = {
        k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in VOLATILE_KEYS
    }
    store = RunStore(output_dir, config_fingerprint(fingerprint_cfg))
    # Under torchrun/srun each process takes its share of the users (milp/shard.py).
    shard = current_shard()
    shard.pin_device(cfg)
    logger = instantiate(cfg.logger) if cfg.get("logger") and shard.is_main else None
    if logger is not None:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    users = shard.users(datamodule.users, datamodule.batch_size)
    # PRUNE (milp/prune.py): a search trial may stop after any user, users in a fixed order.
    running = lambda rs: (average(rs, "memory") or {}).get(cfg.objective)  # noqa: E731
    pruner = Pruner.from_config(cfg.get("prune_file"), running, output_dir, shard.world_size)
    users = pruner.order(users) if pruner else users  # PRUNE
    done = {u.user_id: store.load_result(u) for u in users if store.is_done(u)}
    todo = [u for u in users if u.user_id not in done]
    todo = [] if pruner and pruner.should_stop(done) else todo  # PRUNE: resumed, stopped
    if memory.enabled and users_per_batch > 1:  # many users per forward/backward pass
        stream = batched_results(cfg, base, memory, datamodule, todo, store, find_stored)
    else:
        stream = (train_user(cfg, base, memory, datamodule, u, store, find_stored(u)) for u in todo)
    progress = tqdm(total=len(users), initial=len(done), desc="users", unit="user")
    for index, result in enumerate(stream, start=len(done)):
        store.save_result(result)
        done[result["user_id"]] = result
        progress.update()
        progress.set_postfix_str(f"user {result['user_id']}")
        if logger is not None and result["memory"]:
            logger.log_metrics({f"user/{k}": v for k, v in result["memory"].items()}, step=index)
        if shard.is_main:
            results = [done[u.user_id] for u in users if u.user_id in done]
            store.write_outputs(results, summarize(cfg, memory, results, datamodule))
        if pruner and pruner.should_stop(done):  # PRUNE
            break
    progress.close()

    shard.wait_for_all()
    if not shard.is_main:
        return None
    users = datamodule.users
    if pruner:  # PRUNE: a stopped trial's objective is over the users it evaluated
        users = [u for u in users if u.user_id in pruner.evaluated]
    missing = [u.user_id for u in users if u.user_id not in done and not store.is_done(u)]
    if missing:
        raise MilpError(
            f"{len(missing)} user(s) have no results in {output_dir} (e.g. {missing[0]}): "
            "all processes of a run must share one hydra.run.dir"
        )
    results = [done.get(u.user_id) or store.load_result(u) for u in users]
    summary = summarize(cfg, memory, results, datamodule)
    summary |= pruner.summary() if pruner else {}  # PRUNE: pruned, users_evaluated
    store.write_outputs(results, summary)
    rows = {method_name(memory, datamodule.retrieval_k): summary["memory"]}
    if summary.get("no_memory"):
        rows["no memory (same users)"] = summary["no_memory"]
    print(f"\n{datamodule.name} / split {cfg.split} / {len(users)} users\n{format_table(rows)}")
    print(f"outputs: {output_dir}")
    if logger is not None:
        flat = {f"{split}/{k}": v for split, m in rows.items() for k, v in (m or {}).items()}
        logger.log_metrics(flat | {"objective": summary["objective"] or 0.0})
        logger.finalize("success")
    return summary["objective"]


def method_name(memory: MemoryConfig, retrieval_k: int) -> str:
    """How the main row of the results table is labelled."""
    name = "memory injection" if memory.enabled else "zero-shot (memory=none)"
    if retrieval_k:
        name = (
            f"memory + retrieval (k={retrieval_k})"
            if memory.enabled
            else f"retrieval (k={retrieval_k})"
        )
    return name


def summarize(cfg: DictConfig, memory: MemoryConfig, results: list[dict], datamodule) -> dict:
    """Overall metrics of the users finished so far, as written to metrics.json."""
    with_memory = average(results, "memory")
    return {
        "data": datamodule.name,
        "split": cfg.split,
        "users": len(results),
        "memory_enabled": memory.enabled,
        "objective_name": cfg.objective,
        "objective": with_memory[cfg.objective] if with_memory else None,
        "memory": with_memory,
        "no_memory": average(results, "no_memory"),
        "seconds": round(sum(r["seconds"] for r in results), 2),
        "per_user": {
            r["user_id"]: {k: r[k] for k in ("history_size", "memory", "no_memory", "seconds")}
            for r in results
        },
    }


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Hydra entrypoint; user errors print as one line (single runs) or fail the trial."""
    try:
        return run(cfg)
    except MilpError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper records the trial as failed
        print(f"milp: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
