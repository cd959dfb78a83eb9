"""Frozen entropy tables: the only thing the coder needs besides the symbols.

The tables are computed once, at export, from the model's ``EntropyBottleneck`` and then
travel with the graphs as a small binary file. The coder never recomputes them: a
one-count difference in a quantized CDF makes every bitstream undecodable, and
CompressAI's ``update()`` does not give identical tables across versions and machines.

File layout (all little-endian, see ``docs/bitstream.md``)::

    magic      4s   b"NECT"
    version    u16  1
    precision  u16  probability precision in bits (CompressAI: 16)
    channels   u32  C
    max_length u32  L, the row length of the CDF matrix
    cdf_length i32[C]
    offset     i32[C]
    medians    f32[C]
    cdf        i32[C*L]  row-major, row c valid up to cdf_length[c]

The table hash is the SHA-256 of exactly these bytes, so it is stable across NumPy
versions and platforms and names the tables in every container.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from nec_serve.errors import InvalidInput

__all__ = ["EntropyTables", "TABLES_FILENAME"]

TABLES_FILENAME = "entropy_tables.bin"

_MAGIC = b"NECT"
_VERSION = 1
_HEADER = struct.Struct("<4sHHII")


@dataclass(frozen=True, eq=False)
class EntropyTables:
    """Quantized CDFs of a factorized prior, one row per channel.

    Attributes:
        quantized_cdf: ``(C, L)`` int32; row ``c`` is a CDF over ``cdf_length[c]`` entries
            that starts at 0 and ends at ``1 << precision``.
        cdf_length: ``(C,)`` int32, valid entries per row (symbols + 1, the last symbol
            being the escape to bypass coding).
        offset: ``(C,)`` int32, the symbol value of CDF entry 0.
        medians: ``(C,)`` float32, subtracted before rounding in the encoder graph.
        precision: probability precision in bits.
    """

    quantized_cdf: np.ndarray
    cdf_length: np.ndarray
    offset: np.ndarray
    medians: np.ndarray
    precision: int = 16

    def __post_init__(self) -> None:
        """Normalise dtypes and contiguity, then validate."""
        for name, dtype in (
            ("quantized_cdf", np.int32),
            ("cdf_length", np.int32),
            ("offset", np.int32),
            ("medians", np.float32),
        ):
            arr = np.ascontiguousarray(np.asarray(getattr(self, name)), dtype=dtype)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        self.validate()

    @property
    def channels(self) -> int:
        """Number of channels (rows)."""
        return int(self.quantized_cdf.shape[0])

    @property
    def max_length(self) -> int:
        """Row length of the CDF matrix."""
        return int(self.quantized_cdf.shape[1])

    def validate(self) -> None:
        """Check the tables can drive the coder; raises :class:`InvalidInput` if not."""
        cdf, lengths = self.quantized_cdf, self.cdf_length
        if not 1 <= self.precision <= 16:
            raise InvalidInput(f"invalid precision {self.precision}, expected 1..16 bits")
        if cdf.ndim != 2 or cdf.shape[0] == 0:
            raise InvalidInput(f"invalid CDF matrix shape {cdf.shape}, expected (C, L)")
        c = cdf.shape[0]
        for name in ("cdf_length", "offset", "medians"):
            shape = getattr(self, name).shape
            if shape != (c,):
                raise InvalidInput(f"invalid {name} shape {shape}, expected ({c},)")
        if lengths.min() < 3 or lengths.max() > cdf.shape[1]:
            raise InvalidInput(
                f"invalid cdf_length range [{lengths.min()}, {lengths.max()}], "
                f"expected within [3, {cdf.shape[1]}]"
            )
        if not np.isfinite(self.medians).all():
            raise InvalidInput("entropy tables hold non-finite medians")
        top = 1 << self.precision
        cols = np.arange(cdf.shape[1])[None, :]
        valid = cols < lengths[:, None]
        if (cdf[:, 0] != 0).any():
            raise InvalidInput(f"CDF rows {np.flatnonzero(cdf[:, 0] != 0)[:5]} do not start at 0")
        ends = cdf[np.arange(c), lengths - 1]
        if (ends != top).any():
            bad = np.flatnonzero(ends != top)[:5]
            raise InvalidInput(f"CDF rows {bad} do not end at {top}")
        steps = np.diff(cdf, axis=1)
        inside = valid[:, 1:]
        if (steps[inside] <= 0).any():
            rows = np.unique(np.nonzero((steps <= 0) & inside)[0])[:5]
            raise InvalidInput(f"CDF rows {rows} are not strictly increasing")

    def to_bytes(self) -> bytes:
        """Serialise to the canonical binary layout described in the module docstring."""
        header = _HEADER.pack(_MAGIC, _VERSION, self.precision, self.channels, self.max_length)
        return b"".join(
            (
                header,
                self.cdf_length.astype("<i4").tobytes(),
                self.offset.astype("<i4").tobytes(),
                self.medians.astype("<f4").tobytes(),
                self.quantized_cdf.astype("<i4").tobytes(),
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> EntropyTables:
        """Parse and validate tables written by :meth:`to_bytes`."""
        if len(data) < _HEADER.size:
            raise InvalidInput(f"entropy tables truncated: {len(data)} bytes")
        magic, version, precision, c, length = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise InvalidInput(f"not an entropy table file (magic {magic!r})")
        if version != _VERSION:
            raise InvalidInput(f"unsupported entropy table version {version}")
        expected = _HEADER.size + 4 * (3 * c + c * length)
        if len(data) != expected:
            raise InvalidInput(f"entropy tables have {len(data)} bytes, header says {expected}")
        pos = _HEADER.size

        def take(dtype: str, count: int) -> np.ndarray:
            nonlocal pos
            arr = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
            pos += 4 * count
            return arr

        cdf_length = take("<i4", c)
        offset = take("<i4", c)
        medians = take("<f4", c)
        cdf = take("<i4", c * length).reshape(c, length)
        return cls(cdf, cdf_length, offset, medians, precision)

    @cached_property
    def sha256(self) -> str:
        """Hex SHA-256 of the canonical serialisation; names the tables in containers."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: str | Path) -> str:
        """Write the tables and a ``.sha256`` file beside them; returns the hash."""
        path = Path(path)
        path.write_bytes(self.to_bytes())
        path.with_name(path.name + ".sha256").write_text(f"{self.sha256}  {path.name}\n")
        return self.sha256

    @classmethod
    def load(cls, path: str | Path) -> EntropyTables:
        """Read tables and, when a ``.sha256`` file is beside them, verify it."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise InvalidInput(f"cannot read entropy tables {path}: {err}") from err
        tables = cls.from_bytes(data)
        sidecar = path.with_name(path.name + ".sha256")
        if sidecar.exists():
            recorded = sidecar.read_text().split()[0]
            if recorded != tables.sha256:
                raise InvalidInput(
                    f"entropy tables {path} hash {tables.sha256[:12]} does not match "
                    f"{sidecar.name} ({recorded[:12]}): the file was changed after export"
                )
        return tables

    def symbol_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel [min, max] symbol values coded without the bypass escape."""
        low = self.offset.astype(np.int64)
        return low, low + self.cdf_length.astype(np.int64) - 3
