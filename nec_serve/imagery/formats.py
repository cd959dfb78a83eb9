"""What an input *is*, from its bytes: content identification and header admission (no GDAL).

An input is identified by its magic bytes, never by its name: :func:`identify` names the
format of a file's first bytes, and :func:`admit_format` refuses anything outside the
allow-list (GeoTIFF/BigTIFF, ``.npy``, JPEG, PNG) or whose name's suffix says otherwise,
naming the detected format. A GDAL VRT (XML), HDF, NetCDF, a zip or a pickle named
``.tif`` is refused here, before any library that could follow what it references sees it.

The declared size of a JPEG or PNG is read from its header here (:func:`png_geometry`,
:func:`jpeg_geometry`) and charged to the input's
:class:`~nec_serve.imagery.limits.Budget` before Pillow decodes anything; a ``.npy``
header and a GeoTIFF's directory are admitted the same way by their readers, with the
same limits and the same message shape (:meth:`InputLimits.check_image`).

:func:`check_name` refuses names that are not valid Unicode (unpaired surrogates from
undecodable bytes) before they reach a container, a log line or an S3 key.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from nec_serve.errors import InvalidInput

__all__ = [
    "HEAD_BYTES",
    "RASTER_FORMATS",
    "Geometry",
    "identify",
    "admit_format",
    "png_geometry",
    "jpeg_geometry",
    "check_name",
]

#: Bytes of a file that :func:`identify` looks at (enough for a tar header's magic).
HEAD_BYTES = 512

#: Allowed raster formats and the suffixes that may name them.
RASTER_FORMATS: dict[str, tuple[str, ...]] = {
    "GeoTIFF": (".tif", ".tiff"),
    "NumPy .npy": (".npy",),
    "JPEG": (".jpg", ".jpeg"),
    "PNG": (".png",),
}

# (format, magic prefixes). Refused formats are named so that an error says what was sent.
_MAGIC: tuple[tuple[str, tuple[bytes, ...]], ...] = (
    ("GeoTIFF", (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")),
    ("NumPy .npy", (b"\x93NUMPY",)),
    ("JPEG", (b"\xff\xd8\xff",)),
    ("PNG", (b"\x89PNG\r\n\x1a\n",)),
    ("gzip", (b"\x1f\x8b",)),
    ("bzip2", (b"BZh",)),
    ("xz", (b"\xfd7zXZ\x00",)),
    ("zip (or .npz)", (b"PK\x03\x04", b"PK\x05\x06")),
    ("HDF5", (b"\x89HDF\r\n\x1a\n",)),
    ("HDF4", (b"\x0e\x03\x13\x01",)),
    ("NetCDF", (b"CDF\x01", b"CDF\x02")),
    ("JPEG 2000", (b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")),
    ("GIF", (b"GIF87a", b"GIF89a")),
    ("PDF", (b"%PDF",)),
    ("Python pickle", (b"\x80",)),
    ("NEC container", (b"NECB",)),
)
_TAR_MAGIC = (b"ustar\x00", b"ustar ")


def identify(head: bytes) -> str:
    """The format of a file whose first bytes are ``head`` (up to :data:`HEAD_BYTES`).

    Returns one of the keys of :data:`RASTER_FORMATS`, or the name of another format
    (``"XML (e.g. a GDAL VRT)"``, ``"HDF5"``, ``"tar"``, ``"text"``, ...) or
    ``"unknown binary data"``.
    """
    for name, magics in _MAGIC:
        if head.startswith(magics):
            return name
    if head[257:263] in _TAR_MAGIC:
        return "tar"
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()  # a UTF-8 byte-order mark, blanks
    if text.startswith(b"<"):
        return "XML (e.g. a GDAL VRT)"
    if text.startswith((b"/vsi", b"http://", b"https://", b"ftp://", b"file:")):
        return "a path or URL (text)"
    if text[:1] in (b"{", b"["):
        return "JSON text"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "text"
    return "unknown binary data"


def admit_format(head: bytes, suffix: str, label: str) -> str:
    """Check that ``head`` is an allowed raster format and that ``suffix`` names it.

    Args:
        head: the file's first bytes (at least 8; :data:`HEAD_BYTES` for a better name).
        suffix: the file name's lower-case suffix (``.tif``, ...).
        label: the file in error messages.

    Returns:
        The format, a key of :data:`RASTER_FORMATS`.

    Raises:
        InvalidInput: naming ``label`` and the detected format, for content outside the
            allow-list or a suffix that names another format.
    """
    found = identify(head)
    allowed = RASTER_FORMATS.get(found)
    if allowed is None:
        raise InvalidInput(
            f"{label}: content is {found}, not an accepted image format "
            f"({', '.join(RASTER_FORMATS)}); refusing the input"
        )
    if suffix not in allowed:
        raise InvalidInput(
            f"{label}: content is {found} but the name ends in {suffix or '(no suffix)'!r}; "
            f"the suffix must agree with the content ({'/'.join(allowed)})"
        )
    return found


@dataclass(frozen=True)
class Geometry:
    """What an image header declares: bands, height, width and the decoded dtype name."""

    bands: int
    height: int
    width: int
    dtype: str


# PNG colour type -> (bands Pillow decodes to, supported). Palette and grey+alpha decode
# to modes the readers refuse; they are still admitted by size first.
_PNG_BANDS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def png_geometry(head: bytes, label: str) -> Geometry:
    """The geometry a PNG's ``IHDR`` chunk declares (the first 33 bytes are enough)."""
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise InvalidInput(f"{label}: not a readable PNG (truncated or corrupt?): no IHDR chunk")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    if width == 0 or height == 0 or colour not in _PNG_BANDS or depth not in (1, 2, 4, 8, 16):
        raise InvalidInput(
            f"{label}: not a readable PNG: IHDR declares {width}x{height}, bit depth {depth}, "
            f"colour type {colour}"
        )
    dtype = "uint16" if depth == 16 and colour == 0 else "uint8"
    return Geometry(_PNG_BANDS[colour], height, width, dtype)


