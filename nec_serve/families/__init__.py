"""The model families, one module each; every module here registers its family on import.

:func:`nec_serve.contract.model_family` loads them all the first time a family is looked
up, so a new family is a new module here (and its PyTorch side under
``nec_export.families``), with no list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil

__all__ = ["load_families"]


def load_families() -> None:
    """Import every module of this package (each registers its family once)."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")
