"""Tiling of images into square model tiles and back, and the pixel check (NumPy only).

:func:`tile_image` cuts a ``(bands, H, W)`` image into row-major ``tile x tile`` tiles,
padded at the bottom and right edges, and describes the cut with a :class:`TileGrid`;
:func:`untile` reassembles tiles and crops the padding. :func:`check_pixels` refuses
images the model cannot take (wrong rank, empty, NaN or infinite values).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from nec_serve.errors import InvalidInput
from nec_serve.imagery.limits import positive_int

__all__ = ["TileGrid", "tile_image", "untile", "check_pixels"]


def check_pixels(array: np.ndarray, name: str) -> None:
    """Refuse arrays the model cannot take: wrong rank, empty, NaN or infinite values.

    Args:
        array: image shaped ``(bands, H, W)``.
        name: what to call the image in the error (file or member name).

    Raises:
        InvalidInput: for a non-array or non-numeric dtype, ``ndim != 3``, an empty array,
            or NaN/inf values (with their count and the first ``(band, row, col)``).
    """
    if not isinstance(array, np.ndarray):
        raise InvalidInput(f"{name}: expected a NumPy array, got {type(array).__name__}")
    if array.dtype.kind not in "uif":
        raise InvalidInput(f"{name}: unsupported pixel dtype {array.dtype}")
    if array.ndim != 3:
        raise InvalidInput(
            f"{name}: image must be shaped (bands, H, W), got {array.ndim}-d shape "
            f"{tuple(array.shape)}"
        )
    if array.size == 0:
        raise InvalidInput(f"{name}: image is empty, shape {tuple(array.shape)}")
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            count = int(np.count_nonzero(bad))
            first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), array.shape))
            value = array[first]
            raise InvalidInput(
                f"{name}: {count} non-finite pixel value(s) (NaN or inf); first is {value} at "
                f"(band, row, col) = {first}; mask or fill them before compressing"
            )


@dataclass(frozen=True)
class TileGrid:
    """How an image of ``height x width`` was cut into ``rows x cols`` square tiles.

    Attributes:
        height: image height in pixels (before padding).
        width: image width in pixels (before padding).
        tile: tile side in pixels.
        rows: number of tile rows, ``ceil(height / tile)``.
        cols: number of tile columns, ``ceil(width / tile)``.
    """

    height: int
    width: int
    tile: int
    rows: int
    cols: int

    def __post_init__(self) -> None:
        for field in ("height", "width", "tile", "rows", "cols"):
            object.__setattr__(self, field, positive_int(getattr(self, field), f"grid {field}"))
        rows, cols = -(-self.height // self.tile), -(-self.width // self.tile)
        if (self.rows, self.cols) != (rows, cols):
            raise InvalidInput(
                f"inconsistent tile grid: {self.height}x{self.width} in tiles of {self.tile} "
                f"needs {rows}x{cols} tiles, got {self.rows}x{self.cols}"
            )

    @classmethod
    def for_shape(cls, height: int, width: int, tile: int) -> TileGrid:
        """Grid that covers a ``height x width`` image with tiles of side ``tile``."""
        height = positive_int(height, "image height")
        width = positive_int(width, "image width")
        tile = positive_int(tile, "tile size")
        return cls(height, width, tile, -(-height // tile), -(-width // tile))

    @property
    def count(self) -> int:
        """Number of tiles, ``rows * cols``."""
        return self.rows * self.cols

    def origins(self) -> list[tuple[int, int]]:
        """Top-left ``(row, col)`` pixel offsets of the tiles, in row-major order."""
        return [(r * self.tile, c * self.tile) for r in range(self.rows) for c in range(self.cols)]

    def to_dict(self) -> dict[str, int]:
        """JSON-safe form."""
        return {
            "height": self.height,
            "width": self.width,
            "tile": self.tile,
            "rows": self.rows,
            "cols": self.cols,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TileGrid:
        """Inverse of :meth:`to_dict`; validates keys and consistency.

        Args:
            d: mapping with the keys ``height``, ``width``, ``tile``, ``rows``, ``cols``.

        Returns:
            The grid.

        Raises:
            InvalidInput: for missing or unknown keys, non-integers or an inconsistent grid.
        """
        fields = {"height", "width", "tile", "rows", "cols"}
        if not isinstance(d, Mapping):
            raise InvalidInput(f"tile grid must be a mapping, got {type(d).__name__}")
        if set(d) != fields:
            missing = sorted(fields - set(d))
            unknown = sorted(map(str, set(d) - fields))
            raise InvalidInput(
                f"tile grid needs keys {sorted(fields)} (missing {missing}, unknown {unknown})"
            )
        return cls(d["height"], d["width"], d["tile"], d["rows"], d["cols"])


def _pad_axis(array: np.ndarray, axis: int, pad: int) -> np.ndarray:
    if pad == 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, pad)
    # Reflection needs pad <= size - 1; tiny images fall back to repeating the edge.
    mode = "reflect" if pad <= array.shape[axis] - 1 else "edge"
    return np.pad(array, widths, mode=mode)


def tile_image(array: np.ndarray, tile: int) -> tuple[np.ndarray, TileGrid]:
    """Cut ``(bands, H, W)`` into non-overlapping ``tile x tile`` tiles, row-major.

    Edge tiles are padded to full size by reflection at the bottom and right edges (edge
    replication where the image is too small to reflect); an image smaller than one tile
    gives one padded tile. :func:`untile` crops the padding again.

    Args:
        array: image shaped ``(bands, H, W)``, any dtype (kept).
        tile: tile side in pixels.

    Returns:
        ``(tiles, grid)`` with tiles shaped ``(grid.count, bands, tile, tile)``.

    Raises:
        InvalidInput: for a non-3-d or empty array or a non-positive tile size.
    """
    tile = positive_int(tile, "tile size")
    array = np.asarray(array)
    if array.ndim != 3 or array.size == 0:
        raise InvalidInput(
            f"tile_image needs a non-empty (bands, H, W) array, got shape {tuple(array.shape)}"
        )
    bands, height, width = array.shape
    grid = TileGrid.for_shape(height, width, tile)
    padded = _pad_axis(array, 1, grid.rows * tile - height)
    padded = _pad_axis(padded, 2, grid.cols * tile - width)
    tiles = (
        padded.reshape(bands, grid.rows, tile, grid.cols, tile)
        .transpose(1, 3, 0, 2, 4)
        .reshape(grid.count, bands, tile, tile)
    )
    return np.ascontiguousarray(tiles), grid


def untile(tiles: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Reassemble tiles from :func:`tile_image` into ``(C, H, W)``, cropping the padding.

    Args:
        tiles: array shaped ``(grid.count, C, grid.tile, grid.tile)``; ``C`` may differ from
            the band count of the original image (e.g. reconstructions or feature maps
            resized to the tile size).
        grid: the grid returned by :func:`tile_image`.

    Returns:
        C-contiguous array shaped ``(C, grid.height, grid.width)``.

    Raises:
        InvalidInput: when the tiles do not match the grid.
    """
    if not isinstance(grid, TileGrid):
        raise InvalidInput(f"untile needs a TileGrid, got {type(grid).__name__}")
    tiles = np.asarray(tiles)
    t = grid.tile
    if tiles.ndim != 4 or tiles.shape[0] != grid.count or tiles.shape[2:] != (t, t):
        raise InvalidInput(
            f"tiles shaped {tuple(tiles.shape)} do not fit the grid; expected "
            f"({grid.count}, C, {t}, {t}) for {grid.rows}x{grid.cols} tiles"
        )
    channels = tiles.shape[1]
    full = (
        tiles.reshape(grid.rows, grid.cols, channels, t, t)
        .transpose(2, 0, 3, 1, 4)
        .reshape(channels, grid.rows * t, grid.cols * t)
    )
    return np.ascontiguousarray(full[:, : grid.height, : grid.width])
