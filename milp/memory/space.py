"""Memory adapters: LoRA modules that hold a user's history inside the frozen base model.

A memory configuration says how much memory to inject and where: `num_loras` LoRA
modules of `rank` (scaled by `alpha / rank`), on the `target_modules` of the chosen
`layers`. The modules are ordinary peft adapters (`memory_0`, `memory_1`, ...), all
active together, so a user's memory is saved and loaded as plain peft adapters
(`adapter_config.json` + safetensors) that `PeftModel.from_pretrained` understands.

N modules of rank r on the same layers can express what one rank N*r module can, but
each is scaled and initialized on its own; that is the "number of memories"
dimension of MiLP's search space.

Where the memory goes has two settings. `layers` is a preset (`all`, `top_half`,
`bottom_half`, `every_other`) or an explicit list, for hand-written configs and coarse
ablations. For a fine search, `window_start` / `window_length` place the memory on one
contiguous block of layers (`start .. start+length-1`, clipped at the top layer; a start
without a length runs to the top); when `window_start` is set it replaces `layers`.
We chose a window over a per-layer on/off mask: a mask is 2^L combinations (256 for 8
layers, 2^32 for a 7B model) in L binary dimensions, which a Gaussian-process search with
20-30 trials cannot model; the window is two ordinal dimensions whose neighbours are
similar placements, the kind of structure BO exploits, and it still covers the presets
other than `every_other` (`all`, `top_half`, `bottom_half` are windows).

`target_modules` takes a list (`[ffn]`, `[attention, up_proj]`) or one string, where
`+` joins families or names: `ffn`, `attention`, `ffn+attention` (so a sweep can choose
among plain strings).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from milp.data.checks import setting_number
from milp.errors import MilpError

# peft reads transformers' deprecated `is_gradient_checkpointing` alias each time it wraps
# a model (once per user); the deprecation is theirs to resolve, not the user's.
warnings.filterwarnings(
    "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
)

LAYER_PRESETS = ("all", "top_half", "bottom_half", "every_other")

# Sub-module families by their usual names across Hugging Face architectures
# (Llama/Qwen/Mistral, GPT-2, GPT-NeoX, Phi, OPT...). Only names the model has are used.
MODULE_FAMILIES = {
    "ffn": (
        "gate_proj",
        "up_proj",
        "down_proj",
        "fc1",
        "fc2",
        "c_fc",
        "mlp.c_proj",
        "dense_h_to_4h",
        "dense_4h_to_h",
        "w1",
        "w2",
        "w3",
    ),
    "attention": (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "c_attn",
        "attn.c_proj",
        "query_key_value",
        "qkv_proj",
        "out_proj",
        "dense",
    ),
}
MEMORY_PREFIX = "memory_"
# The most memory modules per user: every module is a separate peft adapter, run one
# after another in every forward pass, so 1000 modules take minutes for a 3-item user.
MAX_NUM_LORAS = 64
MEMORY_INITS = ("fresh", "task")


@dataclass
class MemoryConfig:
    """How much memory to inject and where. `num_loras: 0` means no memory (zero-shot)."""

    num_loras: int = 1
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    layers: str | list[int] = "all"
    target_modules: str | list[str] = field(default_factory=lambda: ["ffn"])
    # A contiguous block of layers (replaces `layers` when set); see the module docstring.
    window_start: int | None = None
    window_length: int | None = None
    # A run directory (or its adapters/ dir) whose users' memories this run continues
    # from instead of fresh modules (incremental memory; see milp/inject/__init__.py).
    resume_from: str | None = None
    # A run directory (or its adapters/ dir) whose stored memories answer this run's
    # users as they are: nothing trains (the controls of make reproduce; see milp/train.py).
    trained_in: str | None = None
    # Where a user's memory starts: "fresh" modules, or "task": a copy of one task memory
    # trained first on the train split's pooled histories (OPPU's stage 1), so the user's
    # training adds what is personal on top of what the data set's domain shares.
    # Unused without memory (num_loras 0), like the other keys.
    init: str = "fresh"

    def __post_init__(self) -> None:
        # Hydra hands over ListConfig objects; plain lists keep the config serializable.
        if not isinstance(self.layers, str):
            self.layers = [
                setting_number(f"memory.layers[{i}]", layer, 0, integer=True)
                for i, layer in enumerate(self.layers)
            ]
        if isinstance(self.target_modules, str):  # alias: "ffn", "attention", "ffn+attention"
            self.target_modules = [m.strip() for m in self.target_modules.split("+")]
            if not all(self.target_modules):
                raise MilpError(
                    "memory.target_modules: empty name in '+'-joined modules "
                    f"{'+'.join(self.target_modules)!r}"
                )
        self.target_modules = [str(m) for m in self.target_modules]
        for key in ("window_start", "window_length"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value % 1:
                raise MilpError(f"memory.{key} must be an integer or null, got {value!r}")
            setattr(self, key, int(value))
        if self.window_start is not None and self.window_start < 0:
            raise MilpError(f"memory.window_start must be >= 0, got {self.window_start}")
        if self.window_length is not None:
            if self.window_length < 1:
                raise MilpError(f"memory.window_length must be >= 1, got {self.window_length}")
            if self.window_start is None:
                raise MilpError("memory.window_length is set but memory.window_start is not")
        self.num_loras = setting_number(
            "memory.num_loras", self.num_loras, 0, MAX_NUM_LORAS, integer=True
        )
        if self.num_loras:
            self.rank = setting_number("memory.rank", self.rank, 1, integer=True)
        self.alpha = setting_number("memory.alpha", self.alpha, 0, above_minimum=True)
        self.dropout = setting_number("memory.dropout", self.dropout, 0, 1)
        if self.dropout == 1:
            raise MilpError(f"memory.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.layers, str) and self.layers not in LAYER_PRESETS:
            raise MilpError(
                f"memory.layers: unknown preset {self.layers!r}; use one of "
                f"{', '.join(LAYER_PRESETS)} or a list of layer indices"
            )
        if not isinstance(self.layers, str) and not self.layers:
            raise MilpError("memory.layers: the list of layers is empty")
        if self.num_loras and not self.target_modules:
            raise MilpError("memory.target_modules: the list of modules is empty")
        self.resume_from = str(self.resume_from) if self.resume_from not in (None, "") else None
        if self.resume_from is not None and not self.num_loras:
            raise MilpError("memory.resume_from needs memory (num_loras >= 1)")
        self.trained_in = str(self.trained_in) if self.trained_in not in (None, "") else None
        if self.trained_in is not None and not self.num_loras:
            raise MilpError("memory.trained_in needs memory (num_loras >= 1)")
        if self.trained_in is not None and self.resume_from is not None:
            raise MilpError(
                "memory.trained_in answers with stored memories as they are; "
                "memory.resume_from trains them further: set one of the two"
            )
        if self.init not in MEMORY_INITS:
            raise MilpError(
                f"memory.init must be one of {', '.join(MEMORY_INITS)}, got {self.init!r}"
            )

    @property
    def window(self) -> tuple[int, int | None] | None:
        """(start, length or None) when a layer window is set, else None."""
        return None if self.window_start is None else (self.window_start, self.window_length)

    @property
    def enabled(self) -> bool:
        """Whether any memory is injected at all."""
        return self.num_loras > 0

    @property
    def adapter_names(self) -> list[str]:
        return [f"{MEMORY_PREFIX}{i}" for i in range(self.num_loras)]


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks, and the attribute name peft matches it by."""
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    stacks = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    if expected is not None:
        stacks = [(n, m) for n, m in stacks if len(m) == expected] or stacks
    if not stacks:
        raise MilpError(f"{type(model).__name__}: no list of transformer layers found")
    name, stack = max(stacks, key=lambda item: len(item[1]))
    return name.rsplit(".", 1)[-1], stack


