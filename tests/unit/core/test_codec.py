"""Byte-exactness with CompressAI 1.2.8 and robustness of the rANS coder."""

from __future__ import annotations

import numpy as np
import pytest

from nec_serve import _rans
from nec_serve.codec import RAW_VALUE_SLACK, FactorizedCodec
from nec_serve.errors import CorruptBitstream, InvalidInput
from nec_serve.tables import EntropyTables

torch = pytest.importorskip("torch")
compressai = pytest.importorskip("compressai")
from compressai import ans  # noqa: E402
from compressai.entropy_models import EntropyBottleneck  # noqa: E402

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def make_bottleneck(channels: int, seed: int) -> EntropyBottleneck:
    """An EntropyBottleneck with random (but fixed) density and table ranges."""
    gen = torch.Generator().manual_seed(seed)
    eb = EntropyBottleneck(channels)
    with torch.no_grad():
        for p in eb.biases:
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        for p in eb.matrices:
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        for p in eb.factors:
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        scale = torch.rand(channels, generator=gen) * 4 + 0.3
        median = torch.randn(channels, generator=gen) * 0.5
        eb.quantiles[:, 0, 0] = median - 3 * scale
        eb.quantiles[:, 0, 1] = median
        eb.quantiles[:, 0, 2] = median + 3 * scale
    eb.update(force=True)
    return eb


def tables_of(eb: EntropyBottleneck) -> EntropyTables:
    return EntropyTables(
        quantized_cdf=eb._quantized_cdf.numpy(),
        cdf_length=eb._cdf_length.numpy(),
        offset=eb._offset.numpy(),
        medians=eb.quantiles[:, 0, 1].detach().numpy(),
        precision=16,
    )


def medians_of(eb: EntropyBottleneck) -> torch.Tensor:
    return eb.quantiles[:, 0, 1].detach().reshape(1, -1, 1, 1)


