"""Writing decoded bands as GeoTIFF (uses rasterio), the RVQ family's output."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.transform import Affine

from nec_serve.errors import InvalidInput

__all__ = ["write_geotiff"]


def write_geotiff(
    path: str | os.PathLike[str],
    array: np.ndarray,
    geo: Mapping[str, Any] | None,
    band_names: Sequence[str],
    tags: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``(bands, H, W)`` as a deflate-compressed tiled-free GeoTIFF.

    Args:
        path: the file to write (overwritten).
        array: the pixels, in the dtype to store.
        geo: ``{"crs", "transform"}`` as a reader recorded them (:class:`GeoArray`), or
            None for a raster without georeferencing.
        band_names: one description per band.
        tags: dataset tags (model, codebooks, ...).

    Raises:
        InvalidInput: a band name count that does not fit, or an unusable CRS/transform.
    """
    if array.ndim != 3 or len(band_names) != array.shape[0]:
        raise InvalidInput(
            f"cannot write {tuple(array.shape)} with {len(band_names)} band names as a GeoTIFF"
        )
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": array.shape[1],
        "width": array.shape[2],
        "count": array.shape[0],
        "dtype": array.dtype.name,
        "compress": "deflate",
        "predictor": 2,
    }
    if geo:
        try:
            profile["crs"] = CRS.from_user_input(geo["crs"])
            profile["transform"] = Affine(*[float(v) for v in geo["transform"]])
        except (CRSError, KeyError, TypeError, ValueError) as err:
            raise InvalidInput(f"unusable georeferencing {dict(geo)!r}: {err}") from err
    path = Path(path)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(array)
        for i, name in enumerate(band_names, 1):
            ds.set_band_description(i, str(name))
        if tags:
            ds.update_tags(**{k: str(v) for k, v in tags.items()})
    return path
