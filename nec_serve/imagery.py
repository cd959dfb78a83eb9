"""Imagery I/O: read rasters, validate pixels, normalise, tile and stream archives.

Everything here is NumPy and rasterio only (no PyTorch), so a wrapper image that only
prepares tiles and entropy-codes does not need the model stack.

Conventions:
    * Arrays are channel-first, ``(bands, H, W)``, in the file's dtype until
      :class:`Normalisation` turns them into float32 model input.
    * Band indices are 1-based, as in GDAL and rasterio, for GeoTIFF and ``.npy`` alike.
    * Every error a user can cause is an :class:`~nec_serve.errors.InvalidInput` whose
      message names the file (and archive member) and, where there is one, the fix.

Typical use::

    for name, raw in iter_inputs("scenes/"):
        tiles, grid = tile_image(raw, 224)
        x = Normalisation.for_dtype(raw.dtype, raw.shape[0]).apply(tiles)
"""

from __future__ import annotations

import bz2
import collections
import gzip
import io
import lzma
import math
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.io import MemoryFile

from nec_serve.errors import InvalidInput

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BIGEARTHNET_RGB",
    "BIGEARTHNET_SIZE",
    "RASTER_SUFFIXES",
    "ARCHIVE_SUFFIXES",
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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Sentinel-2 bands that make the RGB image of a BigEarthNet patch (red, green, blue).
BIGEARTHNET_RGB = ("B04", "B03", "B02")
#: Side of a BigEarthNet-S2 patch at 10 m; coarser bands are upsampled to it.
BIGEARTHNET_SIZE = 120

#: Suffixes :func:`read_raster` accepts (compared case-insensitively).
RASTER_SUFFIXES = (".tif", ".tiff", ".npy")
#: Suffixes :func:`iter_inputs` treats as tar archives (compression is sniffed, not trusted).
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

_GEOTIFF_SUFFIXES = (".tif", ".tiff")
_MiB = 1 << 20
_GiB = 1 << 30
_BLOCK = tarfile.BLOCKSIZE
# Read size of tarfile's stream reader (its default, 10 KiB, costs a Python call per 10 KiB).
_TAR_BUFSIZE = _MiB
# Bytes of the decompressed tar stream allowed on top of max_total_bytes: headers (pax,
# GNU long names), padding and the end-of-archive records.
_STREAM_SLACK_PER_MEMBER = 4096
_STREAM_SLACK = 16 * _MiB
# Everything a tar read may raise for a damaged or truncated stream.
_ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)
_BIGEARTHNET_BAND_FILE = re.compile(r"_B(0[1-9]|1[0-2]|8A)\.tif$")


# --------------------------------------------------------------------------- normalisation


