"""``milp_nevergrad``: a resumable Hydra sweeper driven by nevergrad (BO by default).

Reading order: errors -> search space (config + command line) -> validation -> values and
overrides -> nevergrad -> trial log and output files -> the Sweeper class (ask/launch/tell,
resume, summary) -> optional W&B summary run.

Each trial is one Hydra job: the sweeper asks nevergrad for ``num_workers`` points, turns
them into override lists, launches them together through the configured Hydra launcher,
appends one JSON line per trial to ``<sweep dir>/trials.jsonl`` and tells nevergrad the
results. Re-running the same command on the same sweep dir replays that log and runs only
the missing trials. Optionally (``final_overrides``) the best trial then runs once more with
extra overrides (e.g. ``split=test``), recorded so that a re-run does not repeat it.

nevergrad (~3 s to import) and wandb are imported lazily: Hydra imports this module in
*every* app for plugin discovery, and configuration errors are reported before either loads.
No ``from __future__ import annotations`` here or in config.py: Hydra's plugin scanner
executes these modules before registering them in ``sys.modules``, where dataclasses with
string annotations crash (and a crash there would break every Hydra app).
"""

import difflib
import functools
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    QuotedString,
    RangeSweep,
)
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException, HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

#: Keys accepted in a scalar spec such as ``{lower: 1e-4, upper: 1e-2, log: true}``.
SCALAR_SPEC_KEYS = ("lower", "upper", "log", "integer", "init", "step")
#: File a job leaves in its output dir with its wall time (read back and deleted).
DURATION_FILE = ".milp_sweeper_duration.json"
#: Record of the final evaluation (``final_overrides``) in the sweep dir.
FINAL_FILE = "final_evaluation.json"
#: The only W&B modes allowed: the sweeper never talks to the network.
_WANDB_MODES = ("offline", "disabled")


class SweepConfigError(CompactHydraException, ValueError):
    """The sweep configuration is invalid; raised before any trial is launched.

    A ``CompactHydraException``: the Hydra CLI prints just the one-line message (exit 1).
    """


class _ReplayMismatch(Exception):
    """Replaying the trial log asked a point other than the logged one (see ``_search``)."""


# --------------------------------------------------------------------------------------
# Search space
# --------------------------------------------------------------------------------------


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


def param_name(key: str) -> str:
    """Name of a parameter in nevergrad and in the trial log: the key without +/++/~."""
    return key.lstrip("+~")


def build_search_space(
    parametrization: Mapping[str, Any], arguments: Sequence[str], parser: OverridesParser
) -> SearchSpace:
    """Combine ``hydra.sweeper.parametrization`` with the command-line overrides.

    Command-line overrides come last so that ``memory.rank=2,4`` replaces a configured
    ``memory.rank`` entry, the way Hydra's own nevergrad sweeper behaves.
    """
    space = SearchSpace()
    for key, raw in parametrization.items():
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
    """Turn one ``parametrization`` entry into a parameter spec.

    list -> choices; mapping -> scalar spec; string -> Hydra sweep syntax such as
    ``interval(0,1)`` or ``2,4,8`` (a plain string is a fixed value); other -> fixed value.
    """
    where = f"hydra.sweeper.parametrization.{key}"
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
        # {optim: {lr: ...}} usually comes from `hydra.sweeper.parametrization.optim.lr=...`
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


# --------------------------------------------------------------------------------------
# Values <-> override strings
# --------------------------------------------------------------------------------------


def unquote(value: Any) -> Any:
    """Replace Hydra's ``QuotedString`` wrappers (from quoted CLI values) by plain str."""
    if isinstance(value, QuotedString):
        return value.text
    if isinstance(value, list | tuple):
        return [unquote(v) for v in value]
    if isinstance(value, dict):
        return {k: unquote(v) for k, v in value.items()}
    return value


