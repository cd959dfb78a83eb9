"""Unsigned LEB128 variable-length integers, as the container's format 3 writes them.

Seven bits per byte, least significant group first, the high bit set on every byte but the
last. A reader refuses, as corruption, a varint longer than its type allows, a value over
its type's range and a non-minimal encoding (a last byte of zero after the first), so that
each value has exactly one encoding and a flipped continuation bit cannot go unnoticed.
"""

from __future__ import annotations

from nec_serve.errors import CorruptBitstream

__all__ = ["put", "put_signed", "Cursor"]


def put(out: bytearray, value: int) -> None:
    """Append ``value`` (>= 0) to ``out``."""
    if value < 0:
        raise ValueError(f"a varint holds values >= 0, got {value}")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def zigzag(value: int) -> int:
    """Map a signed integer to an unsigned one (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...)."""
    return value * 2 if value >= 0 else -value * 2 - 1


def unzigzag(value: int) -> int:
    """The inverse of :func:`zigzag`."""
    return value >> 1 if not value & 1 else -((value + 1) >> 1)


def put_signed(out: bytearray, value: int) -> None:
    """Append a signed ``value``, zigzag-mapped."""
    put(out, zigzag(value))


class Cursor:
    """Read varints and byte strings from a buffer, refusing anything malformed.

    ``where`` names the structure in errors, e.g. ``"group 3 index"``.
    """

    def __init__(self, data: bytes | memoryview, where: str):
        self.data = memoryview(data)
        self.pos = 0
        self.where = where

    @property
    def left(self) -> int:
        """Bytes not read yet."""
        return len(self.data) - self.pos

    def uint(self, bits: int, what: str, limit: int | None = None) -> int:
        """One varint of a ``bits``-bit unsigned type, at most ``limit`` if given."""
        value = shift = 0
        start = self.pos
        for _ in range((bits + 6) // 7):
            if self.pos >= len(self.data):
                raise CorruptBitstream(f"{self.where}: truncated inside {what}")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if byte == 0 and self.pos - start > 1:
                    raise CorruptBitstream(f"{self.where}: {what} is not minimally encoded")
                if value >= 1 << bits:
                    raise CorruptBitstream(f"{self.where}: {what} {value} overflows {bits} bits")
                if limit is not None and value > limit:
                    raise CorruptBitstream(f"{self.where}: {what} {value} exceeds {limit}")
                return value
        raise CorruptBitstream(f"{self.where}: {what} is longer than a {bits}-bit varint")

    def int32(self, what: str) -> int:
        """One zigzag varint of a signed 32-bit value."""
        return unzigzag(self.uint(32, what))

    def take(self, n: int, what: str) -> memoryview:
        """The next ``n`` bytes."""
        if n > self.left:
            raise CorruptBitstream(
                f"{self.where}: {what} declares {n} bytes, only {self.left} are left"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk
