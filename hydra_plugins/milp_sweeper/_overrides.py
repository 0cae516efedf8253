"""Values <-> Hydra override text, and the sweeper's configuration error.

Contract:

- ``format_value(v)`` writes an override value that Hydra's parser reads back as exactly
  ``v`` (same value, same type): floats as their shortest round-tripping ``repr``, ints as
  ints, strings quoted only when Hydra would read them as something else (``"8"``).
- ``to_native`` / ``unquote`` turn what Hydra's parser or nevergrad hands over (numpy
  scalars, ``QuotedString``, OmegaConf nodes) into plain JSON/YAML values.
- ``param_name(key)`` is the name of a searched key in nevergrad and in the trial log:
  the override key without its ``+``/``++``/``~`` prefix.
- ``SweepConfigError`` is the one exception for a bad sweep configuration; the Hydra CLI
  prints it as one line (exit code 1).

Imports only Hydra and OmegaConf (this module loads only when a sweep runs: its name
starts with ``_``, so Hydra's plugin scanner skips it).
"""

import functools
from collections.abc import Sequence
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import QuotedString
from hydra.errors import CompactHydraException, HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf


class SweepConfigError(CompactHydraException, ValueError):
    """The sweep configuration is invalid; raised before any trial is launched.

    A ``CompactHydraException``: the Hydra CLI prints just the one-line message (exit 1).
    """


def param_name(key: str) -> str:
    """Name of a parameter in nevergrad and in the trial log: the key without +/++/~."""
    return key.lstrip("+~")


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


def first_line(err: BaseException | Warning | str) -> str:
    """First non-empty line of an exception or warning message (Hydra's can be long)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
