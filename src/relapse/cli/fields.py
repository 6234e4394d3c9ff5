"""Config dataclasses as argparse options, and the config back from the parsed arguments.

A field is on the command line when its metadata holds a :class:`relapse.options.Option` (see
:func:`relapse.options.option`); a field whose type is itself a dataclass (``TrainConfig.tiny``) offers
the options of its own fields. The type annotation gives the rest: ``int``/``float`` convert, a list
takes one or more values, a ``bool`` is a switch, ``X | None`` is ``X`` with ``None`` as its default, and
a field without a default is a required option. Defaults are the dataclass's, so ``relapse train``'s
defaults are ``TrainConfig()``'s by construction.

Only the standard library is imported here: building ``relapse --help`` must stay light.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterator
from typing import Any

from relapse.options import OPTION_KEY, Option


@dataclasses.dataclass(frozen=True)
class ConfigOption:
    """One command-line option of a config: the field it sets (a path through nested configs) and how."""

    path: tuple[str, ...]
    spec: Option
    kind: type
    many: bool
    default: Any
    required: bool

    @property
    def flag(self) -> str:
        return self.spec.flag or "--" + self.path[-1].replace("_", "-")

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def config_options(cls: type) -> list[ConfigOption]:
    """The command-line options of dataclass ``cls``, in field order (nested configs in place)."""
    return list(_walk(cls, ()))


def _walk(cls: type, prefix: tuple[str, ...]) -> Iterator[ConfigOption]:
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        spec = field.metadata.get(OPTION_KEY)
        hint = hints[field.name]
        if spec is None:
            if dataclasses.is_dataclass(hint):
                yield from _walk(hint, (*prefix, field.name))
            continue
        kind, many = _unwrap(hint)
        default, required = _default(field)
        yield ConfigOption((*prefix, field.name), spec, kind, many, default, required)


def _unwrap(hint: Any) -> tuple[type, bool]:
    """``(element type, is a list)`` of an annotation, with ``| None`` dropped."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"a command-line option needs one type, not {hint}")
        hint = rest[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _default(field: dataclasses.Field) -> tuple[Any, bool]:
    if field.default is not dataclasses.MISSING:
        return field.default, False
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory(), False
    return None, True


def add_config_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add an option to ``parser`` for every command-line field of dataclass ``cls``."""
    exclusive: dict[str, Any] = {}
    for option in config_options(cls):
        spec = option.spec
        where: Any = parser
        if spec.exclusive is not None:
            if spec.exclusive not in exclusive:
                exclusive[spec.exclusive] = parser.add_mutually_exclusive_group()
            where = exclusive[spec.exclusive]
        kwargs: dict[str, Any] = {"dest": option.dest, "help": spec.help}
        if option.kind is bool:
            kwargs["action"] = "store_false" if option.default else "store_true"
        else:
            choices = spec.choices() if callable(spec.choices) else spec.choices
            kwargs.update(default=option.default, choices=choices, metavar=spec.metavar)
            if option.kind is not str:
                kwargs["type"] = option.kind
            if option.many:
                kwargs["nargs"] = "+"
            if option.required:
                kwargs["required"] = True
        where.add_argument(option.flag, **kwargs)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The ``cls`` the parsed ``args`` describe: command-line fields from ``args``, the rest defaults."""
    values: dict[tuple[str, ...], Any] = {}
    for option in config_options(cls):
        value = getattr(args, option.dest)
        if option.spec.off is not None and value == option.spec.off:
            value = None  # the spelling of "off" (only it; any other value is the config's to check)
        values[option.path] = value
    return _build(cls, values, ())


def _build(cls: type, values: dict[tuple[str, ...], Any], prefix: tuple[str, ...]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        path = (*prefix, field.name)
        if path in values:
            kwargs[field.name] = values[path]
        elif any(key[: len(path)] == path for key in values):
            kwargs[field.name] = _build(hints[field.name], values, path)
    return cls(**kwargs)