def resolve_layers(layers: str | Sequence[int], num_layers: int) -> list[int]:
    """Turn a preset or an explicit list into sorted layer indices, checked against the model."""
    if isinstance(layers, str):
        half = num_layers // 2
        chosen = {
            "all": range(num_layers),
            "bottom_half": range(half),
            "top_half": range(half, num_layers),
            "every_other": range(0, num_layers, 2),
        }[layers]
        return list(chosen)
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise MilpError(
            f"memory.layers: layer index {bad[0]} is out of range; the model has "
            f"{num_layers} layers (0..{num_layers - 1})"
        )
    return sorted(set(layers))


def resolve_window(start: int, length: int | None, num_layers: int) -> list[int]:
    """Layers of a contiguous window ``start .. start+length-1``, clipped at the top layer
    (``length=None``: up to the top); the start must be a layer of the model."""
    if not 0 <= start < num_layers:
        raise MilpError(
            f"memory.window_start: layer {start} is out of range; the model has "
            f"{num_layers} layers (0..{num_layers - 1})"
        )
    end = num_layers if length is None else min(start + length, num_layers)
    return list(range(start, end))


def _linear_names(block: nn.Module) -> list[str]:
    return [name for name, module in block.named_modules() if isinstance(module, nn.Linear)]


def resolve_target_modules(block: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Expand `ffn`/`attention` into the module names this architecture uses, and check
    every name exists in a transformer block."""
    linear = _linear_names(block)

    def present(name: str) -> bool:
        return any(path == name or path.endswith("." + name) for path in linear)

    resolved: list[str] = []
    for target in target_modules:
        if target in MODULE_FAMILIES:
            found = [name for name in MODULE_FAMILIES[target] if present(name)]
            if not found:
                raise MilpError(
                    f"memory.target_modules: this model has no {target} modules I know of; "
                    f"name them explicitly from: {', '.join(sorted(set(linear)))}"
                )
            resolved += found
        elif present(target):
            resolved.append(target)
        else:
            raise MilpError(
                f"memory.target_modules: {target!r} is not a linear module of the model's "
                f"layers; choose from ffn, attention, {', '.join(sorted(set(linear)))}"
            )
    return list(dict.fromkeys(resolved))


@dataclass(frozen=True)
class Target:
    """One module that carries memory: its path in the base model and, for a linear
    module, its shape (None otherwise)."""

    path: str
    in_features: int | None
    out_features: int | None


@dataclass(frozen=True)
class MemoryPlacement:
    """Where memory goes in a specific model: validated layers and module names, and the
    modules that match them (`targets`, in the model's order: peft's)."""

    layers: list[int]
    modules: list[str]
    layers_pattern: str
    targets: list[Target] = field(default_factory=list)


def place_memory(config: MemoryConfig, model: nn.Module) -> MemoryPlacement:
    """Validate a memory config against a model, before any training starts, and find
    the modules it puts memory on."""
    pattern, stack = find_layer_stack(model)
    window = config.window
    layers = (
        resolve_layers(config.layers, len(stack))
        if window is None
        else resolve_window(*window, len(stack))
    )
    modules = resolve_target_modules(stack[0], config.target_modules)
    targets = memory_targets(model, pattern, layers, modules)
    # A rank above a module's narrower side adds parameters but no expressiveness.
    for target in targets:
        if target.in_features is None or target.out_features is None:
            continue
        width = min(target.in_features, target.out_features)
        if config.num_loras and config.rank > width:
            raise MilpError(
                f"memory.rank={config.rank} is above the width of {target.path} "
                f"({target.in_features} x {target.out_features}); at most {width}"
            )
    return MemoryPlacement(layers, modules, pattern, targets)


def memory_targets(
    model: nn.Module, layers_pattern: str, layers: Sequence[int], modules: Sequence[str]
) -> list[Target]:
    """The modules peft puts memory on, by peft's rule: a module whose path ends with one
    of `modules` inside block `<layers_pattern>.<i>.` for i in `layers`, in model order."""
    in_layer = re.compile(rf"(?:^|.*\.){re.escape(layers_pattern)}\.(\d+)\.")
    wanted = set(layers)
    targets = []
    for path, module in model.named_modules():
        if not any(path == m or path.endswith("." + m) for m in modules):
            continue
        layer = in_layer.match(path)
        if layer is None or int(layer.group(1)) not in wanted:
            continue
        linear = isinstance(module, nn.Linear)
        targets.append(
            Target(
                path,
                module.in_features if linear else None,
                module.out_features if linear else None,
            )
        )
    return targets


def lora_config(config: MemoryConfig, placement: MemoryPlacement) -> LoraConfig:
    """The peft configuration of one memory module."""
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=placement.modules,
        layers_to_transform=placement.layers,
        layers_pattern=placement.layers_pattern,
        bias="none",
        task_type="CAUSAL_LM",
    )


def inject_memory(
    model: nn.Module, config: MemoryConfig, placement: MemoryPlacement | None = None
) -> PeftModel:
    """Add fresh memory modules to `model` (in place) and make only them trainable.

    `placement`: `place_memory(config, model)`, if the caller has it already. Seed torch
    before calling: the modules' initial weights come from its generator.
    """
    if not config.enabled:
        raise ValueError("inject_memory needs num_loras >= 1")
    placement = placement or place_memory(config, model)
    peft_config = lora_config(config, placement)
    names = config.adapter_names
    peft_model = get_peft_model(model, peft_config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, lora_config(config, placement))
    activate_memories(peft_model, names)
    return peft_model


def activate_memories(peft_model: PeftModel, names: Sequence[str]) -> None:
    """Make all given adapters active together; in training mode, only they get gradients."""
    # PeftModel.set_adapter takes one name; the underlying LoraModel takes a list.
    peft_model.base_model.set_adapter(list(names))
    for name, parameter in peft_model.named_parameters():
        parameter.requires_grad = any(f".{n}." in name for n in names) and "lora_" in name


def remove_memory(peft_model: PeftModel) -> nn.Module:
    """Take the memory modules out again, returning the untouched base model."""
    return peft_model.unload()


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