def latents(eb: EntropyBottleneck, batch: int, tokens: int, dist: str, seed: int):
    """(B, C, T, 1) float latents around the medians."""
    gen = torch.Generator().manual_seed(seed)
    c = eb.channels
    spread = (eb.quantiles[:, 0, 2] - eb.quantiles[:, 0, 0]).detach().reshape(1, c, 1, 1) / 6
    noise = torch.randn(batch, c, tokens, 1, generator=gen)
    if dist == "normal":  # mostly in range, a few beyond the tables
        x = noise * spread * 1.5
    elif dist == "wide":  # often beyond the tables, with huge outliers
        x = noise * spread * 6
        flat = x.view(-1)
        pick = torch.randint(0, flat.numel(), (max(4, flat.numel() // 500),), generator=gen)
        flat[pick] = torch.sign(torch.randn(pick.numel(), generator=gen)) * 1e5
        flat[pick[:2]] = torch.tensor([1e5, -1e5])
    elif dist == "tight":  # almost always the most probable symbol
        x = noise * 0.2
    else:
        raise ValueError(dist)
    return x + medians_of(eb)


def symbols_of(eb: EntropyBottleneck, x: torch.Tensor) -> np.ndarray:
    """The int32 symbols EntropyBottleneck.compress codes, as (B, C, T)."""
    sym = eb.quantize(x, "symbols", medians_of(eb))
    return sym[..., 0].numpy().astype(np.int32)


def compressai_decode(eb: EntropyBottleneck, data: bytes, tokens: int) -> np.ndarray:
    indexes = np.repeat(np.arange(eb.channels, dtype=np.int32), tokens)
    values = ans.RansDecoder().decode_with_indexes(
        data,
        indexes.tolist(),
        eb._quantized_cdf.tolist(),
        eb._cdf_length.tolist(),
        eb._offset.tolist(),
    )
    return np.asarray(values, dtype=np.int32).reshape(eb.channels, tokens)


def compressai_encode(eb: EntropyBottleneck, symbols: np.ndarray) -> bytes:
    """CompressAI's coder on raw int symbols (C, T): only call with codable values."""
    c, t = symbols.shape
    indexes = np.repeat(np.arange(c, dtype=np.int32), t)
    return ans.RansEncoder().encode_with_indexes(
        symbols.reshape(-1).tolist(),
        indexes.tolist(),
        eb._quantized_cdf.tolist(),
        eb._cdf_length.tolist(),
        eb._offset.tolist(),
    )


@pytest.fixture(scope="module")
def eb768():
    return make_bottleneck(768, seed=0)


@pytest.fixture(scope="module")
def codec768(eb768):
    return FactorizedCodec(tables_of(eb768))


@pytest.fixture(scope="module")
def eb_small():
    return make_bottleneck(12, seed=3)


@pytest.fixture(scope="module")
def codec_small(eb_small):
    return FactorizedCodec(tables_of(eb_small))


# -- byte-exactness ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "batch", "dist", "seed"),
    [(257, 2, "normal", 0), (197, 1, "wide", 1), (257, 1, "tight", 2)],
)
def test_matches_compressai_768(eb768, codec768, tokens, batch, dist, seed):
    x = latents(eb768, batch, tokens, dist, seed)
    sym = symbols_of(eb768, x)
    ref = eb768.compress(x)
    ours = codec768.encode_batch(sym)
    assert len(ours) == len(ref)
    for b in range(batch):
        assert ours[b] == ref[b]
        assert codec768.encode(sym[b]) == ref[b]
        # CompressAI decodes our bytes (they are its bytes) and we decode them.
        np.testing.assert_array_equal(compressai_decode(eb768, ours[b], tokens), sym[b])
        np.testing.assert_array_equal(codec768.decode(ref[b], tokens), sym[b])
    np.testing.assert_array_equal(codec768.decode_batch(ref, tokens), sym)
    # Also through CompressAI's own decompress (dequantized floats).
    deq = eb768.decompress(ref, (tokens, 1))
    np.testing.assert_array_equal(
        deq.numpy(), (torch.from_numpy(sym)[..., None].float() + medians_of(eb768)).numpy()
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dist", ["normal", "wide"])
def test_matches_compressai_small(seed, dist):
    eb = make_bottleneck(5 + 7 * seed, seed=100 + seed)
    codec = FactorizedCodec(tables_of(eb))
    tokens = [1, 2, 17, 64, 100, 333][seed]
    x = latents(eb, 2, tokens, dist, seed)
    sym = symbols_of(eb, x)
    ref = eb.compress(x)
    assert codec.encode_batch(sym) == ref
    np.testing.assert_array_equal(codec.decode_batch(ref, tokens), sym)


def test_table_edges_and_escape_limits_match_compressai(eb_small, codec_small):
    """Symbols at and around every table edge, up to the largest escapable values."""
    tables = codec_small.tables
    off = tables.offset.astype(np.int64)[:, None]
    maxv = tables.cdf_length.astype(np.int64)[:, None] - 2
    deltas = [-1, 0, 1]
    cols = [off + d for d in deltas] + [off + maxv + d for d in (-2, -1, 0, 1, 2)]
    cols += [off - 8, off - 9, off + maxv + 7, off + maxv + 8, off - 2**20, off + maxv + 2**24]
    cols += [off - RAW_VALUE_SLACK, off + maxv + RAW_VALUE_SLACK]  # largest accepted
    sym = np.concatenate(cols, axis=1).astype(np.int32)
    rng = np.random.default_rng(7)
    sym = sym[:, rng.permutation(sym.shape[1])]
    ref = compressai_encode(eb_small, sym)
    assert codec_small.encode(sym) == ref
    np.testing.assert_array_equal(codec_small.decode(ref, sym.shape[1]), sym)
    np.testing.assert_array_equal(compressai_decode(eb_small, ref, sym.shape[1]), sym)


def test_low_level_api_matches_tables(eb_small, codec_small):
    t = codec_small.tables
    rng = np.random.default_rng(1)
    sym = rng.integers(-20, 20, size=(t.channels, 40), dtype=np.int32)
    idx = np.repeat(np.arange(t.channels, dtype=np.int32), 40)
    args = (t.quantized_cdf, t.cdf_length, t.offset, t.max_length, t.precision)
    data = _rans.encode(sym, idx, *args)
    assert data == compressai_encode(eb_small, sym)
    out = np.empty(sym.size, np.int32)
    assert _rans.decode(data, idx, *args, out) is None
    np.testing.assert_array_equal(out, sym.reshape(-1))
    # Arbitrary (non channel-major) index order.
    perm = rng.permutation(idx.size)
    data2 = _rans.encode(sym.reshape(-1)[perm], idx[perm], *args)
    ref2 = ans.RansEncoder().encode_with_indexes(
        sym.reshape(-1)[perm].tolist(),
        idx[perm].tolist(),
        eb_small._quantized_cdf.tolist(),
        eb_small._cdf_length.tolist(),
        eb_small._offset.tolist(),
    )
    assert data2 == ref2


# -- round trips and cost ----------------------------------------------------------------


def test_round_trip_random(codec_small):
    rng = np.random.default_rng(5)
    low, high = codec_small.codable_range()
    for tokens in (1, 3, 50):
        sym = rng.integers(-40, 40, size=(codec_small.channels, tokens)).astype(np.int32)
        sym[0, 0] = low[0]
        sym[-1, -1] = high[-1]
        np.testing.assert_array_equal(codec_small.decode(codec_small.encode(sym), tokens), sym)


def test_int64_input_is_accepted(codec_small):
    sym = np.arange(codec_small.channels * 4, dtype=np.int64).reshape(-1, 4) % 7 - 3
    assert codec_small.encode(sym) == codec_small.encode(sym.astype(np.int32))


def test_size_close_to_entropy_bound(eb768, codec768):
    x = latents(eb768, 1, 1025, "normal", 11)
    sym = symbols_of(eb768, x)[0]
    bound = codec768.entropy_bound_bits(sym)
    size_bits = 8 * len(codec768.encode(sym))
    assert bound - 64 <= size_bits <= bound * 1.005 + 64
    # Batch form sums the images.
    assert codec768.entropy_bound_bits(np.stack([sym, sym])) == pytest.approx(2 * bound)


def test_entropy_bound_counts_bypass(codec_small):
    t = codec_small.tables
    c = t.channels
    sym = np.repeat(t.offset[:, None], 2, axis=1).astype(np.int32)
    base = codec_small.entropy_bound_bits(sym)
    far = sym.copy()
    far[0, 0] = t.offset[0] - 1  # raw value 1: escape + count chunk + 1 raw chunk
    freq = np.diff(t.quantized_cdf[0].astype(np.float64))
    escape_bits = 16 - np.log2(freq[t.cdf_length[0] - 2])
    first_bits = 16 - np.log2(freq[0])
    expected = base - first_bits + escape_bits + 8
    assert codec_small.entropy_bound_bits(far) == pytest.approx(expected)
    assert c == sym.shape[0]


def _bound_reference(tables, sym: np.ndarray) -> float:
    """The entropy bound written out in numpy, value by value, as the docstring states it."""
    freq = np.diff(tables.quantized_cdf.astype(np.float64), axis=1)
    total = 0.0
    for c, row in enumerate(sym):
        mv = int(tables.cdf_length[c]) - 2
        for s in row:
            v = int(s) - int(tables.offset[c])
            if 0 <= v < mv:
                total += tables.precision - np.log2(freq[c, v])
                continue
            raw = -2 * v - 1 if v < 0 else 2 * (v - mv)
            chunks = sum((raw >> (4 * k)) != 0 for k in range(8))
            total += tables.precision - np.log2(freq[c, mv]) + 4 * (chunks + chunks // 15 + 1)
    return total


def test_entropy_bound_matches_reference_with_escapes(codec_small):
    t = codec_small.tables
    rng = np.random.default_rng(5)
    sym = t.offset[:, None] + rng.integers(-3, t.cdf_length[:, None] + 1, (t.channels, 40))
    # Escapes of every chunk count: raw values with 1 to 7 hex digits, either side.
    sym[0, :14] = [t.offset[0] - 16**k for k in range(7)] + [
        t.offset[0] + t.cdf_length[0] - 2 + 16**k for k in range(7)
    ]
    sym = sym.astype(np.int32)
    assert codec_small.entropy_bound_bits(sym) == pytest.approx(_bound_reference(t, sym), rel=1e-12)
    size_bits = 8 * len(codec_small.encode(sym))
    assert size_bits >= codec_small.entropy_bound_bits(sym) - 64


# -- invalid input -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [2**27, INT32_MIN, INT32_MAX, -(2**27)])
def test_out_of_range_symbols_rejected(codec768, bad):
    sym = np.zeros((768, 257), dtype=np.int32)
    sym[5, 17] = bad
    with pytest.raises(InvalidInput, match=rf"symbol {bad} at channel 5, token 17"):
        codec768.encode(sym)
    with pytest.raises(InvalidInput, match=r"image 1, channel 5, token 17"):
        codec768.encode_batch(np.stack([np.zeros_like(sym), sym]))
    with pytest.raises(InvalidInput, match="outside the codable range"):
        codec768.entropy_bound_bits(sym)


def test_range_limits_are_exact(codec_small):
    low, high = codec_small.codable_range()
    sym = np.zeros((codec_small.channels, 2), dtype=np.int32)
    sym[2, 1] = high[2] + 1
    with pytest.raises(InvalidInput, match="channel 2, token 1"):
        codec_small.encode(sym)
    sym[2, 1] = low[2] - 1
    with pytest.raises(InvalidInput, match="channel 2, token 1"):
        codec_small.encode(sym)
    sym64 = np.zeros((codec_small.channels, 2), dtype=np.int64)
    sym64[0, 0] = 2**40
    with pytest.raises(InvalidInput, match=f"symbol {2**40} at channel 0, token 0"):
        codec_small.encode(sym64)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (np.zeros((12, 4), np.float32), "integer dtype"),
        (np.zeros((12,), np.int32), r"shape \(C, T\)"),
        (np.zeros((11, 4), np.int32), "11 channels"),
        (np.zeros((12, 0), np.int32), "empty"),
        ([[0] * 4] * 12, "numpy array"),
    ],
)
def test_bad_symbol_arrays(codec_small, value, match):
    with pytest.raises(InvalidInput, match=match):
        codec_small.encode(value)


def test_bad_batch_and_tokens(codec_small):
    with pytest.raises(InvalidInput, match=r"\(B, C, T\)"):
        codec_small.encode_batch(np.zeros((12, 4), np.int32))
    with pytest.raises(InvalidInput, match="positive integer"):
        codec_small.decode(b"\0" * 8, 0)
    with pytest.raises(InvalidInput, match="sequence of bitstreams"):
        codec_small.decode_batch(b"\0" * 8, 3)


def test_low_level_rejects_bad_indexes_and_tables(codec_small):
    t = codec_small.tables
    native = _rans.Tables(t.quantized_cdf, t.cdf_length, t.offset, t.max_length, 16)
    sym = np.zeros(4, np.int32)
    for bad in (-1, t.channels):
        idx = np.array([0, 1, bad, 2], np.int32)
        with pytest.raises(ValueError, match=f"index {bad} at position 2"):
            native.encode(sym, idx)
        data = native.encode(sym, np.zeros(4, np.int32))
        with pytest.raises(ValueError, match=f"index {bad} at position 2"):
            native.decode(data, idx, np.empty(4, np.int32))
    with pytest.raises(TypeError, match="int32"):
        native.encode(sym.astype(np.int64), np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="symbols has 4 items but indexes has 3"):
        native.encode(sym, np.zeros(3, np.int32))
    cdf = np.array(t.quantized_cdf)
    cdf[0, 2] = cdf[0, 1]
    with pytest.raises(ValueError, match="not strictly increasing"):
        _rans.Tables(cdf, t.cdf_length, t.offset, t.max_length, 16)
    with pytest.raises(ValueError, match="ends at"):
        _rans.Tables(t.quantized_cdf, t.cdf_length, t.offset, t.max_length, 15)


# -- corrupt streams ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stream768(eb768, codec768):
    sym = symbols_of(eb768, latents(eb768, 1, 197, "wide", 21))[0]
    return sym, codec768.encode(sym)


def test_stream_is_exactly_consumed(codec768, stream768):
    sym, data = stream768
    for tokens in (196, 198):
        with pytest.raises(CorruptBitstream):
            codec768.decode(data, tokens)
    with pytest.raises(CorruptBitstream, match="unread"):
        codec768.decode(data + b"\0\0\0\0", 197)


@pytest.mark.parametrize(
    "cut",
    [
        lambda d: d[:-4],
        lambda d: d[4:],
        lambda d: d[: len(d) // 2 // 4 * 4],
        lambda d: d[:8],
        lambda d: d[:-1],
        lambda d: d + b"\0",
        lambda d: d[:7],
        lambda d: b"",
    ],
)
def test_truncated_or_misaligned(codec768, stream768, cut):
    _, data = stream768
    with pytest.raises(CorruptBitstream):
        codec768.decode(cut(data), 197)


def test_flipped_bytes_never_crash(codec768, stream768):
    sym, data = stream768
    rng = np.random.default_rng(3)
    positions = list(range(0, 12)) + list(rng.integers(0, len(data), 40)) + [len(data) - 1]
    for pos in positions:
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[pos] ^= mask
            try:
                out = codec768.decode(bytes(bad), 197)
            except CorruptBitstream:
                continue
            assert not np.array_equal(out, sym)


def test_random_garbage_never_crashes(codec_small):
    rng = np.random.default_rng(9)
    for n_words in (2, 3, 10, 100, 1000):
        for fill in ("random", "ones", "zeros"):
            if fill == "random":
                data = rng.integers(0, 256, 4 * n_words, dtype=np.uint8).tobytes()
            else:
                data = (b"\xff" if fill == "ones" else b"\0") * (4 * n_words)
            try:
                codec_small.decode(data, 64)
            except CorruptBitstream:
                pass


def test_bytes_like_inputs(codec_small):
    sym = np.ones((codec_small.channels, 5), np.int32)
    data = codec_small.encode(sym)
    for wrapped in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        np.testing.assert_array_equal(codec_small.decode(wrapped, 5), sym)
    with pytest.raises(InvalidInput, match="bytes-like"):
        codec_small.decode("not bytes", 5)
    with pytest.raises(InvalidInput, match="contiguous"):
        codec_small.decode(memoryview(data + data)[::2], 5)


def _random_tables(rng, precision: int, channels: int, longest: int) -> EntropyTables:
    """Valid tables of random CDFs at ``precision`` bits, offsets -3, medians 0."""
    top = 1 << precision
    max_length = min(top + 1, longest)
    lengths = rng.integers(3, max_length + 1, size=channels).astype(np.int32)
    cdf = np.zeros((channels, max_length), np.int32)
    for c, n in enumerate(lengths):
        cdf[c, 1 : n - 1] = np.sort(rng.choice(np.arange(1, top), size=n - 2, replace=False))
        cdf[c, n - 1] = top
    return EntropyTables(cdf, lengths, np.full(channels, -3), np.zeros(channels), precision)


@pytest.mark.parametrize("precision", [1, 3, 8, 12, 15])
def test_other_precisions_round_trip(precision):
    """Precisions other than CompressAI's 16 bits (not comparable with CompressAI)."""
    rng = np.random.default_rng(precision)
    channels = 4
    codec = FactorizedCodec(_random_tables(rng, precision, channels, 20))
    sym = rng.integers(-30, 30, size=(channels, 300)).astype(np.int32)
    np.testing.assert_array_equal(codec.decode(codec.encode(sym), 300), sym)
    bound = codec.entropy_bound_bits(sym)
    assert bound - 64 <= 8 * len(codec.encode(sym)) <= bound * 1.005 + 64


def test_threads_share_one_codec(codec768):
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(4)
    images = rng.integers(-3, 4, size=(8, 768, 33)).astype(np.int32)
    expected = codec768.encode_batch(images)
    with ThreadPoolExecutor(4) as pool:
        streams = list(pool.map(codec768.encode, images))
        decoded = list(pool.map(lambda d: codec768.decode(d, 33), streams))
    assert streams == expected
    np.testing.assert_array_equal(np.stack(decoded), images)


# -- batches: one C call per batch (encode_tiles / decode_tiles) -------------------------


def _one_by_one(codec: FactorizedCodec, streams: list, tokens: int) -> str | None:
    """The error a stream-by-stream decode raises for ``streams``, as the batch names it."""
    for i, data in enumerate(streams):
        try:
            codec.decode(data, tokens)
        except (CorruptBitstream, InvalidInput) as err:
            return f"stream {i}: {err}"
    return None


@pytest.mark.parametrize("batch", [1, 2, 3, 5])
@pytest.mark.parametrize("dist", ["normal", "wide"])
def test_batch_matches_compressai_and_single_calls(eb768, codec768, batch, dist):
    """Odd batches too: tiles are coded two at a time, the last one alone."""
    x = latents(eb768, batch, 197, dist, 40 + batch)
    sym = symbols_of(eb768, x)
    latent = x[..., 0].numpy()
    streams, bits, sq_err = codec768.code_batch(sym, latent)
    assert streams == [codec768.encode(s) for s in sym] == codec768.encode_batch(sym)
    if dist == "normal":
        assert streams == eb768.compress(x)
    assert bits == pytest.approx(codec768.entropy_bound_bits(sym), rel=1e-12)
    assert sq_err == pytest.approx(codec768.rounding_sq_err(sym, latent), rel=1e-5)
    out = np.full((batch + 2, 768, 197), 7, np.int32)
    got = codec768.decode_batch(streams, 197, out=out[1 : batch + 1])
    np.testing.assert_array_equal(got, sym)
    assert (out[0] == 7).all() and (out[-1] == 7).all()


@pytest.mark.parametrize("precision", [1, 8, 16])
def test_batch_round_trip_other_precisions(precision):
    rng = np.random.default_rng(precision)
    channels = 5
    codec = FactorizedCodec(_random_tables(rng, precision, channels, 24))
    sym = rng.integers(-40, 40, size=(4, channels, 77)).astype(np.int32)
    streams = codec.encode_batch(sym)
    assert streams == [codec.encode(s) for s in sym]
    np.testing.assert_array_equal(codec.decode_batch(streams, 77), sym)


@pytest.mark.parametrize("bad_tile", [0, 1, 2])
def test_batch_refuses_uncodable_symbol_naming_its_image(codec768, bad_tile):
    sym = np.zeros((3, 768, 9), np.int32)
    sym[bad_tile, 5, 4] = 2**30
    for call in (codec768.encode_batch, lambda s: codec768.code_batch(s, s.astype(np.float32))):
        with pytest.raises(InvalidInput, match=f"image {bad_tile}, channel 5, token 4"):
            call(sym)


def test_code_batch_checks_latent_shape(codec_small):
    sym = np.zeros((2, codec_small.channels, 4), np.int32)
    with pytest.raises(InvalidInput, match="latent"):
        codec_small.code_batch(sym, np.zeros((2, codec_small.channels, 5), np.float32))


@pytest.mark.parametrize(
    "damage",
    [
        {3: lambda d: d[:-4]},  # the last, decoded alone
        {2: lambda d: d[:-4]},  # the first of a pair
        {1: lambda d: d[4:]},  # the second of a pair
        {1: lambda d: d[:6], 2: lambda d: "text"},  # both of a pair: the first is named
        {0: lambda d: d + b"\0\0\0\0", 3: lambda d: b""},
        {2: lambda d: 12345},  # not bytes-like, after two good streams
        {1: lambda d: memoryview(d + d)[::2]},  # not contiguous
        {0: lambda d: d[:-1]},  # misaligned
    ],
)
def test_batch_decode_names_the_first_bad_stream(codec768, stream768, damage):
    """The batched decode raises what decoding stream by stream raises, for the same stream."""
    sym, data = stream768
    streams = [damage.get(i, lambda d: d)(data) for i in range(4)]
    expected = _one_by_one(codec768, streams, 197)
    with pytest.raises((CorruptBitstream, InvalidInput)) as info:
        codec768.decode_batch(streams, 197)
    assert f"{info.value}" == expected
    assert isinstance(info.value, InvalidInput if "bytes-like" in expected else CorruptBitstream)


def test_batch_decode_of_flipped_bytes_never_crashes(codec768, stream768):
    sym, data = stream768
    rng = np.random.default_rng(5)
    for pos in list(range(8)) + list(rng.integers(0, len(data), 30)):
        bad = bytearray(data)
        bad[pos] ^= 0x5A
        streams = [data, bytes(bad), data] if pos % 2 else [bytes(bad), data, data]
        try:
            out = codec768.decode_batch(streams, 197)
        except CorruptBitstream as err:
            assert str(err) == _one_by_one(codec768, streams, 197)
            continue
        assert not np.array_equal(out, np.stack([sym] * 3))


def test_batch_decode_checks_its_output(codec_small):
    sym = np.ones((2, codec_small.channels, 5), np.int32)
    streams = codec_small.encode_batch(sym)
    assert codec_small.decode_batch([], 5).shape == (0, codec_small.channels, 5)
    for out in (
        np.empty((2, codec_small.channels, 6), np.int32),
        np.empty((2, codec_small.channels, 5), np.int64),
        np.empty((2, 5, codec_small.channels), np.int32).transpose(0, 2, 1),
        "out",
    ):
        with pytest.raises(InvalidInput, match="out must be"):
            codec_small.decode_batch(streams, 5, out=out)
    frozen = np.empty((2, codec_small.channels, 5), np.int32)
    frozen.setflags(write=False)
    with pytest.raises(InvalidInput, match="out must be"):
        codec_small.decode_batch(streams, 5, out=frozen)


def test_low_level_batch_entry_points_check_their_arguments(codec_small):
    native, c = codec_small._native, codec_small.channels
    sym = np.zeros((3, c, 4), np.int32)
    for rows, tokens in ((0, 4), (c + 1, 4), (c, 0), (c, 5), (c, 8)):
        with pytest.raises(ValueError):
            native.encode_tiles(sym, rows, tokens)
    with pytest.raises(TypeError):
        native.encode_tiles(sym.astype(np.int64), c, 4)
    with pytest.raises(ValueError, match="together"):
        native.encode_tiles(sym, c, 4, np.zeros(sym.shape, np.float32))
    with pytest.raises(TypeError, match="float32"):
        native.encode_tiles(sym, c, 4, np.zeros(sym.shape), np.zeros(c, np.float32))
    with pytest.raises(ValueError, match="latent"):
        native.encode_tiles(sym, c, 4, np.zeros(5, np.float32), np.zeros(c, np.float32))
    streams, bits, sq_err = native.encode_tiles(sym, c, 4)
    assert len(streams) == 3 and bits > 0 and sq_err == 0.0
    # Fewer rows than channels: the first rows' tables, as with explicit indexes.
    part, _, _ = native.encode_tiles(np.ascontiguousarray(sym[:, :2]), 2, 4)
    assert part[0] == native.encode(sym[0, :2], np.repeat(np.arange(2, dtype=np.int32), 4))
    out = np.empty((3, c, 4), np.int32)
    with pytest.raises(ValueError, match="streams"):
        native.decode_tiles(streams[:2], c, 4, out)
    with pytest.raises(ValueError):
        native.decode_tiles(streams, c + 1, 4, out)
    with pytest.raises(TypeError):
        native.decode_tiles(streams, c, 4, out.astype(np.int64))
    with pytest.raises(TypeError):
        native.decode_tiles(42, c, 4, out)
    native.decode_tiles(streams, c, 4, out)
    np.testing.assert_array_equal(out, sym)
