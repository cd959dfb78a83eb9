"""Reading GeoTIFF and ``.npy`` rasters and BigEarthNet-S2 patch folders (uses rasterio).

This is the one module of :mod:`nec_serve.imagery` that imports rasterio. Readers return
C-contiguous ``(bands, H, W)`` arrays in the file's dtype, select bands by 1-based index
(as in GDAL), and check what a file declares (a ``.npy`` header; a GeoTIFF's band count,
size, dtype and block size) against :class:`~nec_serve.imagery.limits.InputLimits`
before any pixel is allocated or read. The ``*_budgeted`` readers charge a
:class:`~nec_serve.imagery.limits.Budget` that the caller shares across all images of
one input (archives and folders).
"""

from __future__ import annotations

import io
import math
import os
import posixpath
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.io import MemoryFile

from nec_serve.errors import InvalidInput
from nec_serve.imagery.formats import (
    HEAD_BYTES,
    admit_format,
    jpeg_geometry,
    png_geometry,
)
from nec_serve.imagery.limits import Budget, InputLimits, band_indexes

__all__ = [
    "GeoArray",
    "georef",
    "BIGEARTHNET_RGB",
    "BIGEARTHNET_SIZE",
    "RASTER_SUFFIXES",
    "read_raster",
    "read_raster_bytes",
    "read_bigearthnet_patch",
    "is_bigearthnet_patch",
    "file_suffix",
    "read_raster_budgeted",
    "read_raster_bytes_budgeted",
    "read_bigearthnet_budgeted",
    "gdal_input_env",
]

#: Sentinel-2 bands that make the RGB image of a BigEarthNet patch (red, green, blue).
BIGEARTHNET_RGB = ("B04", "B03", "B02")
#: Side of a BigEarthNet-S2 patch at 10 m; coarser bands are upsampled to it.
BIGEARTHNET_SIZE = 120

#: Suffixes :func:`read_raster` accepts (compared case-insensitively).
RASTER_SUFFIXES = (".tif", ".tiff", ".npy", ".jpg", ".jpeg", ".png")
# JPEG and PNG are read with Pillow (as the EuroSAT training data was), not GDAL, whose
# JPEG decoder differs from Pillow's by a few levels on a quarter of the pixels.
_PIL_MODES = {"L": np.uint8, "RGB": np.uint8, "RGBA": np.uint8, "I;16": np.uint16}

_BIGEARTHNET_BAND_FILE = re.compile(r"_B(0[1-9]|1[0-2]|8A)\.tif$")

#: The GDAL driver an input is opened with: GeoTIFF alone (never VRT, HDF, NetCDF, ...).
INPUT_DRIVERS = "GTiff"
# GDAL settings for opening inputs: nothing beside the file is looked at (no directory
# listing, so no sidecar, external overview, mask or .aux.xml is read), no .aux.xml is
# written, and no network file system can be reached even if something asked for it.
_GDAL_INPUT_ENV = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_PAM_ENABLED": "NO",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".nec-no-network",
    "GDAL_HTTP_TIMEOUT": "1",
    "GDAL_HTTP_MAX_RETRY": "0",
}


def gdal_input_env() -> rasterio.Env:
    """The GDAL environment every input is opened in (see :data:`INPUT_DRIVERS`)."""
    return rasterio.Env(**_GDAL_INPUT_ENV)


def _open_geotiff(fp: Any) -> Any:
    """Open a local path or a :class:`MemoryFile` with the GeoTIFF driver alone."""
    if isinstance(fp, MemoryFile):
        return fp.open(driver=INPUT_DRIVERS)
    return rasterio.open(fp, driver=INPUT_DRIVERS)


class GeoArray(np.ndarray):
    """The pixels of a georeferenced raster, with where they lie in :attr:`geo`.

    ``geo`` is ``{"crs": "EPSG:<code>" or WKT, "transform": [a, b, c, d, e, f]}`` (the
    GDAL affine of the whole array as read) or None. It describes the array as read:
    views keep it unchanged (a slice's own origin is not recomputed), and ``np.asarray``
    drops it, so read it from the array the reader returned.
    """

    geo: dict[str, Any] | None = None

    def __array_finalize__(self, obj: Any) -> None:
        self.geo = getattr(obj, "geo", None)


