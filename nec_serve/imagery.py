"""Imagery I/O: read rasters, validate pixels, normalise, tile and stream archives.

Everything here is NumPy and rasterio only (no PyTorch), so a wrapper image that only
prepares tiles and entropy-codes does not need the model stack.

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
from dataclasses import dataclass, fields
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
    "InputLimits",
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
# Defaults of iter_tar_tiles (archives met by iter_inputs get these too).
_MAX_MEMBERS = 10000
_MAX_MEMBER_BYTES = 256 * _MiB
_MAX_TOTAL_BYTES = 4 * _GiB
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


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class InputLimits:
    """What one input may declare before any of it is decoded.

    Readers check the geometry a file *declares* (a ``.npy`` header, a GeoTIFF's band
    count, size and dtype) against these limits before they allocate or read pixels, so
    a 1 KB file that declares 30 GB fails fast with :class:`~nec_serve.errors.InvalidInput`
    instead of a ``MemoryError``. The defaults admit a full Sentinel-2 tile (10980 x 10980
    px) with up to 8 uint16 bands selected, and bound one image to what an 8 GiB wrapper
    pod can decode and tile (tiling copies the image about twice more).

    Attributes:
        max_pixels: most pixels (height x width) of one image; also bounds one GeoTIFF
            block. 2**28 is a 16384 x 16384 image, 2.2 Sentinel-2 tiles.
        max_bands: most bands one image may declare (GeoTIFF band count, ``.npy``
            first axis). Sentinel-2 has 13 and hyperspectral sensors a few hundred.
        max_image_bytes: most decoded bytes of one image, ``bands * H * W * itemsize`` of
            the bands actually read (all of them for ``.npy``). 2 GiB holds 8 uint16
            bands of a 10980 x 10980 Sentinel-2 tile.
        max_decoded_bytes: most decoded bytes of all images of one input (one message:
            a file, an archive or a folder), and of a whole :func:`decompress
            <nec_serve.pipeline.decompress>` output. 16 GiB is four archives' worth of
            ``max_total_bytes`` at 1:1, or about 22 RGB uint16 Sentinel-2 tiles.
        max_tiles: most tiles one container may hold when it is decoded; 1,000,000 is
            about 400 Sentinel-2 tiles cut into 224 px tiles.
    """

    max_pixels: int = 1 << 28
    max_bands: int = 256
    max_image_bytes: int = 2 << 30
    max_decoded_bytes: int = 16 << 30
    max_tiles: int = 1_000_000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InvalidInput(f"InputLimits.{f.name} must be an integer >= 1, got {value!r}")
            object.__setattr__(self, f.name, int(value))

    def check_image(
        self,
        what: str,
        bands: int,
        height: int,
        width: int,
        dtype: Any,
        read_bands: int | None = None,
    ) -> int:
        """Check the geometry an image declares; return the bytes reading it decodes.

        Args:
            what: the image in error messages (file, or archive and member).
            bands: bands the image declares.
            height: declared height in pixels.
            width: declared width in pixels.
            dtype: declared pixel dtype.
            read_bands: bands that will be read (``None``: all of them).

        Returns:
            ``read_bands * height * width * itemsize``.

        Raises:
            InvalidInput: naming ``what``, the declared geometry and the limit exceeded.
        """
        dt = np.dtype(dtype)
        n = bands if read_bands is None else read_bands
        nbytes = n * height * width * dt.itemsize
        declared = f"{bands}x{height}x{width} {dt.name}"
        if n != bands:
            declared += f", {n} band(s) read"
        if bands > self.max_bands:
            raise InvalidInput(
                f"{what}: declares {declared} ({bands} bands), over max_bands={self.max_bands}"
            )
        if nbytes > self.max_image_bytes:
            raise InvalidInput(
                f"{what}: declares {declared} ({_human_bytes(nbytes)} decoded), over "
                f"max_image_bytes={self.max_image_bytes}"
            )
        if height * width > self.max_pixels:
            raise InvalidInput(
                f"{what}: declares {declared} ({height * width} pixels), over "
                f"max_pixels={self.max_pixels}"
            )
        return nbytes


def _human_bytes(n: int) -> str:
    """``n`` bytes in decimal units with one decimal, e.g. ``30.0 GB``."""
    if n < 1000:
        return f"{n} B"
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        n /= 1000
        if n < 1000 or unit == "PB":
            break
    return f"{n:.1f} {unit}"


class _Budget:
    """Running total of the decoded bytes of one input, against ``max_decoded_bytes``."""

    def __init__(self, limits: InputLimits | None):
        self.limits = _limits(limits)
        self.total = 0

    def image(
        self,
        what: str,
        bands: int,
        height: int,
        width: int,
        dtype: Any,
        read_bands: int | None = None,
    ) -> None:
        """Check one image's declared geometry and charge it, before it is read."""
        nbytes = self.limits.check_image(what, bands, height, width, dtype, read_bands)
        self.total += nbytes
        cap = self.limits.max_decoded_bytes
        if self.total > cap:
            raise InvalidInput(
                f"{what}: declares {bands}x{height}x{width} {np.dtype(dtype).name} "
                f"({_human_bytes(nbytes)} decoded), bringing this input to "
                f"{_human_bytes(self.total)} decoded, over max_decoded_bytes={cap}"
            )


