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
from rasterio.windows import Window

from nec_serve.errors import InvalidInput

__all__ = ["write_geotiff", "GeoTiffWriter", "WRITE_CACHE_MB"]


#: GDAL's block cache while a GeoTIFF is written tile by tile (MB): what bounds the memory
#: of writing an image, whatever its size.
WRITE_CACHE_MB = 128


def _profile(
    shape: tuple[int, int, int], dtype: Any, geo: Mapping[str, Any] | None
) -> dict[str, Any]:
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": shape[1],
        "width": shape[2],
        "count": shape[0],
        "dtype": np.dtype(dtype).name,
        "compress": "deflate",
        "predictor": 2,
    }
    if geo:
        try:
            profile["crs"] = CRS.from_user_input(geo["crs"])
            profile["transform"] = Affine(*[float(v) for v in geo["transform"]])
        except (CRSError, KeyError, TypeError, ValueError) as err:
            raise InvalidInput(f"unusable georeferencing {dict(geo)!r}: {err}") from err
    return profile


class GeoTiffWriter:
    """A deflate-compressed GeoTIFF written window by window, in bounded memory.

    Windows may come in any order; GDAL keeps at most :data:`WRITE_CACHE_MB` of blocks
    in memory and writes the rest to the file. Pixels no window covers read as 0.
    Use as a context manager; band descriptions and tags are set on close.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        shape: tuple[int, int, int],
        dtype: Any,
        geo: Mapping[str, Any] | None,
        band_names: Sequence[str],
        tags: Mapping[str, Any] | None = None,
    ):
        if len(shape) != 3 or len(band_names) != shape[0]:
            raise InvalidInput(
                f"cannot write {tuple(shape)} with {len(band_names)} band names as a GeoTIFF"
            )
        self.path = Path(path)
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self._names = [str(n) for n in band_names]
        self._tags = {k: str(v) for k, v in (tags or {}).items()}
        self._env = rasterio.Env(GDAL_CACHEMAX=WRITE_CACHE_MB, GDAL_PAM_ENABLED="NO")
        with self._env:
            self._ds = rasterio.open(self.path, "w", **_profile(self.shape, self.dtype, geo))

    def write(self, block: np.ndarray, row: int, col: int) -> None:
        """Write ``(bands, h, w)`` pixels with their top-left corner at ``(row, col)``."""
        _, h, w = block.shape
        with self._env:
            self._ds.write(block.astype(self.dtype, copy=False), window=Window(col, row, w, h))

    def close(self) -> None:
        """Set descriptions and tags, and write what is still cached."""
        with self._env:
            try:
                for i, name in enumerate(self._names, 1):
                    self._ds.set_band_description(i, name)
                if self._tags:
                    self._ds.update_tags(**self._tags)
            finally:
                self._ds.close()

    def __enter__(self) -> GeoTiffWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_geotiff(
    path: str | os.PathLike[str],
    array: np.ndarray,
    geo: Mapping[str, Any] | None,
    band_names: Sequence[str],
    tags: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``(bands, H, W)`` as a deflate-compressed, striped GeoTIFF.

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
    if array.ndim != 3:
        raise InvalidInput(f"cannot write {tuple(array.shape)} as a GeoTIFF: need (bands, H, W)")
    with GeoTiffWriter(path, array.shape, array.dtype, geo, band_names, tags) as out:
        out.write(array, 0, 0)
    return Path(path)