def to_native(value: Any) -> Any:
    """Plain JSON/YAML-friendly Python value (numpy scalars, tuples, OmegaConf nodes)."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()  # numpy / torch scalar
    if isinstance(value, list | tuple):
        return [to_native(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_native(v) for k, v in value.items()}
    return unquote(value)


def format_value(value: Any) -> str:
    """Override text for a value: exact float repr, ints as ints, strings as-is.

    A string is quoted only when Hydra would otherwise read it as something else
    (``"8"``, ``"true"``, text with spaces or commas), so ``model=small`` stays readable.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest string that round-trips: reproducible
    if isinstance(value, str):
        return value if _reads_back_as(value) else _quote(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


@functools.lru_cache(maxsize=4096)
def _reads_back_as(text: str) -> bool:
    """True if ``key=<text>`` parses back to exactly the string ``text``."""
    try:
        override = OverridesParser.create().parse_override(f"k={text}")
    except HydraException:
        return False
    return not override.is_sweep_override() and override.value() == text


def _quote(text: str) -> str:
    """Single-quote a string for Hydra's override grammar."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --------------------------------------------------------------------------------------
# Validation against the composed config
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# nevergrad
# --------------------------------------------------------------------------------------


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


class LossBook:
    """Turns trial records into losses for nevergrad (minimization).

    A failed trial gets a penalty worse than every loss told so far, so the optimizer
    moves away from it; before any trial succeeded it is not told at all (nothing to be
    worse than, and BO cannot take inf/nan). Only the logged order matters, so replaying
    the log reproduces the exact same tells.
    """

    def __init__(self, maximize: bool) -> None:
        self.maximize = maximize
        self.losses: list[float] = []

    def loss(self, record: Mapping[str, Any]) -> float | None:
        """Loss to tell for a record, or None to skip telling it."""
        if record.get("status") == "ok" and record.get("objective") is not None:
            objective = float(record["objective"])
            loss = -objective if self.maximize else objective
            self.losses.append(loss)
            return loss
        if not self.losses:
            return None
        worst, best = max(self.losses), min(self.losses)
        return worst + max(worst - best, 0.1 * abs(worst), 1e-3)


# --------------------------------------------------------------------------------------
# Files: trial log, atomic writes, job durations
# --------------------------------------------------------------------------------------


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line durably (flush + fsync): a killed sweep loses no trial."""
    line = json.dumps(record, sort_keys=False, default=str) + "\n"
    with open(path, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":  # a kill mid-write left a partial line
                handle.write(b"\n")
        handle.write(line.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def read_trial_log(path: Path) -> dict[int, dict[str, Any]]:
    """Finished trials by trial number; unreadable (partially written) lines are skipped."""
    records: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return records
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[int(record["trial"])] = record
        except (ValueError, KeyError, TypeError):
            log.warning("%s:%d: skipping unreadable trial record", path, lineno)
    return records


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file, or None if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def final_job_overrides(overrides: Sequence[str], final: Sequence[str]) -> list[str]:
    """A trial's overrides with ``final`` applied on top: entries for the same key are
    replaced (Hydra rejects some duplicate keys, e.g. config groups)."""
    parser = OverridesParser.create()
    final_keys = {param_name(parser.parse_override(o).get_key_element()) for o in final}
    kept = [
        o
        for o in overrides
        if param_name(parser.parse_override(o).get_key_element()) not in final_keys
    ]
    return [*kept, *final]


def write_atomic(path: Path, text: str) -> None:
    """Write a file via temp file + fsync + os.replace (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def dump_yaml(data: Any) -> str:
    """Readable YAML, keys in insertion order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


class TimedTask:
    """Wraps the task function to leave the job's wall time in its output dir.

    Hydra's ``JobReturn`` carries no timing and launchers may run jobs in other
    processes, so the job itself writes ``DURATION_FILE``; the return value is untouched.
    Module-level class so that launchers which pickle the task (joblib) can do so.
    """

    def __init__(self, task_function: TaskFunction) -> None:
        self.task_function = task_function

    def __call__(self, cfg: DictConfig) -> Any:
        start = time.perf_counter()
        try:
            return self.task_function(cfg)
        finally:
            self._write(time.perf_counter() - start)

    @staticmethod
    def _write(seconds: float) -> None:
        try:
            out = Path(HydraConfig.get().runtime.output_dir)
            (out / DURATION_FILE).write_text(json.dumps({"duration_s": seconds}))
        except Exception:  # timing is best effort; never fail the trial because of it
            pass


def job_output_dir(result: JobReturn) -> str | None:
    """Output directory of a finished job, if the launcher reported its Hydra config."""
    if result.hydra_cfg is None:
        return None
    return OmegaConf.select(result.hydra_cfg, "hydra.runtime.output_dir", default=None)


def pop_job_duration(output_dir: str | None) -> float | None:
    """Read (and remove) the wall time a job wrote through ``TimedTask``."""
    if output_dir is None:
        return None
    path = Path(output_dir) / DURATION_FILE
    try:
        seconds = float(json.loads(path.read_text())["duration_s"])
        path.unlink()
        return round(seconds, 6)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def job_objective(result: JobReturn) -> tuple[float | None, str | None]:
    """(objective, None) for a usable return value, else (None, error message)."""
    if result.status != JobStatus.COMPLETED:
        error = getattr(result, "_return_value", None)  # the exception the job raised
        return None, f"{type(error).__name__}: {error}"
    value = result.return_value
    if value is None or isinstance(value, bool | str | bytes):
        return None, f"task returned {value!r}; it must return the objective (a number)"
    try:
        objective = float(value)
    except (TypeError, ValueError):
        return None, f"task returned a non-numeric {type(value).__name__}: {value!r:.200}"
    if not math.isfinite(objective):
        return None, f"task returned a non-finite objective: {objective}"
    return objective, None


# --------------------------------------------------------------------------------------
# The sweeper
# --------------------------------------------------------------------------------------


@dataclass
class Trial:
    """A point asked from nevergrad, numbered like its Hydra job (``hydra.job.num``)."""

    num: int
    params: dict[str, Any]
    overrides: list[str]
    candidate: Any = None  # ng.p.Parameter


class MilpNevergradSweeper(Sweeper):
    """Hydra sweeper: nevergrad ask/launch/tell with a durable, resumable trial log."""

    def __init__(
        self,
        optim: Mapping[str, Any],
        parametrization: Mapping[str, Any] | None = None,
        trials_file: str = "trials.jsonl",
        wandb: Mapping[str, Any] | None = None,
        final_overrides: Sequence[str] | None = None,
    ) -> None:
        self.optim = _plain(optim)
        self.parametrization = _plain(parametrization or {})
        self.trials_file = trials_file
        self.wandb = _plain(wandb or {})
        self.final_overrides = [str(o) for o in _plain(final_overrides or [])]
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.space = SearchSpace()
        self.records: dict[int, dict[str, Any]] = {}
        self.sweep_dir = Path(".")
        # Added to every launched job, not part of a trial's recorded overrides.
        self.launch_extra: list[str] = []
        self._launched = 0  # jobs launched by this invocation (0: a re-run with nothing to do)
        self._book = LossBook(maximize=True)

    # ---- Hydra plugin API ---------------------------------------------------------

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        """Keep the composed config and create the launcher (with timed task function)."""
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=TimedTask(task_function), config=config
        )

    def sweep(self, arguments: list[str]) -> dict[str, Any]:
        """Validate, (re)run the missing trials, then write the summary files."""
        assert self.config is not None and self.hydra_context is not None
        self.space = self._validated_space(arguments)  # raises before anything is written

        self.sweep_dir = Path(str(self.config.hydra.sweep.dir))
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        self.records = read_trial_log(self.trial_log_path)
        self.launch_extra = self._group_overrides()
        budget = int(self.optim["budget"])
        if self.records:
            log.info(
                "Resuming sweep in %s: %d of %d trials already finished",
                self.sweep_dir,
                len(self.records),
                budget,
            )
        log.info(
            "milp_nevergrad: %s, budget %d, %d per batch, %s; searching %s",
            self.optim["optimizer"],
            budget,
            self.optim["num_workers"],
            "maximize" if self.optim["maximize"] else "minimize",
            ", ".join(self.space.params),
        )
        if len(self.records) < budget:
            self._search()
        else:
            log.info("All %d trials are already in %s", budget, self.trial_log_path)
        best = self._best()
        self._log_best(best)
        final = self._final_evaluation(best) if self.final_overrides and best else None
        return self._finish(best, final)

    def wandb_group(self) -> str:
        """The sweep's W&B group: ``wandb.group`` or the sweep dir's name."""
        return str(self.wandb.get("group") or self.sweep_dir.name)

    def _group_overrides(self) -> list[str]:
        """``<trial_group_key>=<group>`` if that key is in the task config (and not set
        on the command line), else nothing."""
        key = self.wandb.get("trial_group_key")
        if not key or param_name(key) in self.space.fixed or param_name(key) in self.space.params:
            return []
        assert self.config is not None
        if not key_exists(self.config, key):
            log.info("%s is not in the task config: trials are not given a W&B group", key)
            return []
        return [f"{key}={format_value(self.wandb_group())}"]

    # ---- validation ---------------------------------------------------------------

    def _validated_space(self, arguments: Sequence[str]) -> SearchSpace:
        """Every configuration check, cheapest first; nevergrad is imported last."""
        assert self.config is not None and self.hydra_context is not None
        self._check_settings()
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        space = build_search_space(self.parametrization, arguments, parser)
        if not space.params:
            raise SweepConfigError(
                "hydra.sweeper.parametrization: nothing to search (no parameter in the "
                "parametrization and no sweep override on the command line)"
            )
        for name, spec in [*space.params.items(), *space.fixed.items()]:
            check_key(self.config, spec.key, where=f"search space: {name}")
        final = self._parsed_final_overrides(parser)
        for override in final:
            check_key(
                self.config, override.get_key_element(), where="hydra.sweeper.final_overrides"
            )
        self._check_composition(space)
        if final:
            self._check_final_composition(space)
        check_optimizer_name(str(self.optim["optimizer"]))
        self._new_optimizer(space, announce=True)  # e.g. bad optimizer/space combinations
        return space

    def _check_settings(self) -> None:
        """Scalar settings of ``hydra.sweeper``."""
        optim = self.optim
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
        if not self.trials_file:
            raise SweepConfigError("hydra.sweeper.trials_file: must be a file name")
        mode = self.wandb.get("mode", "offline")
        if self.wandb.get("enabled") and mode not in _WANDB_MODES:
            raise SweepConfigError(
                f"hydra.sweeper.wandb.mode: {mode!r} is not allowed; use one of {_WANDB_MODES}"
                " (the sweeper never sends data over the network)"
            )

    def _check_composition(self, space: SearchSpace) -> None:
        """Compose the task config once per choice / bound, so that a typo in a config
        group option or a value of the wrong type fails now, not at trial 17."""
        assert self.config is not None and self.hydra_context is not None
        loader = self.hydra_context.config_loader
        fixed = space.fixed_overrides()
        try:
            loader.load_sweep_config(master_config=self.config, sweep_overrides=list(fixed))
        except Exception as err:
            raise SweepConfigError(
                f"search space: fixed overrides {fixed}: {_first_line(err)}"
            ) from err
        for name, spec in space.params.items():
            for value in probe_values(spec):
                override = f"{spec.key}={format_value(value)}"
                try:
                    loader.load_sweep_config(
                        master_config=self.config, sweep_overrides=[*fixed, override]
                    )
                except Exception as err:
                    raise SweepConfigError(
                        f"search space: {name}: '{override}' does not compose with the task "
                        f"config: {_first_line(err)}"
                    ) from err

    def _parsed_final_overrides(self, parser: OverridesParser) -> list[Override]:
        """``final_overrides`` parsed; each must be a plain (non-sweep) override."""
        parsed = []
        for text in self.final_overrides:
            where = f"hydra.sweeper.final_overrides: {text!r}"
            try:
                override = parser.parse_override(text)
            except HydraException as err:
                raise SweepConfigError(f"{where}: cannot parse: {_first_line(err)}") from err
            if override.is_sweep_override():
                raise SweepConfigError(f"{where}: must be a single value, not a sweep")
            parsed.append(override)
        return parsed

    def _check_final_composition(self, space: SearchSpace) -> None:
        """The final evaluation's overrides compose with the fixed overrides (before any trial)."""
        assert self.config is not None and self.hydra_context is not None
        fixed = final_job_overrides(space.fixed_overrides(), self.final_overrides)
        try:
            self.hydra_context.config_loader.load_sweep_config(
                master_config=self.config, sweep_overrides=fixed
            )
        except Exception as err:
            raise SweepConfigError(
                f"hydra.sweeper.final_overrides {self.final_overrides}: does not compose with "
                f"the task config: {_first_line(err)}"
            ) from err

    # ---- nevergrad ----------------------------------------------------------------

    def _new_optimizer(self, space: SearchSpace | None = None, announce: bool = False) -> Any:
        """A fresh, seeded optimizer; the same seed gives the same sequence of points.

        ``announce`` (once per sweep) logs nevergrad's construction warnings in one line
        each (BO warns about choice/integer parameters on every start) and warns when a
        sequential optimizer gets ``num_workers > 1``.
        """
        import nevergrad as ng
        import numpy as np

        space = self.space if space is None else space
        name, budget = str(self.optim["optimizer"]), int(self.optim["budget"])
        num_workers = int(self.optim["num_workers"])
        try:
            parametrization = ng.p.Dict(
                **{n: nevergrad_parameter(spec) for n, spec in space.params.items()}
            )
            if self.optim.get("seed") is not None:
                parametrization.random_state = np.random.RandomState(int(self.optim["seed"]))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                optimizer = ng.optimizers.registry[name](
                    parametrization=parametrization, budget=budget, num_workers=num_workers
                )
        except Exception as err:
            raise SweepConfigError(
                f"hydra.sweeper.optim: nevergrad cannot build {name} for this search space "
                f"(num_workers={num_workers}): {_first_line(err)}"
            ) from err
        if announce:
            for warning in caught:
                log.info("nevergrad: %s", _first_line(warning.message))  # type: ignore[arg-type]
            if num_workers > 1 and getattr(ng.optimizers.registry[name], "no_parallelization", 0):
                log.warning(
                    "%s proposes points one at a time: with num_workers=%d a batch may repeat "
                    "the same point; consider num_workers=1 or a parallel optimizer (NGOpt, CMA)",
                    name,
                    num_workers,
                )
        self._book = LossBook(maximize=bool(self.optim["maximize"]))
        return optimizer

    def _ask(self, optimizer: Any, num: int) -> Trial:
        """Ask one point and turn it into the job's override list."""
        candidate = optimizer.ask()
        params = {name: to_native(value) for name, value in candidate.value.items()}
        searched = [
            f"{spec.key}={format_value(params[name])}" for name, spec in self.space.params.items()
        ]
        return Trial(num, params, self.space.fixed_overrides() + searched, candidate)

    def _tell(self, optimizer: Any, candidate: Any, record: Mapping[str, Any]) -> None:
        """Tell a trial's loss (or a penalty for a failure; see ``LossBook``)."""
        loss = self._book.loss(record)
        if loss is not None:
            optimizer.tell(candidate, loss)

    # ---- the search loop ----------------------------------------------------------

    @property
    def trial_log_path(self) -> Path:
        """``<sweep dir>/<trials_file>``."""
        return self.sweep_dir / self.trials_file

    def _search(self) -> None:
        """Run trials until ``budget`` are finished, resuming from the trial log.

        Exact resume: with a seed, asking again from a fresh optimizer reproduces the
        logged points, so the loop simply replays them (telling the logged results, not
        launching) and launches only the missing trial numbers. If a replayed point differs
        from the log (seed, budget, optimizer or search space changed), fall back: tell the
        logged trials to a fresh optimizer as points it did not ask, then run the remaining
        trials with new job numbers after the largest logged one.
        """
        budget = int(self.optim["budget"])
        replayable = all(0 <= num < budget for num in self.records)
        if not self.records or (self.optim.get("seed") is not None and replayable):
            try:
                self._run_batches(self._new_optimizer(), first=0, count=budget, replay=True)
                return
            except _ReplayMismatch as mismatch:
                log.warning("%s; resuming by telling the logged trials instead", mismatch)
        optimizer = self._new_optimizer()
        told = self._tell_logged(optimizer)
        log.info("Told the optimizer %d logged trials", told)
        first = max(self.records, default=-1) + 1
        self._run_batches(optimizer, first=first, count=budget - len(self.records), replay=False)

    def _run_batches(self, optimizer: Any, first: int, count: int, replay: bool) -> None:
        """Trials ``first .. first+count-1`` in batches of ``num_workers``: ask, launch
        the ones without a logged record, tell all of them in trial order."""
        num_workers = int(self.optim["num_workers"])
        num, end = first, first + count
        while num < end:
            batch = [self._ask(optimizer, n) for n in range(num, min(num + num_workers, end))]
            if replay:
                self._check_replay(batch)
            self._launch([t for t in batch if t.num not in self.records])
            for trial in batch:
                self._tell(optimizer, trial.candidate, self.records[trial.num])
            num += len(batch)

    def _check_replay(self, batch: Iterable[Trial]) -> None:
        """Raise ``_ReplayMismatch`` if an asked point differs from its logged record."""
        for trial in batch:
            record = self.records.get(trial.num)
            if record is not None and record.get("params") != trial.params:
                raise _ReplayMismatch(
                    f"Trial {trial.num}: replay asked {trial.params} but the log has "
                    f"{record.get('params')}"
                )

    def _tell_logged(self, optimizer: Any) -> int:
        """Tell every logged trial as a point the optimizer did not ask (nevergrad allows
        it, BO included); trials outside the current search space are skipped."""
        told = 0
        for num in sorted(self.records):
            record = self.records[num]
            try:
                candidate = optimizer.parametrization.spawn_child(new_value=record["params"])
            except Exception as err:
                log.warning("Trial %d does not fit the search space, not told: %s", num, err)
                continue
            self._tell(optimizer, candidate, record)
            told += 1
        return told

    def _launch(self, trials: Sequence[Trial]) -> None:
        """Launch trials (contiguous job numbers per launch) and log each result."""
        for group in _contiguous(trials):
            nums = f"#{group[0].num}" + (f"..#{group[-1].num}" if len(group) > 1 else "")
            log.info("Launching batch of %d trial(s): %s", len(group), nums)
            assert self.launcher is not None
            self._launched += len(group)
            results = self.launcher.launch(
                [t.overrides + self.launch_extra for t in group], initial_job_idx=group[0].num
            )
            for trial, result in zip(group, results, strict=True):
                self._record(trial, result)

    def _record(self, trial: Trial, result: JobReturn) -> None:
        """Append the trial's record to the log (durably) and report it."""
        objective, error = job_objective(result)
        output_dir = job_output_dir(result)
        record = {
            "trial": trial.num,
            "status": "ok" if error is None else "failed",
            "objective": objective,
            "duration_s": pop_job_duration(output_dir),
            "error": error,
            "params": trial.params,
            "overrides": trial.overrides,
            "job_dir": output_dir,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        append_jsonl(self.trial_log_path, record)
        self.records[trial.num] = record
        if error is None:
            log.info("Trial %d: objective %.6g  %s", trial.num, objective, trial.params)
        else:
            log.warning("Trial %d failed (search goes on): %s", trial.num, error)

    # ---- end of sweep -------------------------------------------------------------

    def _best(self) -> dict[str, Any] | None:
        """Best ok trial (earliest on ties)."""
        ok = [r for r in self.records.values() if r.get("status") == "ok"]
        if not ok:
            return None
        sign = -1.0 if self.optim["maximize"] else 1.0
        return min(ok, key=lambda r: (sign * float(r["objective"]), int(r["trial"])))

    def _log_best(self, best: Mapping[str, Any] | None) -> None:
        """Report the best trial (or that none succeeded)."""
        n_failed = sum(r.get("status") != "ok" for r in self.records.values())
        if best is None:
            log.warning("No trial succeeded (%d failed); no best.yaml", len(self.records))
            return
        log.info(
            "Best trial %d of %d (%d failed): objective %.6g with %s",
            best["trial"],
            len(self.records),
            n_failed,
            best["objective"],
            " ".join(best["overrides"]),
        )

    @property
    def final_record_path(self) -> Path:
        """Durable record of the final evaluation (what a re-run checks before redoing it)."""
        return self.sweep_dir / FINAL_FILE

    def _final_evaluation(self, best: Mapping[str, Any]) -> dict[str, Any]:
        """Run the best trial once more with ``final_overrides`` (e.g. ``split=test``).

        One job in ``<sweep dir>/final-trial<N>`` (N: the best trial). A re-run of a sweep
        whose final evaluation already succeeded for the same best trial and overrides
        reuses the recorded result instead of launching it again.
        """
        overrides = final_job_overrides(best["overrides"], self.final_overrides)
        subdir = f"final-trial{best['trial']}"
        previous = read_json(self.final_record_path)
        if (
            previous
            and previous.get("status") == "ok"
            and previous.get("trial") == best["trial"]
            and previous.get("overrides") == overrides
        ):
            log.info(
                "Final evaluation (%s) of best trial %d already done: objective %.6g; job %s",
                " ".join(self.final_overrides),
                best["trial"],
                previous["objective"],
                previous.get("job_dir"),
            )
            return previous
        log.info(
            "Final evaluation: best trial %d with %s, in %s",
            best["trial"],
            " ".join(self.final_overrides),
            self.sweep_dir / subdir,
        )
        assert self.launcher is not None
        self._launched += 1
        [result] = self.launcher.launch(
            [[*overrides, *self.launch_extra, f"hydra.sweep.subdir={subdir}"]],
            initial_job_idx=max(self.records, default=-1) + 1,
        )
        objective, error = job_objective(result)
        output_dir = job_output_dir(result)
        record = {
            "trial": best["trial"],
            "status": "ok" if error is None else "failed",
            "objective": objective,
            "search_objective": best["objective"],
            "duration_s": pop_job_duration(output_dir),
            "error": error,
            "overrides": overrides,
            "job_dir": output_dir,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_atomic(self.final_record_path, json.dumps(record, indent=1, default=str) + "\n")
        if error is None:
            log.info(
                "Final evaluation (%s) of best trial %d: objective %.6g (search: %.6g); job %s",
                " ".join(self.final_overrides),
                best["trial"],
                objective,
                best["objective"],
                output_dir,
            )
        else:
            log.warning("Final evaluation failed (re-run the sweep to retry): %s", error)
        return record

    def _finish(
        self, best: dict[str, Any] | None, final: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write best.yaml and optimization_results.yaml, log the best, W&B summary."""
        n_ok = sum(r.get("status") == "ok" for r in self.records.values())
        results = {
            "name": "milp_nevergrad",
            "optimizer": self.optim["optimizer"],
            "budget": int(self.optim["budget"]),
            "num_workers": int(self.optim["num_workers"]),
            "seed": self.optim.get("seed"),
            "maximize": bool(self.optim["maximize"]),
            "n_trials": len(self.records),
            "n_ok": n_ok,
            "n_failed": len(self.records) - n_ok,
            "best_trial": None if best is None else best["trial"],
            "best_evaluated_params": None if best is None else best["params"],
            "best_evaluated_result": None if best is None else best["objective"],
        }
        if final is not None:
            results["final_overrides"] = list(self.final_overrides)
            results["test_result"] = final["objective"]
            results["test_job_dir"] = final["job_dir"]
            results["test_status"] = final["status"]
        results_file = self.sweep_dir / "optimization_results.yaml"
        previous = yaml.safe_load(results_file.read_text()) if results_file.is_file() else None
        write_atomic(results_file, dump_yaml(results))
        if best is not None:
            best_file = {
                "objective": best["objective"],
                "trial": best["trial"],
                # params: the searched dimensions only; overrides: the whole trial job.
                "params": dict(best["params"]),
                "overrides": self._override_mapping(best),
            }
            write_atomic(self.sweep_dir / "best.yaml", dump_yaml(best_file))
        if self.wandb.get("enabled"):
            if self._launched or previous != results:
                self._wandb_summary(best, final)
            else:
                log.info("Nothing new since the last W&B summary run; not writing another")
        return results

    def _override_mapping(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """key -> value of everything a trial overrode (fixed values, then searched)."""
        mapping = {f.key: to_native(f.value) for f in self.space.fixed.values() if f.key[0] != "~"}
        for name, spec in self.space.params.items():
            mapping[spec.key] = record["params"].get(name)
        return mapping

    def _wandb_summary(
        self, best: Mapping[str, Any] | None, final: Mapping[str, Any] | None = None
    ) -> None:
        """One offline W&B run with per-trial objectives, the best-so-far curve and the
        best params as summary. A W&B problem must not fail a finished sweep."""
        try:
            log_wandb_summary(
                settings=self.wandb,
                sweep_dir=self.sweep_dir,
                records=[self.records[n] for n in sorted(self.records)],
                best=best,
                run_config={"optim": self.optim, "search_space": list(self.space.params)},
                maximize=bool(self.optim["maximize"]),
                final=final,
            )
        except Exception as err:
            log.warning("W&B summary run failed: %s", err)


def log_wandb_summary(
    settings: Mapping[str, Any],
    sweep_dir: Path,
    records: Sequence[Mapping[str, Any]],
    best: Mapping[str, Any] | None,
    run_config: Mapping[str, Any],
    maximize: bool,
    final: Mapping[str, Any] | None = None,
) -> None:
    """Write the sweep's W&B summary run (offline, into $WANDB_DIR or the sweep dir)."""
    import wandb

    group = str(settings.get("group") or sweep_dir.name)
    init_kwargs = dict(
        project=settings.get("project") or "milp",
        group=group,
        name=f"{group}-summary",
        job_type="sweep-summary",
        mode=settings.get("mode") or "offline",
        dir=os.environ.get("WANDB_DIR") or str(sweep_dir),
        config=dict(run_config),
    )
    try:
        # A separate run even if a trial (same process with the basic launcher) left one open.
        run = wandb.init(reinit="create_new", **init_kwargs)
    except Exception:  # wandb < 0.19 only knows reinit=True
        run = wandb.init(reinit=True, **init_kwargs)
    pick = max if maximize else min
    best_so_far: float | None = None
    table = wandb.Table(columns=["trial", "status", "objective", "params"])
    for step, record in enumerate(records):
        objective = record.get("objective")
        row: dict[str, Any] = {"trial": record["trial"], "failed": int(objective is None)}
        if objective is not None:
            best_so_far = objective if best_so_far is None else pick(best_so_far, objective)
            row["objective"] = objective
        if best_so_far is not None:
            row["best_so_far"] = best_so_far
        run.log(row, step=step)
        table.add_data(
            record["trial"], record.get("status"), objective, json.dumps(record.get("params"))
        )
    run.log({"trials": table})
    if best is not None:
        run.summary["best_objective"] = best["objective"]
        run.summary["best_trial"] = best["trial"]
        run.summary["best_params"] = dict(best["params"])
    if final is not None and final.get("objective") is not None:
        run.summary["test_result"] = final["objective"]
        run.summary["test_overrides"] = list(final["overrides"])
    run.finish()


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _plain(node: Any) -> Any:
    """OmegaConf node -> plain container (Hydra passes DictConfig kwargs)."""
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node) if isinstance(node, Mapping) else node


def _first_line(err: BaseException) -> str:
    """First non-empty line of an exception message (Hydra's can be long)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _contiguous(trials: Sequence[Trial]) -> Iterator[list[Trial]]:
    """Split trials into runs of consecutive numbers (one launcher call each, so that job
    numbers and output dirs stay equal to trial numbers)."""
    group: list[Trial] = []
    for trial in trials:
        if group and trial.num != group[-1].num + 1:
            yield group
            group = []
        group.append(trial)
    if group:
        yield group