def _limits(limits: InputLimits | None) -> InputLimits:
    if limits is None:
        return InputLimits()
    if not isinstance(limits, InputLimits):
        raise InvalidInput(f"limits must be an InputLimits, got {type(limits).__name__}")
    return limits


def _scrub(text: str, path: Path, label: str) -> str:
    """``text`` with the local ``path`` (as GDAL quotes it) replaced by ``label``."""
    if str(path) == label:
        return text
    for local in sorted({str(path), str(path.absolute()), str(path.resolve())}, key=len)[::-1]:
        text = text.replace(local, label)
    return text


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
    budget: _Budget,
    out_size: tuple[int, int] | None = None,
) -> np.ndarray:
    if ds.count < 1:
        raise InvalidInput(f"{label}: the file has no bands")
    indexes = _band_indexes(bands, ds.count, label)
    dtypes = {ds.dtypes[i - 1] for i in indexes}
    if len(dtypes) > 1:
        raise InvalidInput(f"{label}: selected bands have different dtypes {sorted(dtypes)}")
    dtype = np.dtype(dtypes.pop())
    if dtype.kind not in "uif":
        raise InvalidInput(f"{label}: unsupported pixel dtype {ds.dtypes[indexes[0] - 1]}")
    # Everything below is what the file declares; check it before GDAL allocates anything.
    budget.image(label, ds.count, ds.height, ds.width, dtype, len(indexes))
    block = max(h * w for h, w in ds.block_shapes)
    if block > budget.limits.max_pixels:
        raise InvalidInput(
            f"{label}: declares blocks of {block} pixels, over "
            f"max_pixels={budget.limits.max_pixels}"
        )
    if out_size is None:
        arr = ds.read(indexes)
    else:
        arr = ds.read(indexes, out_shape=(len(indexes), *out_size), resampling=Resampling.bilinear)
    return np.ascontiguousarray(arr)


def _read_geotiff_bytes(
    data: bytes, label: str, bands: Sequence[int] | None, budget: _Budget
) -> np.ndarray:
    try:
        with MemoryFile(data) as mem, mem.open() as ds:
            return _read_dataset(ds, label, bands, budget)
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


_NPY_MAGIC = b"\x93NUMPY"
# Everything NumPy's header parser raises for a damaged header.
_NPY_HEADER_ERRORS = (ValueError, TypeError, SyntaxError, RecursionError, EOFError, OSError)


