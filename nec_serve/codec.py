"""Entropy coding of quantized latents with a factorized prior, byte-exact with CompressAI.

The coder is :mod:`nec_serve._rans`, a C re-implementation of CompressAI 1.2.8's rANS
coder (``compressai.ans``). For the same symbols and tables it writes the same bytes as
``EntropyBottleneck.compress`` and reads them back bit-exactly, but it never hangs or reads
outside its input on bad data, and it runs at well over 50 million symbols per second.

One image is a ``(C, T)`` int32 array of symbols (channel-major: the order in which
``EntropyBottleneck.compress`` flattens a ``(1, C, T, 1)`` latent), already rounded and
shifted by the medians. Channel ``c`` is coded with CDF row ``c``; values the row does not
cover are escape-coded ("bypass" mode), so any symbol within ``2**26`` of the table range
can be coded, only at a higher cost.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from nec_serve import _rans
from nec_serve.errors import CorruptBitstream, InvalidInput
from nec_serve.tables import EntropyTables

__all__ = ["FactorizedCodec", "RAW_VALUE_SLACK"]

#: How far beyond its table a symbol may lie and still be escape-coded. CompressAI's coder
#: loops forever a little further out; ours refuses such symbols with :class:`InvalidInput`.
RAW_VALUE_SLACK = int(_rans.RAW_VALUE_SLACK)

_INDEX_CACHE_SIZE = 16


def _no_levels(levels: object) -> None:
    if levels is not None:
        raise InvalidInput(
            f"a rate of {levels!r} applies to families with a rate knob; a factorized prior "
            "codes every channel"
        )


class LatentCodec(Protocol):
    """What every family's entropy coder offers the pipeline.

    ``rate`` is the family's per-request rate knob (its
    :attr:`~nec_serve.contract.ModelFamily.rate`; the RVQ family's codebook levels), None
    for families with a fixed rate.
    """

    def encode_batch(self, symbols: np.ndarray, rate: Any = None) -> list[bytes]:
        """One bitstream per tile of a ``(B, C, T)`` int32 batch."""

    def decode_batch(
        self,
        streams: Sequence[bytes],
        tokens: int,
        rate: Any = None,
        *,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """The ``(B, C, T)`` int32 symbols of ``streams`` (written into ``out`` if given)."""

    def entropy_bound_bits(self, symbols: np.ndarray, rate: Any = None) -> float:
        """Ideal code length of the batch under the tables, in bits."""

    def rounding_sq_err(self, symbols: np.ndarray, latent: np.ndarray) -> float:
        """Squared error between the latent and what the symbols decode to (0.0: none)."""

    def code_batch(
        self, symbols: np.ndarray, latent: np.ndarray, rate: Any = None
    ) -> tuple[list[bytes], float, float]:
        """``encode_batch``, ``entropy_bound_bits`` and ``rounding_sq_err`` in one pass."""


def output_array(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """``out`` checked to be a writable C-contiguous int32 array of ``shape``, or a new one."""
    if out is None:
        return np.empty(shape, dtype=np.int32)
    if (
        not isinstance(out, np.ndarray)
        or out.dtype != np.int32
        or out.shape != shape
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        got = getattr(out, "shape", type(out).__name__)
        raise InvalidInput(f"out must be a writable C-contiguous int32 array {shape}, got {got}")
    return out


class FactorizedCodec:
    """rANS coder for ``(C, T)`` symbol arrays with one CDF per channel.

    Args:
        tables: the frozen entropy tables of the model's ``EntropyBottleneck``.

    The object is immutable apart from a small cache of index arrays and is safe to share
    between threads; the C coder releases the GIL, so a thread pool can code several
    images of a batch in parallel.
    """

    def __init__(self, tables: EntropyTables):
        self.tables = tables
        self.channels = tables.channels
        self._native = _rans.Tables(
            tables.quantized_cdf,
            tables.cdf_length,
            tables.offset,
            tables.max_length,
            tables.precision,
        )
        self._offset = tables.offset.astype(np.int64)
        self._max_value = tables.cdf_length.astype(np.int64) - 2
        self._medians = np.ascontiguousarray(tables.medians, dtype=np.float32)
        self._indexes: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def precision(self) -> int:
        """Probability precision of the CDFs in bits."""
        return self.tables.precision

    def codable_range(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel inclusive ``[low, high]`` symbol bounds accepted by :meth:`encode`."""
        low = self._offset - RAW_VALUE_SLACK
        high = self._offset + self._max_value + RAW_VALUE_SLACK
        return low, high

    # -- encoding ------------------------------------------------------------------------

    def encode(self, symbols: np.ndarray) -> bytes:
        """Entropy-code one image.

        Args:
            symbols: ``(C, T)`` integer array (int32 preferred; other integer dtypes are
                converted after a range check).

        Returns:
            The bitstream, identical to ``EntropyBottleneck.compress`` for the same symbols.

        Raises:
            InvalidInput: wrong type, dtype, shape or channel count, or a symbol outside
                :meth:`codable_range`.
        """
        sym = self._check_symbols(symbols, batched=False)
        tokens = sym.shape[1]
        try:
            return self._native.encode(sym, self._index_array(tokens))
        except ValueError:
            self._raise_range_error(sym[None])
            raise  # pragma: no cover - the range check above always finds the culprit

    def encode_batch(self, symbols: np.ndarray, levels: None = None) -> list[bytes]:
        """Entropy-code a batch of images given as a ``(B, C, T)`` array, one stream each.

        ``levels`` exists for the pipeline's one coder interface (the categorical coder
        codes the first ``levels`` rows); a factorized prior codes every channel.
        """
        _no_levels(levels)
        return self._code(self._check_symbols(symbols, batched=True), None)[0]

    def code_batch(
        self, symbols: np.ndarray, latent: np.ndarray, levels: None = None
    ) -> tuple[list[bytes], float, float]:
        """:meth:`encode_batch`, :meth:`entropy_bound_bits` and :meth:`rounding_sq_err` at once.

        One C call codes the batch, counts the bound in the same pass over the symbols and
        the rounding error beside it (the wrapper's hot path); the streams are those of
        :meth:`encode_batch`.

        Returns:
            ``(streams, bound_bits, sq_err)``.
        """
        _no_levels(levels)
        sym = self._check_symbols(symbols, batched=True)
        lat = np.asarray(latent)
        if lat.shape != sym.shape:
            raise InvalidInput(f"latent has shape {lat.shape}, the symbols {sym.shape}")
        return self._code(sym, np.ascontiguousarray(lat, dtype=np.float32))

    def _code(self, sym: np.ndarray, latent: np.ndarray | None) -> tuple[list[bytes], float, float]:
        medians = None if latent is None else self._medians
        try:
            return self._native.encode_tiles(sym, self.channels, sym.shape[2], latent, medians)
        except ValueError:
            self._raise_range_error(sym)
            raise  # pragma: no cover - the range check above always finds the culprit

    # -- decoding ------------------------------------------------------------------------

    def rounding_sq_err(self, symbols: np.ndarray, latent: np.ndarray) -> float:
        """Squared error of rounding ``latent - median`` to ``symbols``, summed over a batch.

        Computed without float64 temporaries: it runs on the wrapper's hot path.
        """
        err = latent - self._medians[None, :, None]
        err -= symbols
        return float(np.vdot(err, err))

    def decode(self, data: bytes, tokens: int) -> np.ndarray:
        """Decode one image of ``tokens`` tokens.

        Args:
            data: a bitstream written by :meth:`encode` or by CompressAI.
            tokens: number of tokens ``T`` the image was coded with.

        Returns:
            ``(C, T)`` int32 symbols.

        Raises:
            CorruptBitstream: truncated, damaged or mismatched data (including data coded
                with another token count or other tables, in nearly all cases).
            InvalidInput: a ``tokens`` value that is not a positive integer, or ``data``
                that is not a contiguous bytes-like object.
        """
        out = np.empty((self.channels, self._check_tokens(tokens)), dtype=np.int32)
        self._decode_into(data, out, None)
        return out

    def decode_batch(
        self,
        streams: Sequence[bytes],
        tokens: int,
        levels: None = None,
        *,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Decode several images of ``tokens`` tokens each into a ``(B, C, T)`` array.

        One C call decodes the batch. ``out``, a C-contiguous writable int32 ``(B, C, T)``
        array (a slice of a larger output, say), receives the symbols instead of a new
        array and is returned.
        """
        _no_levels(levels)
        if isinstance(streams, (bytes, bytearray, memoryview, str)):
            raise InvalidInput("decode_batch expects a sequence of bitstreams, not one stream")
        tokens = self._check_tokens(tokens)
        out = output_array(out, (len(streams), self.channels, tokens))
        try:
            self._native.decode_tiles(streams, self.channels, tokens, out)
        except _rans.DecodeError as err:
            raise CorruptBitstream(str(err)) from None
        except TypeError as err:
            raise InvalidInput(str(err)) from None
        return out

    # -- model cost ----------------------------------------------------------------------

    def entropy_bound_bits(self, symbols: np.ndarray, levels: None = None) -> float:
        """Ideal code length in bits of ``symbols`` under the quantized model.

        Each symbol costs ``-log2(freq / 2**precision)`` of its CDF entry. A symbol outside
        its table costs the escape symbol plus the raw bypass chunks the coder writes: one
        4-bit chunk per 15 in the chunk count and the count remainder, then one per 4 bits
        of the zig-zagged raw value. ``len(encode(x)) * 8`` exceeds this only by the coder
        overhead (the 64-bit final state and rounding to 32-bit words).

        Args:
            symbols: ``(C, T)`` or ``(B, C, T)`` integer array.
            levels: must be None (the pipeline's one coder interface; see
                :meth:`encode_batch`).

        Returns:
            The total over all symbols, in bits.
        """
        _no_levels(levels)
        arr = np.asarray(symbols)
        sym = self._check_symbols(arr, batched=arr.ndim == 3)
        if sym.ndim == 2:
            sym = sym[None]
        indexes = self._index_array(sym.shape[2])
        try:
            # One C pass per image (nec_serve/_rans.c, bound_core), GIL released.
            return float(sum(self._native.bound_bits(image, indexes) for image in sym))
        except ValueError:
            self._raise_range_error(sym)
            raise  # pragma: no cover

    # -- helpers -------------------------------------------------------------------------

    def _index_array(self, tokens: int) -> np.ndarray:
        indexes = self._indexes.get(tokens)
        if indexes is None:
            indexes = np.repeat(np.arange(self.channels, dtype=np.int32), tokens)
            indexes.setflags(write=False)
            with self._lock:
                if len(self._indexes) >= _INDEX_CACHE_SIZE:
                    self._indexes.pop(next(iter(self._indexes)))
                self._indexes[tokens] = indexes
        return indexes

    @staticmethod
    def _check_tokens(tokens: int) -> int:
        if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 1:
            raise InvalidInput(f"tokens must be a positive integer, got {tokens!r}")
        return int(tokens)

    def _check_symbols(self, symbols: np.ndarray, batched: bool) -> np.ndarray:
        if not isinstance(symbols, np.ndarray):
            raise InvalidInput(f"symbols must be a numpy array, got {type(symbols).__name__}")
        if not np.issubdtype(symbols.dtype, np.integer):
            raise InvalidInput(
                f"symbols must have an integer dtype (int32), got {symbols.dtype}; round and "
                "subtract the medians first"
            )
        ndim = 3 if batched else 2
        layout = "(B, C, T)" if batched else "(C, T)"
        if symbols.ndim != ndim:
            raise InvalidInput(f"symbols must have shape {layout}, got {symbols.shape}")
        if symbols.shape[-2] != self.channels:
            raise InvalidInput(
                f"symbols have {symbols.shape[-2]} channels, the entropy tables {self.channels}"
            )
        if symbols.shape[-1] < 1 or (batched and symbols.shape[0] < 1):
            raise InvalidInput(f"symbols array {symbols.shape} is empty")
        if symbols.dtype != np.int32:
            self._raise_range_error(symbols if batched else symbols[None])
            symbols = symbols.astype(np.int32)
        return np.ascontiguousarray(symbols)

    def _raise_range_error(self, sym: np.ndarray) -> None:
        """Raise :class:`InvalidInput` for the first uncodable symbol in ``(B, C, T)``."""
        low, high = self.codable_range()
        # int32 symbols compare as they are (the range fits in int32); others widen to int64.
        values = sym if sym.dtype == np.int32 else sym.astype(np.int64)
        low, high = low.astype(values.dtype), high.astype(values.dtype)
        bad = (values < low[None, :, None]) | (values > high[None, :, None])
        if not bad.any():
            return
        b, c, t = (int(i) for i in np.argwhere(bad)[0])
        image = f"image {b}, " if sym.shape[0] > 1 else ""
        first = int(self._offset[c])
        last = first + int(self._max_value[c]) - 1
        raise InvalidInput(
            f"symbol {int(values[b, c, t])} at {image}channel {c}, token {t} is outside the "
            f"codable range [{int(low[c])}, {int(high[c])}] of channel {c} (its table covers "
            f"[{first}, {last}]; values up to 2**26 beyond are escape-coded). Is the latent "
            f"finite and were the medians subtracted? {int(bad.sum())} symbol(s) out of range."
        )

    def _decode_into(self, data: bytes, out: np.ndarray, position: int | None) -> None:
        where = "" if position is None else f"stream {position}: "
        try:
            self._native.decode(data, self._index_array(out.shape[1]), out)
        except _rans.DecodeError as err:
            raise CorruptBitstream(f"{where}{err}") from None
        except (TypeError, BufferError):
            raise InvalidInput(
                f"{where}bitstream must be a contiguous bytes-like object, "
                f"got {type(data).__name__}"
            ) from None
