"""Command-line flags declared by the settings dataclasses they fill.

A setting is declared once, as a field of its settings dataclass (its name, type and
default); :func:`add_settings_flags` turns fields into ``argparse`` flags, so a flag's
default and type are never typed again. A flag is ``--`` plus the field name with ``-`` for
``_`` unless renamed; its ``dest`` is the flag's own (argparse's rule), and
:func:`settings_values` reads the values back by field name. Each flag made this way carries
``settings_field = (cls, name)``, which the tests use to compare every default with its field.

:class:`DeferredParser` adds a subcommand's flags only when that subcommand is parsed or its
help printed: settings classes that live in modules with heavy imports (the trainers' and the
exporter's, which need PyTorch) are then imported only by the command that uses them.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "field_default",
    "add_settings_flags",
    "settings_values",
    "flag_dest",
    "DeferredParser",
]

_SCALARS = (str, int, float, Path)


def field_default(cls: type, name: str) -> Any:
    """The default of the dataclass field ``name`` of ``cls`` (None for a required field)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return None
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def _flag(name: str, rename: Mapping[str, str]) -> str:
    return rename.get(name) or "--" + name.replace("_", "-")


def flag_dest(name: str, rename: Mapping[str, str] | None = None) -> str:
    """The ``argparse`` destination of the flag of field ``name``."""
    return _flag(name, rename or {}).lstrip("-").replace("-", "_")


def _spelling(hint: Any) -> dict | None:
    """``argparse`` keywords for a field of type ``hint``; None when a flag cannot spell it."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _spelling(inner[0]) if len(inner) == 1 else None
    if hint is bool:
        return {"kind": bool}
    if hint in _SCALARS:
        return {"type": str if hint is Path else hint}  # a Path setting converts its string
    if typing.get_origin(hint) is tuple and args and args[0] in _SCALARS:
        same = len(set(args) - {Ellipsis}) == 1
        if same and args[-1] is Ellipsis:
            return {"type": args[0], "nargs": "+"}
        if same:
            return {"type": args[0], "nargs": len(args)}
    return None


def add_settings_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    names: Iterable[str] | None = None,
    *,
    rename: Mapping[str, str] | None = None,
    help: Mapping[str, str] | None = None,  # noqa: A002 - argparse's word
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Add a flag to ``parser`` for each field ``names`` of the settings dataclass ``cls``.

    Args:
        parser: where the flags go.
        cls: the settings dataclass; each flag takes its field's default and type
            (``X | None`` as ``X``, ``tuple[X, ...]`` as one or more values, a ``bool``
            defaulting to False as a switch). A field without a default is a required flag.
        names: the fields to expose; default: every field whose type a flag can spell.
        rename: a field's flag when it is not ``--`` + the field name (``{"backoff_s":
            "--backoff"}``).
        help: help text by field name.
        options: more ``add_argument`` keywords by field name (``choices``, ``type``, ...).

    Raises:
        TypeError: a field named in ``names`` whose type no flag can spell.
    """
    rename, help, options = rename or {}, help or {}, options or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in fields if names is None else names:
        spelling = _spelling(hints[name])
        if spelling is None:
            if names is None:
                continue  # left to its default
            raise TypeError(f"{cls.__name__}.{name}: no flag spells {hints[name]!r}")
        default = field_default(cls, name)
        kwargs: dict[str, Any] = {"help": help.get(name)}
        if spelling.pop("kind", None) is bool:
            kwargs["action"] = "store_true" if not default else argparse.BooleanOptionalAction
            kwargs["default"] = default
        else:
            kwargs.update(spelling)
            f = fields[name]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = list(default) if isinstance(default, tuple) else default
        kwargs.update(options.get(name, {}))
        action = parser.add_argument(_flag(name, rename), **kwargs)
        action.settings_field = (cls, name)


def settings_values(
    args: argparse.Namespace, cls: type, rename: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The fields of ``cls`` that ``args`` holds a value for (None: left to the default)."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, flag_dest(f.name, rename), None)
        if value is not None:
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return values


class DeferredParser(argparse.ArgumentParser):
    """A subcommand's parser whose flags ``populate(parser)`` adds when it is first used."""

    def __init__(
        self, *args, populate: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs
    ):
        """Like ``ArgumentParser``; ``populate`` adds the flags on first use."""
        super().__init__(*args, **kwargs)
        self._populate = populate

    def populate(self) -> DeferredParser:
        """Add the deferred flags now (once); returns the parser."""
        populate, self._populate = self._populate, None
        if populate is not None:
            populate(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        """Parse, after adding the deferred flags."""
        self.populate()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        """The help, after adding the deferred flags."""
        self.populate()
        return super().format_help()

    def format_usage(self) -> str:
        """The usage line, after adding the deferred flags."""
        self.populate()
        return super().format_usage()