def _npy_header(f: BinaryIO, label: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Parse a ``.npy`` header: ``(shape, fortran_order, dtype)``, nothing else is read."""
    head = f.read(len(_NPY_MAGIC))
    f.seek(0)
    if head.startswith(b"PK\x03\x04"):
        raise InvalidInput(f"{label}: is an .npz archive, not a single .npy array")
    if head.startswith(b"\x80"):
        raise InvalidInput(f"{label}: is a Python pickle, not a .npy array; pickles are refused")
    if head != _NPY_MAGIC:
        raise InvalidInput(
            f"{label}: not a valid .npy file (truncated or corrupt?): no NumPy magic string"
        )
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:  # 3.0 (UTF-8 header) has no public reader; unknown versions raise here.
            shape, fortran, dtype = fmt._read_array_header(f, version)
    except _NPY_HEADER_ERRORS as err:
        raise InvalidInput(
            f"{label}: not a valid .npy file (truncated or corrupt?): {err}"
        ) from err
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{label}: not a valid .npy file: negative shape {shape}")
    return shape, fortran, dtype


def _load_npy(
    f: BinaryIO, size: int, label: str, bands: Sequence[int] | None, budget: _Budget
) -> np.ndarray:
    """Load a ``.npy`` of ``size`` bytes from ``f`` after checking what its header declares."""
    shape, fortran, dtype = _npy_header(f, label)
    if dtype.hasobject:
        raise InvalidInput(
            f"{label}: holds Python objects (pickled object array); only numeric arrays "
            "are accepted, pickles are refused"
        )
    if dtype.kind not in "uif":
        raise InvalidInput(
            f"{label}: unsupported dtype {dtype}; expected unsigned/signed integers or floats"
        )
    if len(shape) not in (2, 3):
        raise InvalidInput(f"{label}: array must be shaped (bands, H, W) or (H, W), got {shape}")
    n_bands, height, width = shape if len(shape) == 3 else (1, *shape)
    if bands is not None:
        _band_indexes(bands, n_bands, label)
    # np.load decodes every band, whatever the selection.
    budget.image(label, n_bands, height, width, dtype)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    present = size - f.tell()
    if present != nbytes:
        problem = "truncated" if present < nbytes else "has trailing bytes"
        raise InvalidInput(
            f"{label}: not a valid .npy file ({problem}): the header declares "
            f"{'x'.join(map(str, shape))} {dtype} ({nbytes} bytes of data) but {present} "
            "bytes follow the header"
        )
    arr = np.empty(count, dtype=dtype)
    buf = memoryview(arr.view(np.uint8))
    got = 0
    try:
        while got < nbytes and (n := f.readinto(buf[got:])):
            got += n
    except OSError as err:
        raise InvalidInput(f"{label}: cannot read: {err}") from err
    if got != nbytes:
        raise InvalidInput(
            f"{label}: not a valid .npy file (truncated): {got} of {nbytes} bytes of data"
        )
    if fortran:
        arr = arr.reshape(shape[::-1]).transpose()
    else:
        arr = arr.reshape(shape)
    return _check_npy(arr, label, bands)


def _unsupported_suffix(label: str, suffix: str) -> InvalidInput:
    return InvalidInput(
        f"{label}: unsupported file type {suffix or '(no suffix)'!r}; expected one of "
        f"{', '.join(RASTER_SUFFIXES)}"
    )


def read_raster(
    path: str | os.PathLike[str],
    bands: Sequence[int] | None = None,
    *,
    limits: InputLimits | None = None,
    label: str | None = None,
) -> np.ndarray:
    """Read a GeoTIFF or ``.npy`` file as ``(bands, H, W)`` in the file's dtype.

    The geometry the file declares (``.npy`` header; GeoTIFF band count, size, dtype and
    block size) is checked against ``limits`` before any pixel is allocated or read.

    Args:
        path: ``.tif``/``.tiff`` (read with rasterio) or ``.npy`` (``(bands, H, W)`` or
            ``(H, W)``, loaded without pickle support).
        bands: 1-based band indices to read, in that order; ``None`` reads all bands.
        limits: what the file may declare; ``None`` uses the :class:`InputLimits` defaults.
        label: what to call the file in errors instead of ``path`` (e.g. the S3 name of a
            downloaded temporary file).

    Returns:
        C-contiguous array shaped ``(bands, H, W)``.

    Raises:
        InvalidInput: naming the file, for a missing, empty, truncated or corrupt file, an
            unsupported suffix, a band index out of range, a non-numeric ``.npy``, or a
            declared geometry over ``limits`` (naming the limit).
    """
    return _read_raster(Path(path), bands, _Budget(limits), label)


def _read_raster(
    p: Path, bands: Sequence[int] | None, budget: _Budget, label: str | None
) -> np.ndarray:
    label = str(p) if label is None else label
    suffix = p.suffix.lower()
    if suffix not in RASTER_SUFFIXES:
        raise _unsupported_suffix(label, suffix)
    try:
        size = p.stat().st_size
    except FileNotFoundError as err:
        raise InvalidInput(f"{label}: no such file") from err
    except OSError as err:
        raise InvalidInput(f"{label}: cannot access: {_scrub(str(err), p, label)}") from err
    if p.is_dir():
        raise InvalidInput(f"{label}: is a directory, not a raster file")
    if size == 0:
        raise InvalidInput(f"{label}: file is empty (0 bytes)")
    if suffix == ".npy":
        try:
            with open(p, "rb") as f:
                # The size of the file as opened, not as it was when stat() ran.
                return _load_npy(f, os.fstat(f.fileno()).st_size, label, bands, budget)
        except PermissionError as err:
            raise InvalidInput(f"{label}: cannot open: {_scrub(str(err), p, label)}") from err
    try:
        with rasterio.open(p) as ds:
            return _read_dataset(ds, label, bands, budget)
    except (RasterioError, OSError) as err:
        raise InvalidInput(
            f"{label}: not a readable GeoTIFF (truncated or corrupt?): {_scrub(str(err), p, label)}"
        ) from err


def read_raster_bytes(
    data: bytes | bytearray | memoryview,
    name: str,
    bands: Sequence[int] | None = None,
    *,
    limits: InputLimits | None = None,
) -> np.ndarray:
    """Read a GeoTIFF or ``.npy`` held in memory (a tar member, an upload).

    Args:
        data: the file's bytes.
        name: the file's name; its suffix picks the format and it appears in errors.
        bands: 1-based band indices to read; ``None`` reads all bands.
        limits: what the file may declare; ``None`` uses the :class:`InputLimits` defaults.

    Returns:
        C-contiguous array shaped ``(bands, H, W)`` in the file's dtype.

    Raises:
        InvalidInput: as :func:`read_raster`.
    """
    return _read_bytes(bytes(data), _suffix(name), name, bands, _Budget(limits))


def _read_bytes(
    data: bytes, suffix: str, label: str, bands: Sequence[int] | None, budget: _Budget
) -> np.ndarray:
    if suffix not in RASTER_SUFFIXES:
        raise _unsupported_suffix(label, suffix)
    if not data:
        raise InvalidInput(f"{label}: file is empty (0 bytes)")
    if suffix == ".npy":
        return _load_npy(io.BytesIO(data), len(data), label, bands, budget)
    return _read_geotiff_bytes(data, label, bands, budget)


def _bigearthnet_band_file(folder: Path, band: str, label: str) -> Path:
    exact = folder / f"{folder.name}_{band}.tif"
    if exact.is_file():
        return exact
    matches = sorted(folder.glob(f"*_{band}.tif"))
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        names = ", ".join(m.name for m in matches)
        raise InvalidInput(f"{label}: several files for band {band}: {names}")
    raise InvalidInput(
        f"{label}: BigEarthNet band {band} missing; expected file {exact.name} in the patch folder"
    )


def is_bigearthnet_patch(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` looks like a BigEarthNet-S2 patch (``*_B01.tif`` ... files)."""
    p = Path(folder)
    return p.is_dir() and any(
        f.is_file() and _BIGEARTHNET_BAND_FILE.search(f.name) for f in p.iterdir()
    )


def read_bigearthnet_patch(
    folder: str | os.PathLike[str],
    bands: Sequence[str] = BIGEARTHNET_RGB,
    *,
    limits: InputLimits | None = None,
) -> np.ndarray:
    """Read bands of a BigEarthNet-S2 patch folder as one 120x120 uint16 stack.

    10 m bands are read as they are; 20 m and 60 m bands are upsampled to 120x120 with
    bilinear resampling at read time. Each band file's declared geometry is checked
    against ``limits`` before it is read, and the bytes its full resolution decodes to
    count towards ``max_decoded_bytes``.

    Args:
        folder: the patch folder holding ``<patch>_<band>.tif`` files.
        bands: Sentinel-2 band names in output order (default red, green, blue).
        limits: what the band files may declare; ``None`` uses the :class:`InputLimits`
            defaults.

    Returns:
        uint16 array shaped ``(len(bands), 120, 120)``.

    Raises:
        InvalidInput: naming the folder or file, for a missing folder or band file, an
            unreadable file, or a declared geometry over ``limits``.
    """
    p = Path(folder)
    return _read_bigearthnet(p, bands, _Budget(limits), str(p))


def _read_bigearthnet(p: Path, bands: Sequence[str], budget: _Budget, label: str) -> np.ndarray:
    if not p.is_dir():
        raise InvalidInput(f"{label}: not a BigEarthNet patch folder (no such directory)")
    if isinstance(bands, str) or not isinstance(bands, Sequence) or len(bands) == 0:
        raise InvalidInput(f"{label}: bands must be a non-empty list of names like 'B04'")
    out = np.empty((len(bands), BIGEARTHNET_SIZE, BIGEARTHNET_SIZE), dtype=np.uint16)
    for i, band in enumerate(bands):
        path = _bigearthnet_band_file(p, str(band), label)
        what = f"{label}/{path.name}"
        try:
            with rasterio.open(path) as ds:
                arr = _read_dataset(ds, what, [1], budget, (BIGEARTHNET_SIZE, BIGEARTHNET_SIZE))
        except (RasterioError, OSError) as err:
            raise InvalidInput(
                f"{what}: not a readable GeoTIFF (truncated or corrupt?): "
                f"{_scrub(str(err), path, what)}"
            ) from err
        if arr.dtype != np.uint16:
            raise InvalidInput(f"{what}: expected uint16 reflectance, got {arr.dtype}")
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
    max_members: int = _MAX_MEMBERS,
    max_member_bytes: int = _MAX_MEMBER_BYTES,
    max_total_bytes: int = _MAX_TOTAL_BYTES,
    bands: Sequence[int] | None = None,
    limits: InputLimits | None = None,
    label: str | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Stream the ``.tif``/``.tiff``/``.npy`` members of a tar archive, in archive order.

    The archive is read once, front to back (``tarfile`` stream mode over a decompressor
    picked from the magic bytes: gzip, bzip2, xz or none), and nothing is written to disk.
    Directories and members with other suffixes are skipped. Because the read is streaming,
    members before a bad one have already been yielded when the error is raised. Each
    image member's declared geometry is checked against ``limits`` before it is decoded,
    and all members together may decode to at most ``limits.max_decoded_bytes``.

    Args:
        source: path of the archive, or a binary file object (need not be seekable).
        max_members: most members (of any type) the archive may hold.
        max_member_bytes: largest image member, in bytes (images are read into memory).
        max_total_bytes: most bytes all regular members may hold together.
        bands: 1-based band indices to read from each image; ``None`` reads all.
        limits: what the images may declare; ``None`` uses the :class:`InputLimits`
            defaults.
        label: what to call the archive in errors instead of its path or file name.

    Yields:
        ``(name, array)`` per image member: the member's normalised relative path and its
        ``(bands, H, W)`` array in the member's dtype.

    Raises:
        InvalidInput: naming the archive (and member) for a missing or empty file, a
            corrupt or truncated gzip/tar stream, a symlink, hardlink, device or FIFO
            member, an absolute or ``..`` member name, a limit exceeded (named), an
            unreadable image member, or an archive without image members.
    """
    yield from _iter_tar(
        source, max_members, max_member_bytes, max_total_bytes, bands, _Budget(limits), label
    )


def _iter_tar(
    source: str | os.PathLike[str] | BinaryIO,
    max_members: int,
    max_member_bytes: int,
    max_total_bytes: int,
    bands: Sequence[int] | None,
    budget: _Budget,
    label: str | None,
) -> Iterator[tuple[str, np.ndarray]]:
    max_members = _positive_int(max_members, "max_members")
    max_member_bytes = _positive_int(max_member_bytes, "max_member_bytes")
    max_total_bytes = _positive_int(max_total_bytes, "max_total_bytes")
    label = _source_label(source) if label is None else label
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidInput(f"{label}: no such archive file")
        if path.stat().st_size == 0:
            raise InvalidInput(f"{label}: archive file is empty (0 bytes)")
        with open(path, "rb") as f:
            yield from _iter_tar_stream(
                f, label, max_members, max_member_bytes, max_total_bytes, bands, budget
            )
    else:
        if not hasattr(source, "read"):
            raise InvalidInput(
                f"iter_tar_tiles needs a path or a binary file object, got {type(source).__name__}"
            )
        yield from _iter_tar_stream(
            source, label, max_members, max_member_bytes, max_total_bytes, bands, budget
        )


def _iter_tar_stream(
    raw: Any,
    label: str,
    max_members: int,
    max_member_bytes: int,
    max_total_bytes: int,
    bands: Sequence[int] | None,
    budget: _Budget,
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
            tf, label, max_members, max_member_bytes, max_total_bytes, bands, budget
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
    budget: _Budget,
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
        yield name, _read_bytes(data, suffix, what, bands, budget)
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
    root: Path,
    folder: Path,
    bands: Sequence[int] | None,
    bigearthnet_bands: Sequence[str],
    budget: _Budget,
    label: str,
) -> Iterator[tuple[str, np.ndarray]]:
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        rel = entry.relative_to(root).as_posix()
        what = f"{label}/{rel}"
        if entry.is_dir():
            if entry.is_symlink():
                continue
            if is_bigearthnet_patch(entry):
                yield rel, _read_bigearthnet(entry, bigearthnet_bands, budget, what)
            else:
                yield from _iter_folder(root, entry, bands, bigearthnet_bands, budget, label)
        elif _is_archive_name(entry.name):
            for member, arr in _iter_tar(
                entry, _MAX_MEMBERS, _MAX_MEMBER_BYTES, _MAX_TOTAL_BYTES, bands, budget, what
            ):
                yield f"{rel}/{member}", arr
        elif entry.suffix.lower() in RASTER_SUFFIXES:
            yield rel, _read_raster(entry, bands, budget, what)


def iter_inputs(
    path: str | os.PathLike[str],
    bands: Sequence[int] | None = None,
    *,
    bigearthnet_bands: Sequence[str] = BIGEARTHNET_RGB,
    limits: InputLimits | None = None,
    label: str | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield every image under ``path`` as ``(name, (bands, H, W) array)``, checked.

    ``path`` may be a GeoTIFF or ``.npy`` file (one item, named by the file name), a tar
    archive (``.tar``, ``.tar.gz``, ``.tgz``, ...; its image members, named by member
    path), a BigEarthNet patch folder (one item: ``bigearthnet_bands`` as 120x120, named by
    the folder name), or a folder of any of these, walked recursively in sorted order and
    named by their path relative to ``path`` (archive members as ``archive/member``).
    Hidden entries, symlinked folders and files of other types in folders are skipped.
    Each image's declared geometry is checked against ``limits`` before it is read, all
    images together may decode to at most ``limits.max_decoded_bytes``, and every array
    passes :func:`check_pixels` before it is yielded.

    Args:
        path: file or folder.
        bands: 1-based band indices for GeoTIFF/``.npy`` inputs; ``None`` reads all.
        bigearthnet_bands: band names read from BigEarthNet patch folders.
        limits: what the input may declare; ``None`` uses the :class:`InputLimits`
            defaults.
        label: what to call ``path`` in errors (e.g. ``s3://bucket/key`` for a downloaded
            temporary file); the local path then appears in no error message. Item names
            are not affected.

    Yields:
        ``(name, array)`` in a stable order.

    Raises:
        InvalidInput: for a missing path, an unsupported file type, a folder without any
            input, a declared geometry over ``limits`` (naming the limit), or any error of
            the readers.
    """
    p = Path(path)
    label = str(p) if label is None else label
    budget = _Budget(limits)
    if not p.exists():
        raise InvalidInput(f"{label}: no such file or directory")
    single = False
    if p.is_dir():
        if is_bigearthnet_patch(p):
            single = True
            items: Iterator[tuple[str, np.ndarray]] = iter(
                [(p.name, _read_bigearthnet(p, bigearthnet_bands, budget, label))]
            )
        else:
            items = _iter_folder(p, p, bands, bigearthnet_bands, budget, label)
    elif _is_archive_name(p.name):
        items = _iter_tar(
            p, _MAX_MEMBERS, _MAX_MEMBER_BYTES, _MAX_TOTAL_BYTES, bands, budget, label
        )
    elif p.suffix.lower() in RASTER_SUFFIXES:
        single = True
        items = iter([(p.name, _read_raster(p, bands, budget, label))])
    else:
        raise InvalidInput(
            f"{label}: unsupported input {p.suffix or '(no suffix)'!r}; expected a "
            f"{'/'.join(RASTER_SUFFIXES)} file, a tar archive "
            f"({'/'.join(ARCHIVE_SUFFIXES)}), a BigEarthNet patch folder or a folder of these"
        )
    count = 0
    for name, arr in items:
        check_pixels(arr, label if single else f"{label}/{name}")
        count += 1
        yield name, arr
    if count == 0:
        raise InvalidInput(
            f"{label}: contains no .tif/.tiff/.npy files, tar archives or BigEarthNet patches"
        )
