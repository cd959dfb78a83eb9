"""What one input may declare before it is decoded, and checks of user-given values (NumPy only).

:class:`InputLimits` bounds the geometry a file declares (bands, pixels, decoded bytes);
a :class:`Budget` charges every image of one input (a file, an archive or a folder)
against one ``max_decoded_bytes``. Also here: band selections (:func:`parse_bands` for
``--bands`` text, :func:`band_indexes` against a file's band count), :func:`positive_int`
and :func:`human_bytes` for messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from nec_serve.errors import InvalidInput

__all__ = [
    "InputLimits",
    "Budget",
    "human_bytes",
    "parse_bands",
    "band_indexes",
    "positive_int",
]


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
                f"{what}: declares {declared} ({human_bytes(nbytes)} decoded), over "
                f"max_image_bytes={self.max_image_bytes}"
            )
        if height * width > self.max_pixels:
            raise InvalidInput(
                f"{what}: declares {declared} ({height * width} pixels), over "
                f"max_pixels={self.max_pixels}"
            )
        return nbytes


def human_bytes(n: int) -> str:
    """``n`` bytes in decimal units with one decimal, e.g. ``30.0 GB``."""
    if n < 1000:
        return f"{n} B"
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        n /= 1000
        if n < 1000 or unit == "PB":
            break
    return f"{n:.1f} {unit}"


class Budget:
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
                f"({human_bytes(nbytes)} decoded), bringing this input to "
                f"{human_bytes(self.total)} decoded, over max_decoded_bytes={cap}"
            )


def _limits(limits: InputLimits | None) -> InputLimits:
    if limits is None:
        return InputLimits()
    if not isinstance(limits, InputLimits):
        raise InvalidInput(f"limits must be an InputLimits, got {type(limits).__name__}")
    return limits


def parse_bands(text: str | None, what: str = "--bands") -> list[int] | None:
    """1-based band indices from ``"1,2,3"``; ``None`` or ``""`` means all bands.

    Raises:
        InvalidInput: naming ``what`` and the text, for anything but positive integers.
    """
    if not text:
        return None
    try:
        bands = [int(b) for b in text.split(",")]
    except ValueError:
        raise InvalidInput(f"invalid {what} {text!r}, expected e.g. 1,2,3") from None
    if any(b < 1 for b in bands):
        raise InvalidInput(f"invalid {what} {text!r}: band indices start at 1")
    return bands


def band_indexes(bands: Sequence[int] | None, count: int, label: str) -> list[int]:
    """Check a 1-based band selection against a file's ``count`` bands.

    Args:
        bands: 1-based band indices in output order; ``None`` selects all bands.
        count: bands the file has.
        label: the file in error messages.

    Returns:
        The indices as plain ints (``1..count`` for ``None``).

    Raises:
        InvalidInput: naming ``label``, for a non-sequence, an empty selection, a
            non-integer or an index outside ``1..count``.
    """
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


def positive_int(value: Any, what: str) -> int:
    """``value`` as an int, or :class:`InvalidInput` naming ``what`` unless it is one >= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInput(f"{what} must be a positive integer, got {value!r}")
    return int(value)