def georef(array: np.ndarray) -> dict[str, Any] | None:
    """The georeferencing a reader attached to ``array`` (:class:`GeoArray`), or None."""
    return getattr(array, "geo", None)


def _with_geo(arr: np.ndarray, ds: Any, out_size: tuple[int, int] | None = None) -> np.ndarray:
    """``arr`` as a :class:`GeoArray` carrying ``ds``'s CRS and transform (if it has any)."""
    if ds.crs is None:
        return arr
    transform = ds.transform
    if out_size is not None:  # resampled on read: the pixel size scales
        transform = transform * transform.scale(ds.width / out_size[1], ds.height / out_size[0])
    epsg = ds.crs.to_epsg()
    out = arr.view(GeoArray)
    out.geo = {
        "crs": f"EPSG:{epsg}" if epsg else ds.crs.to_wkt(),
        "transform": [float(v) for v in list(transform)[:6]],
    }
    return out


def _scrub(text: str, path: Path, label: str) -> str:
    """``text`` with the local ``path`` (as GDAL quotes it) replaced by ``label``."""
    if str(path) == label:
        return text
    for local in sorted({str(path), str(path.absolute()), str(path.resolve())}, key=len)[::-1]:
        text = text.replace(local, label)
    return text


def file_suffix(name: str) -> str:
    """Lower-case suffix of a file or archive-member ``name`` (either path separator)."""
    return posixpath.splitext(name.replace("\\", "/"))[1].lower()


def _read_dataset(
    ds: Any,
    label: str,
    bands: Sequence[int] | None,
    budget: Budget,
    out_size: tuple[int, int] | None = None,
) -> np.ndarray:
    if ds.count < 1:
        raise InvalidInput(f"{label}: the file has no bands")
    indexes = band_indexes(bands, ds.count, label)
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
    return _with_geo(np.ascontiguousarray(arr), ds, out_size)


def _read_geotiff_bytes(
    data: bytes, label: str, bands: Sequence[int] | None, budget: Budget
) -> np.ndarray:
    try:
        with gdal_input_env(), MemoryFile(data) as mem, _open_geotiff(mem) as ds:
            return _read_dataset(ds, label, bands, budget)
    except (RasterioError, OSError) as err:
        raise InvalidInput(
            f"{label}: not a readable GeoTIFF (truncated or corrupt?): {err}"
        ) from err


def _pillow_geometry(f: BinaryIO, fmt: str, label: str) -> Any:
    """What a JPEG or PNG header declares (:mod:`~nec_serve.imagery.formats`); ``f`` rewound."""
    try:
        if fmt == "PNG":
            return png_geometry(f.read(33), label)
        return jpeg_geometry(f, label)
    finally:
        f.seek(0)


