"""The search space: ``hydra.sweeper.params`` + command-line overrides -> parameter specs.

Contract:

- ``build_search_space(params, arguments, parser)`` returns a ``SearchSpace``: the searched
  dimensions (``ChoiceParam`` / ``ScalarParam``) and the plain overrides every trial gets
  (``FixedValue``), keyed by ``param_name``. A command-line override replaces a configured
  entry with the same key (as in Hydra's own nevergrad sweeper). Any malformed entry raises
  ``SweepConfigError`` naming ``hydra.sweeper.params.<key>`` or the command-line key.
- ``nevergrad_parameter(spec)`` is the ``ng.p`` parameter of one spec and
  ``make_optimizer(space, optim)`` a seeded nevergrad optimizer over the whole space: the
  same space, settings and seed ask the same sequence of points.

nevergrad (~3 s to import) is imported inside the functions that need it, never at module
import (Hydra loads plugin code in every app).
"""

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.errors import HydraException

from hydra_plugins.milp_sweeper._overrides import (
    SweepConfigError,
    first_line,
    format_value,
    param_name,
    to_native,
    unquote,
)

#: Keys accepted in a scalar spec such as ``{lower: 1e-4, upper: 1e-2, log: true}``.
SCALAR_SPEC_KEYS = ("lower", "upper", "log", "integer", "init", "step")


@dataclass(frozen=True)
class ChoiceParam:
    """Categorical parameter: one of ``options`` (numbers, strings, config group options)."""

    key: str  # override key as written, e.g. "memory.rank", "+extra", "model"
    options: tuple[Any, ...]


@dataclass(frozen=True)
class ScalarParam:
    """Continuous (or integer-cast) parameter, optionally on a log scale."""

    key: str
    lower: float | None = None
    upper: float | None = None
    log: bool = False
    integer: bool = False
    init: float | None = None
    step: float | None = None


@dataclass(frozen=True)
class FixedValue:
    """A plain override applied unchanged to every trial."""

    key: str
    override: str  # full override string, e.g. "trainer.max_steps=10" or "~foo"
    value: Any


Param = ChoiceParam | ScalarParam


@dataclass
class SearchSpace:
    """What the sweep varies (``params``) and what it passes to every trial (``fixed``)."""

    params: dict[str, Param] = field(default_factory=dict)
    fixed: dict[str, FixedValue] = field(default_factory=dict)

    def add(self, spec: Param | FixedValue) -> None:
        """Add or replace the entry for ``spec.key`` (a later source wins, like Hydra)."""
        name = param_name(spec.key)
        self.params.pop(name, None)
        self.fixed.pop(name, None)
        if isinstance(spec, FixedValue):
            self.fixed[name] = spec
        else:
            self.params[name] = spec

    def fixed_overrides(self) -> list[str]:
        """Override strings shared by all trials, in insertion order."""
        return [f.override for f in self.fixed.values()]


def build_search_space(
    params: Mapping[str, Any], arguments: Sequence[str], parser: OverridesParser
) -> SearchSpace:
    """Combine ``hydra.sweeper.params`` with the command-line overrides.

    Command-line overrides come last so that ``memory.rank=2,4`` replaces a configured
    ``memory.rank`` entry, the way Hydra's own nevergrad sweeper behaves.
    """
    space = SearchSpace()
    for key, raw in params.items():
        space.add(spec_from_config_value(str(key), raw, parser))
    for argument in arguments:
        try:
            override = parser.parse_override(argument)
        except HydraException as err:
            raise SweepConfigError(
                f"command line: cannot parse override {argument!r}: {err}"
            ) from err
        space.add(spec_from_override(override, source="command line"))
    return space


def spec_from_config_value(key: str, raw: Any, parser: OverridesParser) -> Param | FixedValue:
    """Turn one ``params`` entry into a parameter spec.

    list -> choices; mapping -> scalar spec; string -> Hydra sweep syntax such as
    ``interval(0,1)`` or ``2,4,8`` (a plain string is a fixed value); other -> fixed value.
    """
    where = f"hydra.sweeper.params.{key}"
    if isinstance(raw, list):
        return choice_param(key, raw, where)
    if isinstance(raw, dict):
        return scalar_param_from_mapping(key, raw, where)
    if isinstance(raw, str):
        try:
            override = parser.parse_override(f"{key}={raw}")
        except HydraException:
            return FixedValue(key, f"{key}={format_value(raw)}", raw)
        return spec_from_override(override, source=where)
    return FixedValue(key, f"{key}={format_value(raw)}", raw)


