"""Options: how a config field is offered on the command line, and checks of numeric options.

A config dataclass declares each field's command-line face once, in ``dataclasses.field(metadata=
option(...))`` (help, choices, flag spelling, metavar); ``relapse.cli.fields`` builds the argparse options
and the config back from that, so a field, its flag and its mapping cannot drift apart. Only fields that
carry an :func:`option` are on the command line; the rest (set in experiment files) keep their defaults.

Checks of numeric options, shared by every config that takes them:

Comparisons alone let NaN through (``nan <= 0`` is false), and an infinite learning rate or loss weight
is as useless as a negative one, so every check here also demands a finite number. A value that is not a
number at all (YAML reads ``1e-4``, without a dot, as a string) is refused by name too, instead of
failing later in a comparison. Each error names the option as the CLI spells it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from relapse.errors import ConfigError

#: The key under which :func:`option` stores its :class:`Option` in a field's metadata.
OPTION_KEY = "relapse.option"


@dataclass(frozen=True)
class Option:
    """A config field's command-line face; see :func:`option`."""

    help: str | None = None
    flag: str | None = None
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None
    metavar: str | None = None
    off: Any = None
    exclusive: str | None = None


def option(
    help: str | None = None,
    *,
    flag: str | None = None,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    metavar: str | None = None,
    off: Any = None,
    exclusive: str | None = None,
) -> dict[str, Option]:
    """Field metadata that puts a config field on the command line.

    ``help`` may name the default as argparse does (``%(default)s``). ``flag`` is the option's spelling
    when it is not ``--`` plus the field name with dashes; ``choices`` is a sequence, or a function that
    returns one (for registries filled on first use). ``off`` is the command-line value that stands for
    ``None`` (``--max-grad-norm 0``: no clipping), for fields whose ``None`` has no spelling of its own.
    Fields with the same ``exclusive`` name are mutually exclusive (``--steps`` or ``--epochs``).
    """
    spec = Option(help, flag, choices, metavar, off, exclusive)
    return {OPTION_KEY: spec}


def finite(value: Any, option: str) -> float:
    """``value`` as a float; refused unless it is a finite real number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = " (YAML reads 1e-4 as text: write 1.0e-4)" if isinstance(value, str) else ""
        raise ConfigError(f"{option} must be a number, got {value!r}{hint}")
    if not math.isfinite(value):
        raise ConfigError(f"{option} must be a finite number, got {value}")
    return float(value)


def positive(value: Any, option: str) -> float:
    """``value``, which must be finite and > 0."""
    if finite(value, option) <= 0:
        raise ConfigError(f"{option} must be positive, got {value}")
    return float(value)


def non_negative(value: Any, option: str) -> float:
    """``value``, which must be finite and >= 0."""
    if finite(value, option) < 0:
        raise ConfigError(f"{option} must be zero or more, got {value}")
    return float(value)


def in_range(value: Any, option: str, low: float, high: float) -> float:
    """``value``, which must lie in the closed interval ``[low, high]``."""
    if not low <= finite(value, option) <= high:
        raise ConfigError(f"{option} must be in [{low:g}, {high:g}], got {value}")
    return float(value)


def whole(value: Any, option: str, minimum: int) -> int:
    """``value``, which must be an integer (not a bool, not a float) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{option} must be a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{option} must be at least {minimum}, got {value}")
    return int(value)


def optional(check, value: Any, option: str, *args: Any) -> Any:
    """``check(value, option, *args)`` unless ``value`` is None (the option is off)."""
    return None if value is None else check(value, option, *args)
