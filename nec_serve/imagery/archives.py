"""Streamed reading of the raster members of tar archives, with nothing written to disk.

:func:`iter_tar_tiles` reads an archive once, front to back, through a decompressor
picked from its magic bytes (gzip, bzip2, xz or none); it refuses unsafe members
(links, devices, absolute or ``..`` paths), caps the member count and the decompressed
bytes, insists on an intact end of archive, and decodes the ``.tif``/``.tiff``/``.npy``
members with :mod:`nec_serve.imagery.readers`.
"""

from __future__ import annotations

import bz2
import collections
import gzip
import io
import lzma
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from nec_serve.errors import InvalidInput
from nec_serve.imagery.formats import HEAD_BYTES, check_name, identify
from nec_serve.imagery.limits import Budget, InputLimits, positive_int
from nec_serve.imagery.readers import RASTER_SUFFIXES, file_suffix, read_raster_bytes_budgeted

__all__ = ["ARCHIVE_SUFFIXES", "iter_tar_tiles", "iter_tar_budgeted"]

#: Suffixes :func:`~nec_serve.imagery.inputs.iter_inputs` treats as tar archives
#: (compression is sniffed, not trusted).
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

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


# Archive suffix -> what its content must be (identify()'s names).
_ARCHIVE_CONTENT = {
    ".tar": "tar",
    ".tar.gz": "gzip",
    ".tgz": "gzip",
    ".tar.bz2": "bzip2",
    ".tbz2": "bzip2",
    ".tar.xz": "xz",
    ".txz": "xz",
}


def _admit_archive(head: bytes, name: str, label: str) -> None:
    """Refuse an archive file whose content is not what its suffix names."""
    suffix = next((s for s in ARCHIVE_SUFFIXES[::-1] if name.lower().endswith(s)), None)
    want = _ARCHIVE_CONTENT.get(suffix or "")
    if want is None:
        return
    found = identify(head)
    if found != want:
        raise InvalidInput(
            f"{label}: content is {found} but the name ends in {suffix!r}, which needs "
            f"{want} data; the suffix must agree with the content"
        )


def _check_member(member: tarfile.TarInfo, label: str) -> None:
    name = check_name(member.name, f"{label}: member")
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
    yield from iter_tar_budgeted(
        source,
        bands,
        Budget(limits),
        label,
        max_members=max_members,
        max_member_bytes=max_member_bytes,
        max_total_bytes=max_total_bytes,
    )


def iter_tar_budgeted(
    source: str | os.PathLike[str] | BinaryIO,
    bands: Sequence[int] | None,
    budget: Budget,
    label: str | None,
    *,
    max_members: int = _MAX_MEMBERS,
    max_member_bytes: int = _MAX_MEMBER_BYTES,
    max_total_bytes: int = _MAX_TOTAL_BYTES,
) -> Iterator[tuple[str, np.ndarray]]:
    """:func:`iter_tar_tiles`, charging the members to ``budget`` (shared by one input)."""
    max_members = positive_int(max_members, "max_members")
    max_member_bytes = positive_int(max_member_bytes, "max_member_bytes")
    max_total_bytes = positive_int(max_total_bytes, "max_total_bytes")
    label = _source_label(source) if label is None else label
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidInput(f"{label}: no such archive file")
        if path.stat().st_size == 0:
            raise InvalidInput(f"{label}: archive file is empty (0 bytes)")
        with open(path, "rb") as f:
            _admit_archive(f.read(HEAD_BYTES), path.name, label)
            f.seek(0)
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
    budget: Budget,
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
    budget: Budget,
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
        suffix = file_suffix(member.name)
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
        yield name, read_raster_bytes_budgeted(data, suffix, what, bands, budget)
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
