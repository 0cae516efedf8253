"""Pre-trial checks: every configuration error is reported before anything is written.

Contract: ``validated_space(...)`` returns the sweep's ``SearchSpace`` or raises
``SweepConfigError`` with one line naming the key. It checks, cheapest first: the scalar
settings of ``hydra.sweeper`` (budget, num_workers, seed, maximize, trials_file, W&B mode),
the search space entries, that every searched / fixed / final key exists in the composed
task config or is a config group (``+key`` adds a key and is not checked), that the task
config composes once per choice / bound (so ``model=huge`` fails now, not at trial 17) and
with the final evaluation's overrides, and last, with nevergrad imported, the optimizer
name and that nevergrad can build that optimizer for the space.
"""

import difflib
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from hydra.types import HydraContext
from omegaconf import DictConfig, ListConfig, OmegaConf

from hydra_plugins.milp_sweeper._overrides import (
    SweepConfigError,
    final_job_overrides,
    first_line,
    format_value,
)
from hydra_plugins.milp_sweeper._pruning import check_pruning_settings
from hydra_plugins.milp_sweeper._search_space import (
    ChoiceParam,
    FixedValue,
    Param,
    ScalarParam,
    SearchSpace,
    asks_one_at_a_time,
    build_search_space,
    make_optimizer,
)

log = logging.getLogger(__name__)

#: The only W&B modes allowed: the sweeper never talks to the network.
WANDB_MODES = ("offline", "disabled")


def validated_space(
    config: DictConfig,
    hydra_context: HydraContext,
    arguments: Sequence[str],
    optim: Mapping[str, Any],
    params: Mapping[str, Any],
    trials_file: str,
    wandb: Mapping[str, Any],
    final_overrides: Sequence[str],
    pruning: Mapping[str, Any],
) -> SearchSpace:
    """The search space, after every check (see the module docstring); logs nevergrad's
    construction warnings once, and warns when a one-at-a-time optimizer gets batches."""
    check_settings(optim, trials_file, wandb)
    check_pruning_settings(pruning)
    parser = OverridesParser.create(config_loader=hydra_context.config_loader)
    space = build_search_space(params, arguments, parser)
    if not space.params:
        raise SweepConfigError(
            "hydra.sweeper.params: nothing to search (no parameter in hydra.sweeper.params "
            "and no sweep override on the command line)"
        )
    for name, spec in [*space.params.items(), *space.fixed.items()]:
        check_key(config, spec.key, where=f"search space: {name}")
    if pruning.get("enabled"):
        check_key(config, str(pruning["trial_key"]), where="hydra.sweeper.pruning.trial_key")
    final = parse_final_overrides(parser, final_overrides)
    for override in final:
        check_key(config, override.get_key_element(), where="hydra.sweeper.final_overrides")
    loader = hydra_context.config_loader
    check_composition(loader, config, space)
    if final:
        check_final_composition(loader, config, space, final_overrides)
    name = str(optim["optimizer"])
    check_optimizer_name(name)
    _, warnings = make_optimizer(space, optim)  # e.g. bad optimizer/space combinations
    for warning in warnings:
        log.info("nevergrad: %s", warning)
    if int(optim["num_workers"]) > 1 and asks_one_at_a_time(name):
        log.warning(
            "%s proposes points one at a time: with num_workers=%d a batch may repeat "
            "the same point; consider num_workers=1 or a parallel optimizer (NGOpt, CMA)",
            name,
            optim["num_workers"],
        )
    return space


def check_settings(optim: Mapping[str, Any], trials_file: str, wandb: Mapping[str, Any]) -> None:
    """Scalar settings of ``hydra.sweeper``."""
    for name in ("budget", "num_workers"):
        value = optim.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SweepConfigError(
                f"hydra.sweeper.optim.{name}: must be an integer >= 1, got {value!r}"
            )
    seed = optim.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise SweepConfigError(f"hydra.sweeper.optim.seed: must be an int or null: {seed!r}")
    if not isinstance(optim.get("optimizer"), str):
        raise SweepConfigError("hydra.sweeper.optim.optimizer: must be a nevergrad name")
    if not isinstance(optim.get("maximize"), bool):
        raise SweepConfigError("hydra.sweeper.optim.maximize: must be true or false")
    if not trials_file:
        raise SweepConfigError("hydra.sweeper.trials_file: must be a file name")
    mode = wandb.get("mode", "offline")
    if wandb.get("enabled") and mode not in WANDB_MODES:
        raise SweepConfigError(
            f"hydra.sweeper.wandb.mode: {mode!r} is not allowed; use one of {WANDB_MODES}"
            " (the sweeper never sends data over the network)"
        )


