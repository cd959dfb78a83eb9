"""Static categorical entropy coding of codebook indices (the RVQ family's entropy model).

Each codebook level ``l`` has one frozen probability table over its ``K`` entries, made at
export from the training set's index histogram with +1 smoothing (so that every entry,
even one never seen, stays codable), quantized to 16-bit frequencies for the project's
rANS coder (:mod:`nec_serve._rans`). The tables use the factorized model's file format
(:class:`~nec_serve.tables.EntropyTables`: one CDF row per level, offset 0, medians 0),
so they travel, hash and verify the same way; only the coder around them differs.

A tile's indices are ``(levels, T)`` int32 (level-major, ``T`` latent positions); a
request coding ``n`` codebooks codes rows ``0..n-1`` only, and the decoder returns the
full ``(levels, T)`` layout with ``-1`` in the rows that were not coded, which is what
the RVQ decoder graph takes. Indices outside ``[0, K)`` are refused when coding, and a
stream that decodes to one (only an escape code can) is reported as corrupt.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nec_serve import _rans
from nec_serve.codec import output_array
from nec_serve.errors import CorruptBitstream, InvalidInput
from nec_serve.tables import EntropyTables

__all__ = ["categorical_tables", "CategoricalCodec", "UNUSED_LEVEL"]

#: The index that marks a codebook level a tile was not coded with.
UNUSED_LEVEL = -1
_PRECISION = 16


def categorical_tables(counts: np.ndarray, precision: int = _PRECISION) -> EntropyTables:
    """Frozen tables from per-level index histograms ``(levels, K)`` with +1 smoothing.

    Every entry gets a frequency of at least 1 out of ``2**precision``, and one more is
    kept for the coder's escape symbol (never used for valid indices).

    Raises:
        InvalidInput: counts that are not a non-negative finite ``(levels, K)`` array, or
            ``K`` too large for ``precision``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 1:
        raise InvalidInput(f"index histograms must be (levels, K), got {counts.shape}")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise InvalidInput("index histograms must be finite and >= 0")
    levels, k = counts.shape
    top = 1 << precision
    if k + 1 >= top:
        raise InvalidInput(f"{k} entries do not fit {precision}-bit frequencies")
    budget = top - 1  # the escape symbol keeps 1
    cdf = np.zeros((levels, k + 2), dtype=np.int64)
    for level in range(levels):
        p = (counts[level] + 1.0) / (counts[level].sum() + k)
        freq = np.maximum(1, np.floor(p * budget).astype(np.int64))
        # Hand the rounding remainder to (or take it from) the most frequent entries.
        diff = budget - int(freq.sum())
        order = np.argsort(-p, kind="stable")
        i = 0
        while diff != 0:
            j = order[i % k]
            step = 1 if diff > 0 else -1
            if freq[j] + step >= 1:
                freq[j] += step
                diff -= step
            i += 1
        cdf[level, 1 : k + 1] = np.cumsum(freq)
        cdf[level, k + 1] = top
    return EntropyTables(
        quantized_cdf=cdf.astype(np.int32),
        cdf_length=np.full(levels, k + 2, dtype=np.int32),
        offset=np.zeros(levels, dtype=np.int32),
        medians=np.zeros(levels, dtype=np.float32),
        precision=precision,
    )


