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
from omegaconf import DictConfig

from milp.errors import run_command
from milp.evaluation.attribution import attribute, plan_attribution
from milp.evaluation.attribution_stats import format_attribution
from milp.memory.space import place_memory
from milp.models.hf import model_identity
from milp.run.assemble import load_base, make_injector, reopen_run
from milp.run.store import RunStore, attribution_files, run_lock


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Attribution for a stored run, with the run's own model, data and memory settings."""
    store = Path(cfg.store)
    stored = reopen_run(store, cfg.paths)
    datamodule, memory = stored.datamodule, stored.memory
    plan = plan_attribution(  # checked before the model loads
        stored.config,
        datamodule.users,
        task_memory=cfg.task_memory,
        task_items=cfg.task_items,
        batch_size=cfg.batch_size,
        task_lr=cfg.task_lr,
        key="attribute",
    )
    base = load_base(stored.config.model, datamodule, cfg.device)
    placement = place_memory(memory, base.model)
    injector = make_injector(stored.config, base, memory, placement, datamodule)
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
        print("outputs: {}, {}".format(*attribution_files(store)))
    return summary


@hydra.main(config_path="../conf", config_name="attribute", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra entrypoint; user errors print as one line."""
    run_command(lambda: run(cfg))


if __name__ == "__main__":
    main()
