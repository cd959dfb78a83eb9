"""Imagery I/O: read rasters, validate pixels, normalise, tile and stream archives.

Everything here is NumPy and rasterio only (no PyTorch), so a wrapper image that only
prepares tiles and entropy-codes does not need the model stack. One module per stage:

    * :mod:`~nec_serve.imagery.normalisation`: :class:`Normalisation` (NumPy only).
    * :mod:`~nec_serve.imagery.tiling`: :class:`TileGrid`, :func:`tile_image`,
      :func:`untile`, :func:`check_pixels` (NumPy only).
    * :mod:`~nec_serve.imagery.limits`: :class:`InputLimits`, the per-input budget and
      band selections (NumPy only).
    * :mod:`~nec_serve.imagery.readers`: GeoTIFF, ``.npy`` and BigEarthNet-S2 patches
      (the one module that imports rasterio).
    * :mod:`~nec_serve.imagery.archives`: streamed tar archives.
    * :mod:`~nec_serve.imagery.inputs`: :func:`iter_inputs`, one input of any kind.

The names below are resolved on first use (PEP 562), each from its own module, so
``from nec_serve.imagery import Normalisation`` imports neither rasterio nor the
archive readers.

Conventions:
    * Arrays are channel-first, ``(bands, H, W)``, in the file's dtype until
      :class:`Normalisation` turns them into float32 model input.
    * Band indices are 1-based, as in GDAL and rasterio, for GeoTIFF and ``.npy`` alike.
    * Every error a user can cause is an :class:`~nec_serve.errors.InvalidInput` whose
      message names the file (and archive member) and, where there is one, the fix.
    * What a file declares (a ``.npy`` header, a GeoTIFF's size, bands and dtype) is
      checked against :class:`InputLimits` before any pixel is allocated or read, and
      all images of one input share one ``max_decoded_bytes`` budget.

Typical use::

    for name, raw in iter_inputs("scenes/"):
        tiles, grid = tile_image(raw, 224)
        x = Normalisation.for_dtype(raw.dtype, raw.shape[0]).apply(tiles)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy names are, for type checkers; nothing is imported at runtime
    from nec_serve.imagery.archives import ARCHIVE_SUFFIXES, iter_tar_tiles
    from nec_serve.imagery.inputs import iter_inputs
    from nec_serve.imagery.limits import InputLimits, parse_bands
    from nec_serve.imagery.normalisation import IMAGENET_MEAN, IMAGENET_STD, Normalisation
    from nec_serve.imagery.readers import (
        BIGEARTHNET_RGB,
        BIGEARTHNET_SIZE,
        RASTER_SUFFIXES,
        is_bigearthnet_patch,
        read_bigearthnet_patch,
        read_raster,
        read_raster_bytes,
    )
    from nec_serve.imagery.tiling import TileGrid, check_pixels, tile_image, untile

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BIGEARTHNET_RGB",
    "BIGEARTHNET_SIZE",
    "RASTER_SUFFIXES",
    "ARCHIVE_SUFFIXES",
    "InputLimits",
    "parse_bands",
    "Normalisation",
    "TileGrid",
    "read_raster",
    "read_raster_bytes",
    "read_bigearthnet_patch",
    "is_bigearthnet_patch",
    "check_pixels",
    "tile_image",
    "untile",
    "iter_tar_tiles",
    "iter_inputs",
]

# The module that defines each public name.
_MODULES = {
    "normalisation": ("IMAGENET_MEAN", "IMAGENET_STD", "Normalisation"),
    "limits": ("InputLimits", "parse_bands"),
    "tiling": ("TileGrid", "check_pixels", "tile_image", "untile"),
    "readers": (
        "BIGEARTHNET_RGB",
        "BIGEARTHNET_SIZE",
        "RASTER_SUFFIXES",
        "read_raster",
        "read_raster_bytes",
        "read_bigearthnet_patch",
        "is_bigearthnet_patch",
    ),
    "archives": ("ARCHIVE_SUFFIXES", "iter_tar_tiles"),
    "inputs": ("iter_inputs",),
}
# Name here -> (module, name there).
_LAZY = {name: (module, name) for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first access (PEP 562)."""
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value  # later lookups find it without calling __getattr__
    return value


def __dir__() -> list[str]:
    """The module's attributes, the lazy names included."""
    return sorted(set(globals()) | set(_LAZY))
