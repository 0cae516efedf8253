"""Incremental memory: continue users' memories from a stored run (`+memory.resume_from`).

When a user gets new history, their memory need not be retrained from scratch: with
`+memory.resume_from=<run dir or its adapters/ dir>`, every user that has a memory there
starts from it (all its modules, trainable) and trains on the history the data gives
(`trainer.max_epochs` over it, fresh AdamW moments: peft adapters carry no optimizer
state); users without one start fresh. The stored run is only read: the new memories
are written to the new run's directory, each atomically, so a crash during the update
leaves the old memories exactly as they were (and the new run resumes like any run).
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
from torch import nn

from milp.data.users import User
from milp.errors import MilpError
from milp.memory import MemoryConfig, inject_memory, load_memory, place_memory
from milp.store import adapters_root

RESUME_KEY = "resume_from"


def split_memory_node(node: DictConfig) -> tuple[DictConfig, str | None]:
    """The `memory` config without `resume_from` (for MemoryConfig), and that path."""
    resume = node.get(RESUME_KEY)
    if RESUME_KEY not in node:
        return node, None
    rest = OmegaConf.masked_copy(node, [k for k in node if k != RESUME_KEY])
    return rest, (None if resume in (None, "") else str(resume))


class StoredMemories:
    """The users' memories of an earlier run, found by user."""

    def __init__(self, path: str | Path, memory: MemoryConfig, model: nn.Module) -> None:
        self.root = adapters_root(path, "memory.resume_from")
        if not memory.enabled:
            raise MilpError("memory.resume_from needs memory (num_loras >= 1)")
        self.memory = memory
        self.placement = place_memory(memory, model)

    def find(self, user: User) -> Path | None:
        """The user's stored memory directory, checked against the memory config."""
        directory = self.root / user.slug
        index = directory / "memory.json"
        if not index.is_file():
            return None
        stored = json.loads(index.read_text())
        config = stored.get("config", {})
        wanted = {
            "num_loras": self.memory.num_loras,
            "rank": self.memory.rank,
            "alpha": float(self.memory.alpha),
            "layers": self.placement.layers,
            "modules": sorted(self.placement.modules),
        }
        found = {
            "num_loras": len(stored.get("adapters", [])),
            "rank": config.get("rank"),
            "alpha": float(config["alpha"]) if "alpha" in config else None,
            "layers": stored.get("layers"),
            "modules": sorted(stored["modules"]) if "modules" in stored else None,
        }
        for key, value in wanted.items():
            if found[key] is not None and found[key] != value:
                raise MilpError(
                    f"memory.resume_from: {directory} has {key}={found[key]}, this run has "
                    f"{key}={value}; a memory can only continue with the same shape"
                )
        return directory


def start_memory(model: nn.Module, memory: MemoryConfig, stored: Path | None) -> PeftModel:
    """Fresh memory modules (`inject_memory`), or the stored ones, loaded trainable."""
    if stored is None:
        return inject_memory(model, memory)
    return load_memory(model, stored, trainable=True)
