"""The saved-memory format: the one place that writes, reads, checks and merges memories.

A user's memory is a directory of plain peft adapters plus an index:

    <user>/memory.json                           {"adapters": ["memory_0", ...], "config":
                                                  the MemoryConfig, "layers", "modules", ...}
    <user>/memory_<i>/adapter_config.json        a peft LoraConfig
    <user>/memory_<i>/adapter_model.safetensors  base_model.model.<path>.lora_{A,B}.weight

`memory.json` also lists the SHA-256 of every other file (`"files"`), and every reader
checks them first (`memory_names`): a corrupt or truncated memory is refused with one line
naming the file, never loaded. Each `memory_<i>` loads alone with
`PeftModel.from_pretrained`; `load_memory` loads them all, active together. Trained
weights are handed over as `ModuleStates` (adapter name -> peft state dict): the
injector takes them from its bank (`bank_module_states`), a live peft model gives them
with `peft_module_states`, and `save_memory` writes either the same way. Weights are
only ever read with safetensors.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from milp.data.users import user_slug
from milp.errors import MilpError
from milp.memory.space import (
    MEMORY_PREFIX,
    MemoryConfig,
    MemoryPlacement,
    Target,
    activate_memories,
    lora_config,
)
from milp.run.files import fault_point, file_sha256, replace_dir

if TYPE_CHECKING:  # the bank layout (milp/inject/bank.py), which imports nothing from here
    from milp.inject.bank import UserWeights

MEMORY_INDEX = "memory.json"
PEFT_PREFIX = "base_model.model."
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
FILES_KEY = "files"  # memory.json: {relative path: SHA-256} of the modules' files

# A user's memory in transit: adapter name -> its peft state dict.
ModuleStates = dict[str, dict[str, torch.Tensor]]


def memory_info(config: MemoryConfig, placement: MemoryPlacement) -> dict:
    """What memory.json records about how a memory was made."""
    return {"config": asdict(config), "layers": placement.layers, "modules": placement.modules}


def adapter_config(
    memory: MemoryConfig, placement: MemoryPlacement, model: nn.Module
) -> LoraConfig:
    """The peft config saved with each memory module, as `PeftModel.save_pretrained`
    writes it (`model`: the plain base model)."""
    config = lora_config(memory, placement)
    config.base_model_name_or_path = model.__dict__.get("name_or_path", None) or None
    config.inference_mode = True
    return config


def save_memory(
    directory: str | Path, states: ModuleStates, config: LoraConfig, info: dict
) -> Path:
    """Write a user's memory, replacing `directory` atomically (a crash while saving
    leaves the previous copy, if any, as it was). Equal memories are equal bytes: the
    files' hashes identify the memory."""
    # peft writes a set (target_modules) in the process's string-hash order: sorted, the
    # same memory saved by two processes hashes the same.
    config = copy.copy(config)
    for key, value in vars(config).items():
        if isinstance(value, set):
            setattr(config, key, sorted(value))
    with replace_dir(directory) as staging:
        for name, state in states.items():
            (staging / name).mkdir()
            config.save_pretrained(str(staging / name))
            tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
            save_file(tensors, str(staging / name / WEIGHTS_FILE), {"format": "pt"})
            fault_point(f"save_memory {name}")
        files = {
            f"{name}/{file}": file_sha256(staging / name / file)
            for name in states
            for file in (CONFIG_FILE, WEIGHTS_FILE)
        }
        index = {"adapters": list(states)} | info | {FILES_KEY: files}
        (staging / MEMORY_INDEX).write_text(json.dumps(index, indent=2))
    return Path(directory)


def is_saved_memory(directory: str | Path) -> bool:
    """Whether `directory` holds a saved memory (its index; `memory_names` checks it)."""
    return (Path(directory) / MEMORY_INDEX).is_file()


def memory_index(directory: str | Path) -> dict:
    """A saved memory's index (memory.json): its modules, shape, placement and files."""
    return _read_index(Path(directory))


def _read_index(directory: Path) -> dict:
    index = directory / MEMORY_INDEX
    if not index.is_file():
        raise MilpError(f"{directory}: not a saved memory (no {MEMORY_INDEX})")
    try:
        stored = json.loads(index.read_text())
        names = stored["adapters"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise MilpError(f"{index}: not a memory index (no 'adapters' list)") from None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise MilpError(f"{index}: not a memory index (no 'adapters' list)")
    files = stored.get(FILES_KEY)
    if files is not None and (
        not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values())
    ):
        raise MilpError(f"{index}: {FILES_KEY!r} is not a map of file hashes")
    return stored