class CategoricalCodec:
    """rANS coder of ``(levels, T)`` codebook indices, the first ``n`` levels per request.

    Args:
        tables: one categorical table per level (:func:`categorical_tables`).
    """

    def __init__(self, tables: EntropyTables):
        self.tables = tables
        self.levels = tables.channels
        lengths = set(tables.cdf_length.tolist())
        if len(lengths) != 1 or (tables.offset != 0).any():
            raise InvalidInput("categorical tables must have one entry count and offset 0")
        self.entries = lengths.pop() - 2
        self._native = _rans.Tables(
            tables.quantized_cdf,
            tables.cdf_length,
            tables.offset,
            tables.max_length,
            tables.precision,
        )

    @property
    def channels(self) -> int:
        """Rows of a tile's index array (the export's levels)."""
        return self.levels

    def check_levels(self, levels: int) -> int:
        """``levels`` as an int in ``1..self.levels``, else :class:`InvalidInput`."""
        if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)):
            raise InvalidInput(f"codebooks must be an integer, got {levels!r}")
        if not 1 <= levels <= self.levels:
            raise InvalidInput(
                f"codebooks must be in 1..{self.levels} (this export's levels), got {levels}"
            )
        return int(levels)

    def _indexes(self, levels: int, tokens: int) -> np.ndarray:
        return np.repeat(np.arange(levels, dtype=np.int32), tokens)

    def _check(self, indices: np.ndarray, levels: int) -> np.ndarray:
        if not isinstance(indices, np.ndarray) or indices.dtype.kind not in "iu":
            raise InvalidInput(f"indices must be an integer numpy array, got {type(indices)}")
        if indices.ndim != 3 or indices.shape[1] != self.levels or indices.shape[2] < 1:
            raise InvalidInput(
                f"indices must be shaped (B, {self.levels}, T), got {tuple(indices.shape)}"
            )
        used = indices[:, :levels]
        bad = (used < 0) | (used >= self.entries)
        if bad.any():
            b, level, t = (int(i) for i in np.argwhere(bad)[0])
            raise InvalidInput(
                f"index {int(used[b, level, t])} at tile {b}, codebook {level + 1}, position "
                f"{t} is outside the codebook's {self.entries} entries"
            )
        return np.ascontiguousarray(used, dtype=np.int32)

    def encode_batch(self, indices: np.ndarray, levels: int | None = None) -> list[bytes]:
        """Code the first ``levels`` rows of each ``(B, levels_total, T)`` tile; one stream each."""
        levels = self.check_levels(self.levels if levels is None else levels)
        used = self._check(indices, levels)
        return self._native.encode_tiles(used, levels, used.shape[2])[0]

    def code_batch(
        self, indices: np.ndarray, latent: np.ndarray, levels: int | None = None
    ) -> tuple[list[bytes], float, float]:
        """:meth:`encode_batch` and :meth:`entropy_bound_bits` in one C pass; no rounding."""
        levels = self.check_levels(self.levels if levels is None else levels)
        used = self._check(indices, levels)
        streams, bits, _ = self._native.encode_tiles(used, levels, used.shape[2])
        return streams, bits, 0.0

    def entropy_bound_bits(self, indices: np.ndarray, levels: int | None = None) -> float:
        """Ideal code length of the first ``levels`` rows under the tables, in bits."""
        levels = self.check_levels(self.levels if levels is None else levels)
        used = self._check(indices, levels)
        idx = self._indexes(levels, used.shape[2])
        return float(sum(self._native.bound_bits(tile, idx) for tile in used))

    def rounding_sq_err(self, indices: np.ndarray, latent: np.ndarray) -> float:
        """No rounding: a codebook index has no continuous value it stands for (0.0)."""
        return 0.0

    def decode_batch(
        self,
        streams: Sequence[bytes],
        tokens: int,
        levels: int | None = None,
        *,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Decode streams of ``levels`` rows into ``(B, levels_total, T)``, -1 in unused rows.

        One C call decodes the batch; ``out`` (a writable C-contiguous int32 array of that
        shape) receives the indices instead of a new array.
        """
        if isinstance(streams, (bytes, bytearray, memoryview, str)):
            raise InvalidInput("decode_batch expects a sequence of bitstreams, not one stream")
        levels = self.check_levels(self.levels if levels is None else levels)
        if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 1:
            raise InvalidInput(f"tokens must be a positive integer, got {tokens!r}")
        streams = list(streams)
        out = output_array(out, (len(streams), self.levels, int(tokens)))
        part = (
            out
            if levels == self.levels
            else np.empty((len(streams), levels, int(tokens)), np.int32)
        )
        try:
            self._native.decode_tiles(streams, levels, int(tokens), part)
        except (_rans.DecodeError, TypeError):
            # Name the first bad stream as a stream-by-stream decode would.
            self._decode_each(streams, levels, int(tokens))
            raise  # pragma: no cover - _decode_each raises for the same stream
        bad = ((part < 0) | (part >= self.entries)).any(axis=(1, 2))
        if bad.any():
            raise CorruptBitstream(
                f"stream {int(np.argmax(bad))}: decodes to an index outside the codebook's "
                f"{self.entries} entries (the stream is damaged or was coded with other tables)"
            )
        if part is not out:
            out[:, :levels] = part
            out[:, levels:] = UNUSED_LEVEL
        return out

    def _decode_each(self, streams: Sequence[bytes], levels: int, tokens: int) -> None:
        """Decode stream by stream; raise for the first that is damaged or out of range."""
        idx = self._indexes(levels, tokens)
        part = np.empty((levels, tokens), dtype=np.int32)
        for i, data in enumerate(streams):
            try:
                self._native.decode(data, idx, part)
            except _rans.DecodeError as err:
                raise CorruptBitstream(f"stream {i}: {err}") from None
            except (TypeError, BufferError):
                raise InvalidInput(
                    f"stream {i}: bitstream must be a contiguous bytes-like object"
                ) from None
            if (part < 0).any() or (part >= self.entries).any():
                raise CorruptBitstream(
                    f"stream {i}: decodes to an index outside the codebook's {self.entries} "
                    "entries (the stream is damaged or was coded with other tables)"
                )
