"""`python -m milp.attribute store=RUN`: does a memory know its owner? (the library side:
`milp/evaluation/attribution.py`)

Scores every stored memory of a finished `milp.train` run on every user's held-out
queries, with the run's own model, data and memory settings, optionally beside a task
memory trained on the train split's pooled users; writes `attribution.json` and
`attribution.png` into the run directory.

    python -m milp.attribute store=outputs/2026-01-01/12-00-00 task_memory=true
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, open_dict

from milp.data.datamodule import UserDataModule
from milp.errors import MilpError, run_command
from milp.evaluation.attribution import attribute, plan_attribution
from milp.evaluation.attribution_stats import format_attribution
from milp.memory.space import MemoryConfig, place_memory
from milp.models.hf import model_identity
from milp.run.assemble import make_injector
from milp.run.build import build
from milp.run.store import RunStore, run_config, run_lock


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Attribution for a stored run, with the run's own model, data and memory settings."""
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
        task_lr=cfg.task_lr,
        key="attribute",
    )
    base = build(run_cfg.model)
    if cfg.device:
        base.model.to(cfg.device)
    datamodule.attach_tokenizer(base.tokenizer)
    placement = place_memory(memory, base.model)
    injector = make_injector(run_cfg, base, memory, placement, datamodule)
    with run_lock(store):  # it writes into the run: never beside a run still writing there
        run_hash = RunStore.reopen(store, model_identity(base, cfg.paths.cache_dir)).run_hash
        summary = attribute(
            plan,
            injector=injector,
            base=base,
            datamodule=datamodule,
            memory=memory,
            placement=placement,
            users=datamodule.users,
            run_dir=store,
            run_hash=run_hash,
        )
    if summary is not None:
        print(format_attribution(summary))
        print(f"outputs: {store / 'attribution.json'}, {store / 'attribution.png'}")
    return summary


@hydra.main(config_path="../conf", config_name="attribute", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entrypoint; user errors print as one line."""
    run_command(lambda: run(cfg))


if __name__ == "__main__":
    main()
