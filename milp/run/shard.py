"""Users sharded across processes and nodes: each process trains its own share of users.

Per-user memories share no trainable weight, so there is nothing to all-reduce: wrapping
the model in DDP would only broadcast rank 0's fresh adapters over everyone else's and
exchange zero gradients. What scale-out needs from the distributed stack is the launch
and the topology, and that comes from existing engines:

    torchrun --nproc_per_node 4 -m milp.train ... hydra.run.dir=RUN        # one node
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m milp.train ... hydra.run.dir=RUN     # several nodes
    srun --ntasks-per-node 8 python -m milp.train ... hydra.run.dir=RUN    # SLURM

Rank, local rank and world size are read through Lightning's cluster environments
(`TorchElasticEnvironment` for torchrun, `SLURMEnvironment` for srun), the same ones
Lightning's DDP strategy uses. Users are dealt to ranks longest-history-first onto the
least-loaded rank (deterministic, so every rank computes the same assignment); each rank
pins its own GPU (`cuda:<local rank>`) and runs the ordinary injector on
its users, writing into the shared run directory (`hydra.run.dir` must be the same on
all ranks: a shared file system across nodes). At the end the ranks meet once in a
process group (gloo; initialized only then, so that no collective can run while ranks
train different users) and rank 0 writes `predictions.jsonl` / `metrics.json` for all
users. A user's adapters do not depend on which rank trained it (the seed is per user).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from omegaconf import DictConfig, open_dict

from milp.data.users import User

log = logging.getLogger("milp")

# How long the first rank to finish waits for the others at the end.
FINAL_BARRIER_TIMEOUT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class Shard:
    """This process's place among the processes of a run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    main_address: str | None = None
    main_port: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def users(self, users: Sequence[User], batch_size: int = 8) -> list[User]:
        """This rank's users: largest histories first, each to the least-loaded rank."""
        if not self.distributed:
            return list(users)
        load = [0] * self.world_size
        mine: set[str] = set()
        order = sorted(users, key=lambda u: (-len(u.history), u.user_id))
        for user in order:
            rank = min(range(self.world_size), key=lambda r: (load[r], r))
            load[rank] += -(-len(user.history) // batch_size) + 1  # steps, plus overhead
            if rank == self.rank:
                mine.add(user.user_id)
        log.info(
            "shard: rank %d of %d takes %d of %d users",
            self.rank,
            self.world_size,
            len(mine),
            len(users),
        )
        return [u for u in users if u.user_id in mine]  # keep the data's order

    def pin_device(self, cfg: DictConfig) -> None:
        """Train on `cuda:<local rank>` (a Trainer's `devices=1` would pick cuda:0)."""
        accelerator = str(cfg.trainer.get("accelerator", "auto"))
        wants_gpu = accelerator in ("gpu", "cuda") or (
            accelerator == "auto" and torch.cuda.is_available()
        )
        if self.distributed and wants_gpu:
            with open_dict(cfg):
                cfg.trainer.devices = [self.local_rank]

    def wait_for_all(self) -> None:
        """Block until every rank is done with its users (no-op in a single process)."""
        if not self.distributed:
            return
        os.environ.setdefault("MASTER_ADDR", self.main_address or "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(self.main_port or 29500))
        os.environ.setdefault("RANK", str(self.rank))
        os.environ.setdefault("WORLD_SIZE", str(self.world_size))
        dist.init_process_group("gloo", timeout=FINAL_BARRIER_TIMEOUT)
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def current_shard() -> Shard:
    """This process's shard, from the launcher's environment (single process otherwise)."""
    for environment_cls in (TorchElasticEnvironment, SLURMEnvironment):
        if environment_cls.detect():
            env = environment_cls()
            if env.world_size() > 1:
                return Shard(
                    rank=env.global_rank(),
                    local_rank=env.local_rank(),
                    world_size=env.world_size(),
                    main_address=env.main_address,
                    main_port=env.main_port,
                )
    return Shard()
