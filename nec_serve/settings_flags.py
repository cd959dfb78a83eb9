"""Command-line flags declared by the settings dataclasses they fill.

A flag's default is read from its settings field, so a default is written once: in the
dataclass. ``dataclasses.MISSING`` fields (required settings) give no default.
"""

from __future__ import annotations

import dataclasses

__all__ = ["field_default", "add_field_flag"]


def field_default(cls: type, name: str):
    """The default of the dataclass field ``name`` of ``cls`` (None for a required field)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return None
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def add_field_flag(parser, flag: str, cls: type, name: str, **kwargs) -> None:
    """Add ``flag`` to ``parser`` with the default of ``cls.name`` (``dest`` stays the flag's)."""
    parser.add_argument(flag, default=field_default(cls, name), **kwargs)