def _float_tuple(value: Any, field: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise InvalidInput(f"normalisation {field} must be a sequence of numbers, got {value!r}")
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise InvalidInput(f"normalisation {field} must hold numbers, got {value!r}") from err
    if not out:
        raise InvalidInput(f"normalisation {field} is empty; give one value per band")
    if not all(math.isfinite(v) for v in out):
        raise InvalidInput(f"normalisation {field} must be finite, got {out}")
    return out


@dataclass(frozen=True)
class Normalisation:
    """Maps raw pixels to model input: ``(raw / scale - mean) / std`` per band.

    Attributes:
        scale: raw values are divided by it to land in about ``[0, 1]`` (255 for uint8,
            10000 for Sentinel-2 L2A reflectance).
        mean: per-band mean of the ``[0, 1]`` data, one value per band.
        std: per-band standard deviation of the ``[0, 1]`` data, one positive value per band.
    """

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float, np.number)):
            raise InvalidInput(f"normalisation scale must be a number, got {self.scale!r}")
        scale = float(self.scale)
        if not math.isfinite(scale) or scale <= 0:
            raise InvalidInput(f"normalisation scale must be finite and > 0, got {scale}")
        mean = _float_tuple(self.mean, "mean")
        std = _float_tuple(self.std, "std")
        if len(mean) != len(std):
            raise InvalidInput(
                f"normalisation has {len(mean)} mean value(s) but {len(std)} std value(s); "
                "give one of each per band"
            )
        if any(s <= 0 for s in std):
            raise InvalidInput(f"normalisation std must be > 0 for every band, got {std}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def bands(self) -> int:
        """Number of bands this normalisation is for."""
        return len(self.mean)

    @classmethod
    def for_dtype(cls, dtype: Any, bands: int) -> Normalisation:
        """Default normalisation for raw data of ``dtype`` with ``bands`` bands.

        uint8 is scaled by 255, uint16 by 10000 (Sentinel-2 L2A reflectance; products of
        processing baseline 04.00 and later carry a +1000 offset that this does not remove),
        floats by 1. Three bands get the ImageNet mean and std (the NEC ViT's RGB input);
        any other band count gets mean 0 and std 1.

        Args:
            dtype: NumPy dtype (or anything ``np.dtype`` accepts) of the raw pixels.
            bands: number of bands.

        Returns:
            The normalisation.

        Raises:
            InvalidInput: for other dtypes (pass a :class:`Normalisation` explicitly) or a
                band count below 1.
        """
        if isinstance(bands, bool) or not isinstance(bands, (int, np.integer)) or bands < 1:
            raise InvalidInput(f"band count must be a positive integer, got {bands!r}")
        try:
            dt = np.dtype(dtype)
        except TypeError as err:
            raise InvalidInput(f"not a NumPy dtype: {dtype!r}") from err
        if dt == np.uint8:
            scale = 255.0
        elif dt == np.uint16:
            scale = 10000.0
        elif dt.kind == "f":
            scale = 1.0
        else:
            raise InvalidInput(
                f"no default normalisation for dtype {dt}; expected uint8, uint16 or float, "
                "or construct a Normalisation with an explicit scale"
            )
        if bands == 3:
            return cls(scale, IMAGENET_MEAN, IMAGENET_STD)
        return cls(scale, (0.0,) * int(bands), (1.0,) * int(bands))

    def _per_band(self, x: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
        if x.ndim < 3:
            raise InvalidInput(
                f"{what} must be shaped (..., bands, H, W), got shape {tuple(x.shape)}"
            )
        if x.shape[-3] != self.bands:
            raise InvalidInput(
                f"{what} has {x.shape[-3]} band(s) but the normalisation is for "
                f"{self.bands}; select bands or use a matching normalisation"
            )
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return mean, std

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Raw pixels to model input.

        Args:
            raw: array shaped ``(..., bands, H, W)`` of any real dtype.

        Returns:
            float32 array of the same shape.

        Raises:
            InvalidInput: for a wrong rank or band count, or a non-numeric dtype.
        """
        raw = np.asarray(raw)
        if raw.dtype.kind not in "uif":
            raise InvalidInput(f"cannot normalise pixels of dtype {raw.dtype}")
        mean, std = self._per_band(raw, "raw image")
        x = raw.astype(np.float32)
        x /= np.float32(self.scale)
        x -= mean
        x /= std
        return x

    def invert(self, x: np.ndarray) -> np.ndarray:
        """Model-space values back to raw units (float32; not rounded or clipped).

        Args:
            x: array shaped ``(..., bands, H, W)``.

        Returns:
            float32 array of the same shape, in raw units.

        Raises:
            InvalidInput: for a wrong rank or band count, or a non-numeric dtype.
        """
        x = np.asarray(x)
        if x.dtype.kind not in "uif":
            raise InvalidInput(f"cannot invert normalisation of dtype {x.dtype}")
        mean, std = self._per_band(x, "normalised image")
        out = x.astype(np.float32)
        out *= std
        out += mean
        out *= np.float32(self.scale)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: ``{"scale": float, "mean": [...], "std": [...]}``."""
        return {"scale": self.scale, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Normalisation:
        """Inverse of :meth:`to_dict`; validates keys and values.

        Args:
            d: mapping with exactly the keys ``scale``, ``mean`` and ``std``.

        Returns:
            The normalisation.

        Raises:
            InvalidInput: for missing or unknown keys or invalid values.
        """
        if not isinstance(d, Mapping):
            raise InvalidInput(f"normalisation must be a mapping, got {type(d).__name__}")
        keys = set(d)
        if keys != {"scale", "mean", "std"}:
            missing = sorted({"scale", "mean", "std"} - keys)
            unknown = sorted(map(str, keys - {"scale", "mean", "std"}))
            raise InvalidInput(
                f"normalisation needs keys scale, mean, std (missing {missing}, unknown {unknown})"
            )
        return cls(d["scale"], d["mean"], d["std"])


# --------------------------------------------------------------------------- reading


def _suffix(name: str) -> str:
    return posixpath.splitext(name.replace("\\", "/"))[1].lower()


def _band_indexes(bands: Sequence[int] | None, count: int, label: str) -> list[int]:
    if bands is None:
        return list(range(1, count + 1))
    if isinstance(bands, (str, bytes)) or not isinstance(bands, Sequence):
        raise InvalidInput(f"{label}: bands must be a sequence of 1-based indices, got {bands!r}")
    if len(bands) == 0:
        raise InvalidInput(f"{label}: empty band selection; give at least one 1-based index")
    out = []
    for b in bands:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
            raise InvalidInput(f"{label}: band index {b!r} is not an integer")
        if not 1 <= b <= count:
            raise InvalidInput(
                f"{label}: band {int(b)} is out of range; the file has {count} band(s), "
                f"indexed 1..{count} (1-based, as in GDAL)"
            )
        out.append(int(b))
    return out


def _read_dataset(
    ds: Any,
    label: str,
    bands: Sequence[int] | None,
    out_size: tuple[int, int] | None = None,
) -> np.ndarray:
    indexes = _band_indexes(bands, ds.count, label)
    dtypes = {ds.dtypes[i - 1] for i in indexes}
    if len(dtypes) > 1:
        raise InvalidInput(f"{label}: selected bands have different dtypes {sorted(dtypes)}")
    kind = np.dtype(dtypes.pop()).kind
    if kind not in "uif":
        raise InvalidInput(f"{label}: unsupported pixel dtype {ds.dtypes[indexes[0] - 1]}")
    if out_size is None:
        arr = ds.read(indexes)
    else:
        arr = ds.read(indexes, out_shape=(len(indexes), *out_size), resampling=Resampling.bilinear)
    return np.ascontiguousarray(arr)


def _read_geotiff_bytes(data: bytes, label: str, bands: Sequence[int] | None) -> np.ndarray:
    try:
        with MemoryFile(data) as mem, mem.open() as ds:
            return _read_dataset(ds, label, bands)
    except (RasterioError, OSError) as err:
        raise InvalidInput(
            f"{label}: not a readable GeoTIFF (truncated or corrupt?): {err}"
        ) from err


def _check_npy(arr: Any, label: str, bands: Sequence[int] | None) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise InvalidInput(f"{label}: is an .npz archive, not a single .npy array")
    if arr.dtype.kind not in "uif":
        raise InvalidInput(
            f"{label}: unsupported dtype {arr.dtype}; expected unsigned/signed integers or floats"
        )
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim != 3:
        raise InvalidInput(
            f"{label}: array must be shaped (bands, H, W) or (H, W), got {tuple(arr.shape)}"
        )
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    indexes = _band_indexes(bands, arr.shape[0], label)
    if bands is not None:
        arr = arr[[i - 1 for i in indexes]]
    return np.ascontiguousarray(arr)


def _load_npy(fileobj: Any, label: str, bands: Sequence[int] | None) -> np.ndarray:
    try:
        arr = np.load(fileobj, allow_pickle=False)
    except ValueError as err:
        if "Object arrays" in str(err):
            raise InvalidInput(
                f"{label}: holds Python objects (pickled object array); only numeric arrays "
                "are accepted, pickles are refused"
            ) from err
        raise InvalidInput(
            f"{label}: not a valid .npy file (truncated or corrupt?): {err}"
        ) from err
    except (OSError, EOFError) as err:
        raise InvalidInput(
            f"{label}: not a valid .npy file (truncated or corrupt?): {err}"
        ) from err
    if isinstance(arr, np.lib.npyio.NpzFile):
        arr.close()
        arr = None
    return _check_npy(arr, label, bands)


def _unsupported_suffix(label: str, suffix: str) -> InvalidInput:
    return InvalidInput(
        f"{label}: unsupported file type {suffix or '(no suffix)'!r}; expected one of "
        f"{', '.join(RASTER_SUFFIXES)}"
    )


def read_raster(path: str | os.PathLike[str], bands: Sequence[int] | None = None) -> np.ndarray:
    """Read a GeoTIFF or ``.npy`` file as ``(bands, H, W)`` in the file's dtype.

    Args:
        path: ``.tif``/``.tiff`` (read with rasterio) or ``.npy`` (``(bands, H, W)`` or
            ``(H, W)``, loaded without pickle support).
        bands: 1-based band indices to read, in that order; ``None`` reads all bands.

    Returns:
        C-contiguous array shaped ``(bands, H, W)``.

    Raises:
        InvalidInput: naming the file, for a missing, empty, truncated or corrupt file, an
            unsupported suffix, a band index out of range, or a non-numeric ``.npy``.
    """
    p = Path(path)
    label = str(p)
    suffix = p.suffix.lower()
    if suffix not in RASTER_SUFFIXES:
        raise _unsupported_suffix(label, suffix)
    try:
        size = p.stat().st_size
    except FileNotFoundError as err:
        raise InvalidInput(f"{label}: no such file") from err
    except OSError as err:
        raise InvalidInput(f"{label}: cannot access: {err}") from err
    if p.is_dir():
        raise InvalidInput(f"{label}: is a directory, not a raster file")
    if size == 0:
        raise InvalidInput(f"{label}: file is empty (0 bytes)")
    if suffix == ".npy":
        try:
            with open(p, "rb") as f:
                return _load_npy(f, label, bands)
        except PermissionError as err:
            raise InvalidInput(f"{label}: cannot open: {err}") from err
    try:
        with rasterio.open(p) as ds:
            return _read_dataset(ds, label, bands)
    except (RasterioError, OSError) as err:
        raise InvalidInput(
            f"{label}: not a readable GeoTIFF (truncated or corrupt?): {err}"
        ) from err


def read_raster_bytes(
    data: bytes | bytearray | memoryview, name: str, bands: Sequence[int] | None = None
) -> np.ndarray:
    """Read a GeoTIFF or ``.npy`` held in memory (a tar member, an upload).

    Args:
        data: the file's bytes.
        name: the file's name; its suffix picks the format and it appears in errors.
        bands: 1-based band indices to read; ``None`` reads all bands.

    Returns:
        C-contiguous array shaped ``(bands, H, W)`` in the file's dtype.

    Raises:
        InvalidInput: as :func:`read_raster`.
    """
    return _read_bytes(bytes(data), _suffix(name), name, bands)


def _read_bytes(data: bytes, suffix: str, label: str, bands: Sequence[int] | None) -> np.ndarray:
    if suffix not in RASTER_SUFFIXES:
        raise _unsupported_suffix(label, suffix)
    if not data:
        raise InvalidInput(f"{label}: file is empty (0 bytes)")
    if suffix == ".npy":
        return _load_npy(io.BytesIO(data), label, bands)
    return _read_geotiff_bytes(data, label, bands)


def _bigearthnet_band_file(folder: Path, band: str) -> Path:
    exact = folder / f"{folder.name}_{band}.tif"
    if exact.is_file():
        return exact
    matches = sorted(folder.glob(f"*_{band}.tif"))
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        names = ", ".join(m.name for m in matches)
        raise InvalidInput(f"{folder}: several files for band {band}: {names}")
    raise InvalidInput(
        f"{folder}: BigEarthNet band {band} missing; expected file {exact.name} in the patch folder"
    )


def is_bigearthnet_patch(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` looks like a BigEarthNet-S2 patch (``*_B01.tif`` ... files)."""
    p = Path(folder)
    return p.is_dir() and any(
        f.is_file() and _BIGEARTHNET_BAND_FILE.search(f.name) for f in p.iterdir()
    )


def read_bigearthnet_patch(
    folder: str | os.PathLike[str], bands: Sequence[str] = BIGEARTHNET_RGB
) -> np.ndarray:
    """Read bands of a BigEarthNet-S2 patch folder as one 120x120 uint16 stack.

    10 m bands are read as they are; 20 m and 60 m bands are upsampled to 120x120 with
    bilinear resampling at read time.

    Args:
        folder: the patch folder holding ``<patch>_<band>.tif`` files.
        bands: Sentinel-2 band names in output order (default red, green, blue).

    Returns:
        uint16 array shaped ``(len(bands), 120, 120)``.

    Raises:
        InvalidInput: naming the folder or file, for a missing folder or band file or an
            unreadable file.
    """
    p = Path(folder)
    if not p.is_dir():
        raise InvalidInput(f"{p}: not a BigEarthNet patch folder (no such directory)")
    if isinstance(bands, str) or not isinstance(bands, Sequence) or len(bands) == 0:
        raise InvalidInput(f"{p}: bands must be a non-empty list of names like 'B04'")
    out = np.empty((len(bands), BIGEARTHNET_SIZE, BIGEARTHNET_SIZE), dtype=np.uint16)
    for i, band in enumerate(bands):
        path = _bigearthnet_band_file(p, str(band))
        label = str(path)
        try:
            with rasterio.open(path) as ds:
                arr = _read_dataset(ds, label, [1], (BIGEARTHNET_SIZE, BIGEARTHNET_SIZE))
        except (RasterioError, OSError) as err:
            raise InvalidInput(
                f"{label}: not a readable GeoTIFF (truncated or corrupt?): {err}"
            ) from err
        if arr.dtype != np.uint16:
            raise InvalidInput(f"{label}: expected uint16 reflectance, got {arr.dtype}")
        out[i] = arr[0]
    return out


# --------------------------------------------------------------------------- validation


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


# --------------------------------------------------------------------------- tiling


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInput(f"{what} must be a positive integer, got {value!r}")
    return int(value)


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
            object.__setattr__(self, field, _positive_int(getattr(self, field), f"grid {field}"))
        rows, cols = -(-self.height // self.tile), -(-self.width // self.tile)
        if (self.rows, self.cols) != (rows, cols):
            raise InvalidInput(
                f"inconsistent tile grid: {self.height}x{self.width} in tiles of {self.tile} "
                f"needs {rows}x{cols} tiles, got {self.rows}x{self.cols}"
            )

    @classmethod
    def for_shape(cls, height: int, width: int, tile: int) -> TileGrid:
        """Grid that covers a ``height x width`` image with tiles of side ``tile``."""
        height = _positive_int(height, "image height")
        width = _positive_int(width, "image width")
        tile = _positive_int(tile, "tile size")
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
    tile = _positive_int(tile, "tile size")
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


# --------------------------------------------------------------------------- archives


class _Prefixed(io.RawIOBase):
    """A read-only stream that returns ``prefix`` and then the rest of ``raw``."""

    def __init__(self, prefix: bytes, raw: Any):
        self._prefix = prefix
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._raw.read(len(view))
        if not data:
            return 0
        view[: len(data)] = data
        return len(data)


class _Counting:
    """Counts (and caps) the decompressed tar stream and keeps its last bytes.

    The tail lets the reader check that the archive ended with a zero block: ``tarfile``
    in stream mode silently stops at a truncated or damaged header after the first one.
    """

    def __init__(self, raw: Any, cap: int, label: str, limit_name: str):
        self._raw = raw
        self._cap = cap
        self._label = label
        self._limit_name = limit_name
        self.total = 0
        # Last chunks read, enough to cover what tarfile read ahead plus one block.
        self._keep = 2 * _TAR_BUFSIZE + 2 * _BLOCK
        self._chunks: collections.deque[bytes] = collections.deque()
        self._kept = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.total += len(data)
        if self.total > self._cap:
            raise InvalidInput(
                f"{self._label}: archive stream exceeds {self._cap} bytes after "
                f"decompression ({self._limit_name})"
            )
        if data:
            self._chunks.append(data)
            self._kept += len(data)
            while self._kept - len(self._chunks[0]) >= self._keep:
                self._kept -= len(self._chunks.popleft())
        return data

    def block_at(self, offset: int) -> bytes | None:
        """The 512 bytes at ``offset`` if they are still kept, else ``None``."""
        start = offset - (self.total - self._kept)
        if start < 0 or start + _BLOCK > self._kept:
            return None
        return b"".join(self._chunks)[start : start + _BLOCK]


def _decompressed(raw: Any) -> Any:
    """Wrap ``raw`` in the decompressor its magic bytes call for (tar stays as it is)."""
    head = raw.read(6)
    if isinstance(head, str):
        raise InvalidInput("archive file object must be opened in binary mode ('rb')")
    stream = io.BufferedReader(_Prefixed(head, raw))
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=stream, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(stream, mode="rb")
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(stream, mode="rb")
    return stream


def _check_member(member: tarfile.TarInfo, label: str) -> None:
    name = member.name
    what = f"{label}: member {name!r}"
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise InvalidInput(f"{what} has an absolute path; refusing the archive")
    if ".." in parts:
        raise InvalidInput(f"{what} has a '..' path component; refusing the archive")
    if member.issym():
        raise InvalidInput(f"{what} is a symlink (to {member.linkname!r}); refusing the archive")
    if member.islnk():
        raise InvalidInput(f"{what} is a hardlink (to {member.linkname!r}); refusing the archive")
    if member.isdev():
        raise InvalidInput(f"{what} is a device or FIFO; refusing the archive")
    if not (member.isfile() or member.isdir()):
        raise InvalidInput(f"{what} is not a regular file or directory (tar type {member.type!r})")


def _source_label(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    name = getattr(source, "name", None)
    return str(name) if isinstance(name, (str, os.PathLike)) else "<archive stream>"


def iter_tar_tiles(
    source: str | os.PathLike[str] | BinaryIO,
    *,
    max_members: int = 10000,
    max_member_bytes: int = 256 * _MiB,
    max_total_bytes: int = 4 * _GiB,
    bands: Sequence[int] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Stream the ``.tif``/``.tiff``/``.npy`` members of a tar archive, in archive order.

    The archive is read once, front to back (``tarfile`` stream mode over a decompressor
    picked from the magic bytes: gzip, bzip2, xz or none), and nothing is written to disk.
    Directories and members with other suffixes are skipped. Because the read is streaming,
    members before a bad one have already been yielded when the error is raised.

    Args:
        source: path of the archive, or a binary file object (need not be seekable).
        max_members: most members (of any type) the archive may hold.
        max_member_bytes: largest image member, in bytes (images are read into memory).
        max_total_bytes: most bytes all regular members may hold together.
        bands: 1-based band indices to read from each image; ``None`` reads all.

    Yields:
        ``(name, array)`` per image member: the member's normalised relative path and its
        ``(bands, H, W)`` array in the member's dtype.

    Raises:
        InvalidInput: naming the archive (and member) for a missing or empty file, a
            corrupt or truncated gzip/tar stream, a symlink, hardlink, device or FIFO
            member, an absolute or ``..`` member name, a limit exceeded (named), an
            unreadable image member, or an archive without image members.
    """
    max_members = _positive_int(max_members, "max_members")
    max_member_bytes = _positive_int(max_member_bytes, "max_member_bytes")
    max_total_bytes = _positive_int(max_total_bytes, "max_total_bytes")
    label = _source_label(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidInput(f"{label}: no such archive file")
        if path.stat().st_size == 0:
            raise InvalidInput(f"{label}: archive file is empty (0 bytes)")
        with open(path, "rb") as f:
            yield from _iter_tar_stream(
                f, label, max_members, max_member_bytes, max_total_bytes, bands
            )
    else:
        if not hasattr(source, "read"):
            raise InvalidInput(
                f"iter_tar_tiles needs a path or a binary file object, got {type(source).__name__}"
            )
        yield from _iter_tar_stream(
            source, label, max_members, max_member_bytes, max_total_bytes, bands
        )


def _iter_tar_stream(
    raw: Any,
    label: str,
    max_members: int,
    max_member_bytes: int,
    max_total_bytes: int,
    bands: Sequence[int] | None,
) -> Iterator[tuple[str, np.ndarray]]:
    cap = max_total_bytes + _STREAM_SLACK + _STREAM_SLACK_PER_MEMBER * max_members
    try:
        stream = _Counting(_decompressed(raw), cap, label, f"max_total_bytes={max_total_bytes}")
        tf = tarfile.open(fileobj=stream, mode="r|", bufsize=_TAR_BUFSIZE)
    except tarfile.ReadError as err:
        if str(err) == "empty file":
            raise InvalidInput(f"{label}: archive is empty (no tar data)") from err
        raise InvalidInput(
            f"{label}: not a readable tar archive (corrupt or truncated?): {err}"
        ) from err
    except _ARCHIVE_ERRORS as err:
        raise InvalidInput(
            f"{label}: not a readable tar archive (corrupt or truncated?): {err}"
        ) from err
    with tf:
        yielded = yield from _iter_members(
            tf, label, max_members, max_member_bytes, max_total_bytes, bands
        )
        _check_archive_end(tf, stream, label)
    if yielded == 0:
        raise InvalidInput(f"{label}: archive contains no .tif/.tiff/.npy members")


def _next_member(tf: tarfile.TarFile, label: str) -> tarfile.TarInfo | None:
    try:
        return tf.next()
    except _ARCHIVE_ERRORS as err:
        raise InvalidInput(f"{label}: corrupt or truncated archive: {err}") from err


def _iter_members(
    tf: tarfile.TarFile,
    label: str,
    max_members: int,
    max_member_bytes: int,
    max_total_bytes: int,
    bands: Sequence[int] | None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield the image members; returns how many were yielded."""
    members = total = yielded = 0
    while (member := _next_member(tf, label)) is not None:
        members += 1
        if members > max_members:
            raise InvalidInput(f"{label}: archive has more than max_members={max_members} members")
        _check_member(member, label)
        if member.isdir():
            continue
        total += member.size
        if total > max_total_bytes:
            raise InvalidInput(
                f"{label}: members exceed max_total_bytes={max_total_bytes} in total "
                f"(at member {member.name!r})"
            )
        suffix = _suffix(member.name)
        if suffix not in RASTER_SUFFIXES:
            continue
        name = posixpath.normpath(member.name)
        what = f"{label}: member {name!r}"
        if member.size > max_member_bytes:
            raise InvalidInput(
                f"{what} has {member.size} bytes, over max_member_bytes={max_member_bytes}"
            )
        try:
            f = tf.extractfile(member)
            data = f.read() if f is not None else b""
        except _ARCHIVE_ERRORS as err:
            raise InvalidInput(f"{what}: corrupt or truncated archive: {err}") from err
        if len(data) != member.size:
            raise InvalidInput(f"{what}: truncated ({len(data)} of {member.size} bytes)")
        yield name, _read_bytes(data, suffix, what, bands)
        yielded += 1
    return yielded


def _check_archive_end(tf: tarfile.TarFile, stream: _Counting, label: str) -> None:
    """Insist on an end-of-archive zero block and an intact compressed trailer."""
    end = tf.offset + _BLOCK
    if stream.total < end:
        raise InvalidInput(
            f"{label}: truncated archive (stream ends at byte {stream.total} without the "
            "end-of-archive marker)"
        )
    block = stream.block_at(tf.offset)
    if block is not None and block.count(0) != _BLOCK:
        raise InvalidInput(f"{label}: corrupt tar header at byte {tf.offset}")
    try:
        # Read to the end so that gzip/bzip2/xz check their trailer (CRC and length).
        while stream.read(1 << 16):
            pass
    except _ARCHIVE_ERRORS as err:
        raise InvalidInput(f"{label}: corrupt or truncated compressed stream: {err}") from err


# --------------------------------------------------------------------------- dispatch


def _is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _iter_folder(
    root: Path, folder: Path, bands: Sequence[int] | None, bigearthnet_bands: Sequence[str]
) -> Iterator[tuple[str, np.ndarray]]:
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        rel = entry.relative_to(root).as_posix()
        if entry.is_dir():
            if entry.is_symlink():
                continue
            if is_bigearthnet_patch(entry):
                yield rel, read_bigearthnet_patch(entry, bigearthnet_bands)
            else:
                yield from _iter_folder(root, entry, bands, bigearthnet_bands)
        elif _is_archive_name(entry.name):
            for member, arr in iter_tar_tiles(entry, bands=bands):
                yield f"{rel}/{member}", arr
        elif entry.suffix.lower() in RASTER_SUFFIXES:
            yield rel, read_raster(entry, bands)


def iter_inputs(
    path: str | os.PathLike[str],
    bands: Sequence[int] | None = None,
    *,
    bigearthnet_bands: Sequence[str] = BIGEARTHNET_RGB,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield every image under ``path`` as ``(name, (bands, H, W) array)``, checked.

    ``path`` may be a GeoTIFF or ``.npy`` file (one item, named by the file name), a tar
    archive (``.tar``, ``.tar.gz``, ``.tgz``, ...; its image members, named by member
    path), a BigEarthNet patch folder (one item: ``bigearthnet_bands`` as 120x120, named by
    the folder name), or a folder of any of these, walked recursively in sorted order and
    named by their path relative to ``path`` (archive members as ``archive/member``).
    Hidden entries, symlinked folders and files of other types in folders are skipped.
    Every array passes :func:`check_pixels` before it is yielded.

    Args:
        path: file or folder.
        bands: 1-based band indices for GeoTIFF/``.npy`` inputs; ``None`` reads all.
        bigearthnet_bands: band names read from BigEarthNet patch folders.

    Yields:
        ``(name, array)`` in a stable order.

    Raises:
        InvalidInput: for a missing path, an unsupported file type, a folder without any
            input, or any error of the readers.
    """
    p = Path(path)
    label = str(p)
    if not p.exists():
        raise InvalidInput(f"{label}: no such file or directory")
    if p.is_dir():
        if is_bigearthnet_patch(p):
            items: Iterator[tuple[str, np.ndarray]] = iter(
                [(p.name, read_bigearthnet_patch(p, bigearthnet_bands))]
            )
        else:
            items = _iter_folder(p, p, bands, bigearthnet_bands)
    elif _is_archive_name(p.name):
        items = iter_tar_tiles(p, bands=bands)
    elif p.suffix.lower() in RASTER_SUFFIXES:
        items = iter([(p.name, read_raster(p, bands))])
    else:
        raise InvalidInput(
            f"{label}: unsupported input {p.suffix or '(no suffix)'!r}; expected a "
            f"{'/'.join(RASTER_SUFFIXES)} file, a tar archive "
            f"({'/'.join(ARCHIVE_SUFFIXES)}), a BigEarthNet patch folder or a folder of these"
        )
    count = 0
    for name, arr in items:
        check_pixels(arr, name)
        count += 1
        yield name, arr
    if count == 0:
        raise InvalidInput(
            f"{label}: contains no .tif/.tiff/.npy files, tar archives or BigEarthNet patches"
        )