def key_exists(config: DictConfig, key: str) -> bool:
    """True if ``key`` is a node of ``config``, including ``???`` and interpolations."""
    parts = key.split(".")
    parent: Any = config
    if len(parts) > 1:
        parent = OmegaConf.select(
            config, ".".join(parts[:-1]), default=None, throw_on_resolution_failure=False
        )
    if isinstance(parent, DictConfig):
        return parts[-1] in parent.keys()
    if isinstance(parent, ListConfig):
        return parts[-1].isdigit() and int(parts[-1]) < len(parent)
    return False


def config_keys(tree: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """All dotted keys of a plain config tree (for 'did you mean' hints)."""
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        yield dotted
        if isinstance(value, Mapping):
            yield from config_keys(value, prefix=f"{dotted}.")


def check_key(config: DictConfig, key: str, where: str) -> None:
    """A searched/fixed key must exist in the task config or be a config group.

    ``+key`` adds a new key, so it is not checked. Config groups are recognised through
    ``hydra.runtime.choices`` (e.g. ``model`` or ``model/encoder``; ``group@pkg`` too).
    """
    if key.startswith(("+", "~")):
        return
    groups = OmegaConf.select(config, "hydra.runtime.choices", default=None) or {}
    if key.split("@")[0] in groups or key_exists(config, key):
        return
    tree = OmegaConf.to_container(config, resolve=False, throw_on_missing=False)
    task = {k: v for k, v in tree.items() if k != "hydra"}  # type: ignore[union-attr]
    known = list(dict.fromkeys([*config_keys(task), *groups]))
    hint = difflib.get_close_matches(key, known, n=3)
    hint_text = f"; did you mean {', '.join(hint)}?" if hint else ""
    raise SweepConfigError(
        f"{where}: unknown key '{key}': not in the task config and not a config group "
        f"(prefix it with '+' to add a new key){hint_text}"
    )


def probe_values(spec: Param | FixedValue) -> list[Any]:
    """Values whose override must compose: every choice, or the scalar bounds/init."""
    if isinstance(spec, ChoiceParam):
        return list(spec.options)
    if isinstance(spec, ScalarParam):
        cast = int if spec.integer else float
        return [cast(v) for v in (spec.lower, spec.upper, spec.init) if v is not None]
    return []


def optimizer_names() -> list[str]:
    """Names of nevergrad's registered optimizers."""
    import nevergrad as ng

    return sorted(ng.optimizers.registry)


def check_optimizer_name(name: str) -> None:
    """Unknown optimizer -> error listing close matches and a few common ones."""
    names = optimizer_names()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=3)
    common = [n for n in ("BO", "NGOpt", "RandomSearch", "CMA", "TwoPointsDE") if n in names]
    raise SweepConfigError(
        f"hydra.sweeper.optim.optimizer: unknown nevergrad optimizer {name!r}"
        + (f"; did you mean {', '.join(close)}?" if close else "")
        + f" (valid e.g.: {', '.join(common)}; {len(names)} in nevergrad.optimizers.registry)"
    )


def check_composition(loader: Any, config: DictConfig, space: SearchSpace) -> None:
    """Compose the task config once per choice / bound, so that a typo in a config group
    option or a value of the wrong type fails now, not at trial 17."""
    fixed = space.fixed_overrides()
    try:
        loader.load_sweep_config(master_config=config, sweep_overrides=list(fixed))
    except Exception as err:
        raise SweepConfigError(f"search space: fixed overrides {fixed}: {first_line(err)}") from err
    for name, spec in space.params.items():
        for value in probe_values(spec):
            override = f"{spec.key}={format_value(value)}"
            try:
                loader.load_sweep_config(master_config=config, sweep_overrides=[*fixed, override])
            except Exception as err:
                raise SweepConfigError(
                    f"search space: {name}: '{override}' does not compose with the task "
                    f"config: {first_line(err)}"
                ) from err


def parse_final_overrides(parser: OverridesParser, final: Sequence[str]) -> list[Override]:
    """``final_overrides`` parsed; each must be a plain (non-sweep) override."""
    parsed = []
    for text in final:
        where = f"hydra.sweeper.final_overrides: {text!r}"
        try:
            override = parser.parse_override(text)
        except HydraException as err:
            raise SweepConfigError(f"{where}: cannot parse: {first_line(err)}") from err
        if override.is_sweep_override():
            raise SweepConfigError(f"{where}: must be a single value, not a sweep")
        parsed.append(override)
    return parsed


def check_final_composition(
    loader: Any, config: DictConfig, space: SearchSpace, final: Sequence[str]
) -> None:
    """The final evaluation's overrides compose with the fixed overrides."""
    overrides = final_job_overrides(space.fixed_overrides(), final)
    try:
        loader.load_sweep_config(master_config=config, sweep_overrides=overrides)
    except Exception as err:
        raise SweepConfigError(
            f"hydra.sweeper.final_overrides {list(final)}: does not compose with "
            f"the task config: {first_line(err)}"
        ) from err