def _read_pillow(
    f: BinaryIO, fmt: str, label: str, bands: Sequence[int] | None, budget: Budget
) -> np.ndarray:
    """A JPEG or PNG as ``(bands, H, W)``; its declared size is admitted before decoding.

    The header's geometry is charged to ``budget`` before Pillow parses the file; Pillow's
    own decompression-bomb limit stays as a second line and is an input error too.
    """
    from PIL import Image, UnidentifiedImageError  # only for these files

    geom = _pillow_geometry(f, fmt, label)
    budget.image(label, geom.bands, geom.height, geom.width, geom.dtype)
    try:
        with Image.open(f, formats=("JPEG", "PNG")) as im:
            if im.format != fmt.upper() or (im.width, im.height) != (geom.width, geom.height):
                raise InvalidInput(
                    f"{label}: not a readable image: the header declares {geom.width}x"
                    f"{geom.height}, the decoder reads {im.format} {im.width}x{im.height}"
                )
            if im.mode not in _PIL_MODES:
                raise InvalidInput(
                    f"{label}: unsupported image mode {im.mode}; expected one of "
                    f"{', '.join(_PIL_MODES)}"
                )
            n_bands = len(im.getbands())
            indexes = band_indexes(bands, n_bands, label)
            dtype = np.dtype(_PIL_MODES[im.mode])
            arr = np.asarray(im, dtype=dtype)
    except InvalidInput:
        raise
    except Image.DecompressionBombError as err:
        raise InvalidInput(
            f"{label}: declares {geom.bands}x{geom.height}x{geom.width} {geom.dtype} "
            f"({geom.height * geom.width} pixels), over the image decoder's limit "
            f"of {Image.MAX_IMAGE_PIXELS * 2} pixels"
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InvalidInput(f"{label}: not a readable image (truncated or corrupt?): {err}") from err
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr[[i - 1 for i in indexes]])


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
    indexes = band_indexes(bands, arr.shape[0], label)
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
    f: BinaryIO, size: int, label: str, bands: Sequence[int] | None, budget: Budget
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
        band_indexes(bands, n_bands, label)
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
    """Read a GeoTIFF, ``.npy``, JPEG or PNG file as ``(bands, H, W)`` in the file's dtype.

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
    return read_raster_budgeted(Path(path), bands, Budget(limits), label)


def read_raster_budgeted(
    p: Path, bands: Sequence[int] | None, budget: Budget, label: str | None
) -> np.ndarray:
    """:func:`read_raster`, charging the file to ``budget`` (shared by one input's images)."""
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
    try:
        with open(p, "rb") as f:
            fmt = admit_format(f.read(HEAD_BYTES), suffix, label)
            f.seek(0)
            if fmt == "NumPy .npy":
                # The size of the file as opened, not as it was when stat() ran.
                return _load_npy(f, os.fstat(f.fileno()).st_size, label, bands, budget)
            if fmt != "GeoTIFF":
                return _read_pillow(f, fmt, label, bands, budget)
    except PermissionError as err:
        raise InvalidInput(f"{label}: cannot open: {_scrub(str(err), p, label)}") from err
    try:
        with gdal_input_env(), _open_geotiff(p) as ds:
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
    return read_raster_bytes_budgeted(bytes(data), file_suffix(name), name, bands, Budget(limits))


def read_raster_bytes_budgeted(
    data: bytes, suffix: str, label: str, bands: Sequence[int] | None, budget: Budget
) -> np.ndarray:
    """:func:`read_raster_bytes` for a known ``suffix``, charging the file to ``budget``."""
    if suffix not in RASTER_SUFFIXES:
        raise _unsupported_suffix(label, suffix)
    if not data:
        raise InvalidInput(f"{label}: file is empty (0 bytes)")
    fmt = admit_format(data[:HEAD_BYTES], suffix, label)
    if fmt == "NumPy .npy":
        return _load_npy(io.BytesIO(data), len(data), label, bands, budget)
    if fmt != "GeoTIFF":
        return _read_pillow(io.BytesIO(data), fmt, label, bands, budget)
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
    return read_bigearthnet_budgeted(p, bands, Budget(limits), str(p))


def read_bigearthnet_budgeted(
    p: Path, bands: Sequence[str], budget: Budget, label: str
) -> np.ndarray:
    """:func:`read_bigearthnet_patch`, charging the band files to ``budget``."""
    if not p.is_dir():
        raise InvalidInput(f"{label}: not a BigEarthNet patch folder (no such directory)")
    if isinstance(bands, str) or not isinstance(bands, Sequence) or len(bands) == 0:
        raise InvalidInput(f"{label}: bands must be a non-empty list of names like 'B04'")
    out = np.empty((len(bands), BIGEARTHNET_SIZE, BIGEARTHNET_SIZE), dtype=np.uint16)
    geo = None
    for i, band in enumerate(bands):
        path = _bigearthnet_band_file(p, str(band), label)
        what = f"{label}/{path.name}"
        try:
            with open(path, "rb") as f:
                admit_format(f.read(HEAD_BYTES), file_suffix(path.name), what)
            with gdal_input_env(), _open_geotiff(path) as ds:
                arr = _read_dataset(ds, what, [1], budget, (BIGEARTHNET_SIZE, BIGEARTHNET_SIZE))
        except (RasterioError, OSError) as err:
            raise InvalidInput(
                f"{what}: not a readable GeoTIFF (truncated or corrupt?): "
                f"{_scrub(str(err), path, what)}"
            ) from err
        if arr.dtype != np.uint16:
            raise InvalidInput(f"{what}: expected uint16 reflectance, got {arr.dtype}")
        out[i] = arr[0]
        geo = geo or georef(arr)
    if geo is None:
        return out
    stacked = out.view(GeoArray)
    stacked.geo = geo
    return stacked
