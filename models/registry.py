"""Create models by name.

Architectures register a builder with :func:`register_model`; everything else calls
:func:`create_model`. Names follow the official NEC code (``mae_vit_compress_adapter``,
``vit_base_compressed``) so that a checkpoint's training command names its model here.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

from nec_serve.errors import UnknownModel

__all__ = ["register_model", "create_model", "list_models"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``fn`` as the builder of model ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model in eval mode.

    Args:
        name: registry name, e.g. ``"mae_vit_compress_adapter"``.
        **kwargs: passed to the builder (``img_size``, ``num_classes``, ...).

    Raises:
        UnknownModel: ``name`` is not registered; the message lists close matches.
    """
    try:
        builder = _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModel(
            f"unknown model {name!r}{hint} Known models: {', '.join(list_models())}"
        ) from None
    model = builder(**kwargs)
    model.registry_name = name
    return model.eval()