def spec_from_override(override: Override, source: str) -> Param | FixedValue:
    """Map Hydra override syntax onto a spec, like Hydra's nevergrad sweeper does.

    ``a=1,2`` / ``choice(..)`` / stepped ``range`` -> choices, ``range(1,5)`` -> integer in
    [1, 4], ``interval(lo,hi)`` -> float (int if both bounds are ints, e.g. via
    ``int(interval(1,4))``), ``tag(log, interval(..))`` -> log scale, anything else -> fixed.
    """
    key = override.get_key_element()
    where = f"{source}: {key}"
    if override.is_delete():
        return FixedValue(key, override.input_line or f"~{key}", None)
    if not override.is_sweep_override():
        value = unquote(override.value())
        return FixedValue(key, f"{key}={override.get_value_element_as_str()}", value)
    sweep = override.value()
    if isinstance(sweep, ChoiceSweep):
        if sweep.shuffle:
            raise SweepConfigError(f"{where}: shuffle() is not supported by a search")
        return choice_param(key, [unquote(v) for v in sweep.list], where)
    if isinstance(sweep, RangeSweep):
        return range_param(key, sweep, where)
    if isinstance(sweep, IntervalSweep):
        unknown_tags = sorted(set(sweep.tags) - {"log"})
        if unknown_tags:
            raise SweepConfigError(f"{where}: unsupported tag(s) {unknown_tags}; only 'log'")
        spec = {
            "lower": sweep.start,
            "upper": sweep.end,
            "log": "log" in sweep.tags,
            "integer": isinstance(sweep.start, int) and isinstance(sweep.end, int),
        }
        return scalar_param_from_mapping(key, spec, where)
    raise SweepConfigError(f"{where}: unsupported sweep {override.input_line!r} (glob?)")


def range_param(key: str, sweep: RangeSweep, where: str) -> Param:
    """``range(a, b)`` with step 1 searches integers a..b-1; other steps are choices."""
    start, stop, step = sweep.start, sweep.stop, sweep.step
    values = list(_frange(start, stop, step))
    if not values:
        raise SweepConfigError(f"{where}: range({start}, {stop}, {step}) is empty")
    is_int = all(isinstance(v, int) for v in (start, stop, step))
    if is_int and step == 1 and len(values) > 1:
        return ScalarParam(key, lower=float(start), upper=float(stop - 1), integer=True)
    return ChoiceParam(key, tuple(values))


def _frange(start: float, stop: float, step: float) -> Iterator[float]:
    """Hydra's range semantics (stop excluded), for int or float steps."""
    if step == 0:
        return
    value = start
    while (step > 0 and value < stop) or (step < 0 and value > stop):
        yield value
        value = value + step


def choice_param(key: str, options: Sequence[Any], where: str) -> ChoiceParam:
    """A choice list; an empty one is a configuration error."""
    if len(options) == 0:
        raise SweepConfigError(f"{where}: empty choice list")
    return ChoiceParam(key, tuple(to_native(o) for o in options))