# Start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])


def jpeg_geometry(f: BinaryIO, label: str) -> Geometry:
    """The geometry a JPEG's start-of-frame segment declares, found by walking its markers.

    Reads ``f`` (positioned at the start of the file) marker by marker, seeking over
    segment bodies, so a large EXIF or ICC block costs no memory; ``f`` is left where
    the walk ended.
    """
    if f.read(2) != b"\xff\xd8":
        raise InvalidInput(f"{label}: not a readable JPEG: no start-of-image marker")
    while (marker := _next_marker(f)) is not None:
        if marker in _STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # end of image, or a scan before any frame header
            break
        raw = f.read(2)
        if len(raw) < 2 or (length := struct.unpack(">H", raw)[0]) < 2:
            break
        if marker not in _SOF:
            f.seek(length - 2, 1)
            continue
        body = f.read(6)
        if len(body) < 6:
            break
        precision, height, width, comps = struct.unpack(">BHHB", body)
        if height == 0 or width == 0 or comps == 0:
            raise InvalidInput(
                f"{label}: not a readable JPEG: its frame declares {width}x{height} with "
                f"{comps} components"
            )
        return Geometry(comps, height, width, "uint8" if precision <= 8 else "uint16")
    raise InvalidInput(
        f"{label}: not a readable JPEG (truncated or corrupt?): no frame header before "
        "the image data"
    )


def _next_marker(f: BinaryIO) -> int | None:
    """The next JPEG marker code (fill bytes skipped), or None where there is none."""
    if f.read(1) != b"\xff":
        return None
    code = f.read(1)
    while code == b"\xff":
        code = f.read(1)
    return code[0] if code else None


def check_name(name: str, context: str | None = None) -> str:
    r"""``name`` if it is valid Unicode text; else an input error.

    File and member names decoded with ``surrogateescape`` (bytes that are not UTF-8),
    and JSON ``\u`` escapes of lone surrogates, hold unpaired surrogates, which no
    container, log line or S3 key can carry. The error shows the name escaped, after
    ``context`` (the archive or folder it is in) when given.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        shown = name.encode("utf-8", "backslashreplace").decode("utf-8")
        where = f"{context}: " if context else ""
        raise InvalidInput(
            f"{where}name '{shown}' is not valid UTF-8 text (it holds undecodable bytes or "
            "an unpaired surrogate); rename it"
        ) from None
    return name