def _check_hashes(directory: Path, expected: dict[str, str], what: str) -> None:
    """Each file named in `expected` exists under `directory` with that SHA-256."""
    for relative, sha256 in sorted(expected.items()):
        path = directory / relative
        if not path.is_file():
            raise MilpError(f"{path}: missing ({what} lists it)")
        if file_sha256(path) != sha256:
            raise MilpError(
                f"{path}: fails its SHA-256 check against {what} (corrupt or truncated)"
            )


def verify_memory(directory: str | Path, recorded: dict[str, str] | None = None) -> dict[str, str]:
    """Check a saved memory's files against the hashes its index lists and, where given,
    against `recorded` (a run's result record: memory.json included); returns the SHA-256
    of each of its files, memory.json included. Raises a one-line `MilpError` naming the
    first file that is missing or differs."""
    directory = Path(directory)
    memory_names(directory)  # the index, and its listed hashes
    if recorded is not None:
        _check_hashes(directory, recorded, "the run's record of this user")
    files = _read_index(directory).get(FILES_KEY) or {}
    return {MEMORY_INDEX: file_sha256(directory / MEMORY_INDEX)} | files


def memory_digest(directory: str | Path) -> str:
    """One hash of a saved memory's content (its files, checked), as a start memory's
    identity in a user's inputs."""
    directory = Path(directory)
    names = memory_names(directory)  # checked against the hashes it lists
    files = [MEMORY_INDEX, *(f"{n}/{f}" for n in names for f in (CONFIG_FILE, WEIGHTS_FILE))]
    hashes = {file: file_sha256(directory / file) for file in files}
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; an unreadable file is one line naming it."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise MilpError(f"{path}: not a readable safetensors file ({err})") from None


def peft_module_states(peft_model: PeftModel) -> ModuleStates:
    """The memory modules of a live peft model, as they are saved (copies)."""
    names = [n for n in peft_model.peft_config if n.startswith(MEMORY_PREFIX)]
    return {
        name: {
            k: v.detach().clone()
            for k, v in get_peft_model_state_dict(peft_model, adapter_name=name).items()
        }
        for name in names
    }


def _rank_dim(key: str) -> int:
    return 0 if ".lora_A." in key else 1  # A: [r, in], B: [out, r]