def scalar_param_from_mapping(key: str, spec: Mapping[str, Any], where: str) -> ScalarParam:
    """Validate ``{lower, upper, log, integer, init, step}`` and build a ``ScalarParam``."""
    unknown = sorted(set(spec) - set(SCALAR_SPEC_KEYS))
    if unknown:
        # {optim: {lr: ...}} usually comes from `hydra.sweeper.params.optim.lr=...`
        nested = len(unknown) == len(spec)
        hint = f" (a nested key? write it dotted: '{key}.{unknown[0]}')" if nested else ""
        raise SweepConfigError(
            f"{where}: unknown scalar spec key(s) {unknown}; allowed: {list(SCALAR_SPEC_KEYS)}"
            + hint
        )
    numbers = {k: spec.get(k) for k in ("lower", "upper", "init", "step")}
    for name, value in numbers.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise SweepConfigError(f"{where}: {name} must be a number, got {value!r}")
    flags = {k: spec.get(k, False) for k in ("log", "integer")}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise SweepConfigError(f"{where}: {name} must be true or false, got {value!r}")
    lower, upper, init, step = (numbers[k] for k in ("lower", "upper", "init", "step"))
    if (lower is None) != (upper is None):
        raise SweepConfigError(f"{where}: give both lower and upper (or neither, with init)")
    if lower is None and init is None:
        raise SweepConfigError(f"{where}: needs lower and upper (or an init value)")
    if lower is not None and lower >= upper:
        raise SweepConfigError(f"{where}: lower ({lower}) must be < upper ({upper})")
    if flags["log"] and any(v is not None and v <= 0 for v in (lower, init)):
        raise SweepConfigError(f"{where}: log scale needs lower (and init) > 0")
    if init is not None and lower is not None and not lower <= init <= upper:
        raise SweepConfigError(f"{where}: init ({init}) outside [{lower}, {upper}]")
    if step is not None and step <= 0:
        raise SweepConfigError(f"{where}: step must be > 0, got {step}")
    if flags["integer"] and any(v is not None and v != int(v) for v in (lower, upper)):
        raise SweepConfigError(f"{where}: integer bounds must be whole numbers")
    return ScalarParam(
        key,
        lower=None if lower is None else float(lower),
        upper=None if upper is None else float(upper),
        log=flags["log"],
        integer=flags["integer"],
        init=None if init is None else float(init),
        step=None if step is None else float(step),
    )


def nevergrad_parameter(spec: Param) -> Any:
    """The ``ng.p`` parameter of one spec (imported lazily, see module docstring)."""
    import nevergrad as ng

    if isinstance(spec, ChoiceParam):
        # deterministic: the point's largest weight picks the option, so a point (what BO
        # models) always maps to the same option instead of a random draw.
        return ng.p.Choice(list(spec.options), deterministic=True)
    lower, upper = spec.lower, spec.upper
    if spec.integer and lower is not None and upper is not None:
        # Rounding to the nearest int would give the end points half the mass of the
        # inner values; widening by just under 0.5 makes all integers equally likely.
        lower, upper = lower - 0.499, upper + 0.499
    if spec.log:
        param = ng.p.Log(init=spec.init, exponent=spec.step, lower=lower, upper=upper)
    else:
        param = ng.p.Scalar(init=spec.init, lower=lower, upper=upper)
        if spec.step is not None:
            param.set_mutation(sigma=spec.step)
    if spec.integer:
        param.set_integer_casting()
    return param


def make_optimizer(space: SearchSpace, optim: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """A fresh, seeded nevergrad optimizer for ``space`` and nevergrad's construction
    warnings (one line each; BO warns about choice/integer parameters on every start).

    ``optim`` holds ``optimizer``, ``budget``, ``num_workers`` and ``seed`` (None:
    unseeded). Raises ``SweepConfigError`` if nevergrad cannot build it.
    """
    import nevergrad as ng
    import numpy as np

    name, budget = str(optim["optimizer"]), int(optim["budget"])
    num_workers = int(optim["num_workers"])
    try:
        parametrization = ng.p.Dict(
            **{n: nevergrad_parameter(spec) for n, spec in space.params.items()}
        )
        if optim.get("seed") is not None:
            parametrization.random_state = np.random.RandomState(int(optim["seed"]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer = ng.optimizers.registry[name](
                parametrization=parametrization, budget=budget, num_workers=num_workers
            )
    except Exception as err:
        raise SweepConfigError(
            f"hydra.sweeper.optim: nevergrad cannot build {name} for this search space "
            f"(num_workers={num_workers}): {first_line(err)}"
        ) from err
    return optimizer, [first_line(w.message) for w in caught]


def asks_one_at_a_time(name: str) -> bool:
    """True for optimizers that propose one point at a time (e.g. BO): with
    ``num_workers > 1`` a batch may then repeat a point."""
    import nevergrad as ng

    return bool(getattr(ng.optimizers.registry[name], "no_parallelization", 0))