def stack_modules(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A memory's modules (peft state dicts of one shape) as one module: the `num_loras`
    modules of rank r share the scale alpha/r, so their A's stacked along the rank and
    their B's likewise are exactly one LoRA of rank `num_loras*r` (alpha `num_loras*alpha`).
    The one place that writes this rule; `split_modules` undoes it."""
    return {key: torch.cat([s[key] for s in states], _rank_dim(key)) for key in states[0]}


def split_modules(stacked: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    """`count` modules of equal rank from their stacked form (`stack_modules`)."""
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(count)]
    for key, value in stacked.items():
        for part, piece in zip(parts, value.chunk(count, _rank_dim(key)), strict=True):
            part[key] = piece.contiguous()
    return parts


def bank_module_states(
    targets: list[Target], weights: UserWeights, memory: MemoryConfig
) -> ModuleStates:
    """A user's memory in bank layout (modules stacked along the rank), split back into
    its peft modules."""
    stacked = {}
    for target, (a, b) in zip(targets, weights, strict=True):
        key = PEFT_PREFIX + target.path
        stacked[f"{key}.lora_A.weight"], stacked[f"{key}.lora_B.weight"] = a, b
    modules = split_modules(stacked, memory.num_loras)
    return dict(zip(memory.adapter_names, modules, strict=True))


def memory_names(directory: str | Path) -> list[str]:
    """The names of a saved memory's modules, from its index, each checked to have its
    peft config and safetensors weights (a pickled `adapter_model.bin`, which peft
    would fall back to, is refused: loading it could run code) and, where the index lists
    their SHA-256, to match it."""
    directory = Path(directory)
    stored = _read_index(directory)
    names = stored["adapters"]
    for name in names:
        module = directory / name
        if not (module / WEIGHTS_FILE).is_file():
            pickled = sorted(p.name for p in module.glob("*.bin"))
            refused = (
                f"; {pickled[0]} is refused, milp loads adapter weights from safetensors only"
                if pickled
                else ""
            )
            raise MilpError(f"{module}: no {WEIGHTS_FILE}{refused}")
        if not (module / CONFIG_FILE).is_file():
            raise MilpError(f"{module}: no {CONFIG_FILE}")
    if stored.get(FILES_KEY) is not None:
        _check_hashes(directory, stored[FILES_KEY], MEMORY_INDEX)
    return names


def load_memory(model: nn.Module, directory: str | Path, trainable: bool = False) -> PeftModel:
    """Load a saved user memory onto a base model, all its modules active."""
    directory = Path(directory)
    names = memory_names(directory)
    peft_model = PeftModel.from_pretrained(
        model, directory / names[0], adapter_name=names[0], is_trainable=trainable
    )
    for name in names[1:]:
        peft_model.load_adapter(directory / name, adapter_name=name, is_trainable=trainable)
    activate_memories(peft_model, names)
    if not trainable:
        peft_model.requires_grad_(False)
    return peft_model


def read_bank_weights(
    directory: str | Path, targets: list[Target], memory: MemoryConfig
) -> UserWeights:
    """Read a saved memory into bank layout; it must have the shape of `memory`."""
    directory = Path(directory)
    names = memory_names(directory)
    if len(names) != memory.num_loras:
        raise MilpError(
            f"{directory}: holds {len(names)} memory module(s), memory.num_loras is "
            f"{memory.num_loras}"
        )
    r = memory.rank
    states = []
    for name in names:
        config = json.loads((directory / name / CONFIG_FILE).read_text())
        if config.get("r") != r or float(config.get("lora_alpha")) != float(memory.alpha):
            raise MilpError(
                f"{directory / name}: rank {config.get('r')} / alpha {config.get('lora_alpha')}"
                f" differ from memory.rank={r} / memory.alpha={memory.alpha}"
            )
        state = read_weights(directory / name / WEIGHTS_FILE)
        expected = {f"{PEFT_PREFIX}{t.path}.lora_{m}.weight" for t in targets for m in "AB"}
        if set(state) != expected:
            missing = sorted(expected - set(state))
            extra = sorted(set(state) - expected)
            raise MilpError(
                f"{directory / name}: placed on other modules than this memory config "
                f"(missing {missing[:1]}, unexpected {extra[:1]})"
            )
        states.append(state)
    stacked = {key: value.float() for key, value in stack_modules(states).items()}
    keys = [PEFT_PREFIX + t.path for t in targets]
    return [(stacked[f"{k}.lora_A.weight"], stacked[f"{k}.lora_B.weight"]) for k in keys]


def find_memory(
    root: Path,
    user_id: str,
    memory: MemoryConfig,
    placement: MemoryPlacement,
    key: str = "memory.resume_from",
) -> Path | None:
    """A user's stored memory under `root` (None if it has none), checked to have the
    shape of `memory` on `placement` (the run's own memory); `key` names the setting."""
    directory = root / user_slug(user_id)
    index = directory / MEMORY_INDEX
    if not index.is_file():
        return None
    try:
        memory_names(directory)
    except MilpError as err:
        raise MilpError(f"{key}: {err}") from None
    stored = json.loads(index.read_text())
    config = stored.get("config", {})
    wanted = {
        "num_loras": memory.num_loras,
        "rank": memory.rank,
        "alpha": float(memory.alpha),
        "layers": placement.layers,
        "modules": sorted(placement.modules),
    }
    found = {
        "num_loras": len(stored.get("adapters", [])),
        "rank": config.get("rank"),
        "alpha": float(config["alpha"]) if "alpha" in config else None,
        "layers": stored.get("layers"),
        "modules": sorted(stored["modules"]) if "modules" in stored else None,
    }
    for name, value in wanted.items():
        if found[name] is not None and found[name] != value:
            raise MilpError(
                f"{key}: {directory} has {name}={found[name]}, this run has "
                f"{name}={value}; a stored memory is used only with the same shape"
            )
    return directory


def stored_memory_config(directory: str | Path) -> MemoryConfig:
    """The shape of a stored memory (modules, rank, alpha, placement), from its files."""
    directory = Path(directory)
    names = memory_names(directory)
    config = LoraConfig.from_pretrained(str(directory / names[0]))
    layers = config.layers_to_transform
    return MemoryConfig(
        num_loras=len(names),
        rank=config.r,
        alpha=config.lora_alpha,
        layers="all" if layers is None else list(layers),
        target_modules=sorted(config.target_modules),
    )


def merged_adapter(directory: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A user's stored memory as one peft adapter for serving (`stack_modules`)."""
    directory = Path(directory)
    names = memory_names(directory)
    configs = [LoraConfig.from_pretrained(str(directory / n)) for n in names]
    states = [read_weights(directory / n / WEIGHTS_FILE) for n in names]
    first = configs[0]
    for config in configs[1:]:
        if (config.r, config.lora_alpha, set(config.target_modules)) != (
            first.r,
            first.lora_alpha,
            set(first.target_modules),
        ):
            raise MilpError(f"{directory}: its memory modules differ in shape; cannot stack")
    merged = stack_modules(states)
    k = len(names)
    config = LoraConfig(
        r=first.r * k,
        lora_alpha=first.lora_alpha * k,
        lora_dropout=0.0,
        target_modules=first.target_modules,
        layers_to_transform=first.layers_to_transform,
        layers_pattern=first.layers_pattern,
        bias="none",
        task_type="CAUSAL_LM",
        inference_mode=True,
    )
    return config, merged
