"""Compress imagery to containers and back, with any inference engine.

The steps are pure functions over arrays plus thin loops: :func:`compress` reads images,
tiles and normalises them, asks an engine (:mod:`nec_serve.engines`) for symbols in
batches, entropy-codes each tile on the CPU and streams tile records into a container;
:func:`decompress` does the reverse in memory, and :func:`write_embeddings` into a
memory-mapped ``.npy`` with memory bounded by a batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from nec_serve import __version__
from nec_serve.bundle import ModelBundle
from nec_serve.container import (
    ContainerHeader,
    ContainerReader,
    ContainerWriter,
    TilePlace,
    TileRecord,
)
from nec_serve.contract import (
    UNNAMED_FAMILY,
    GraphRole,
    decode_outputs,
    model_families,
    rate_knobs,
)
from nec_serve.engines import Engine
from nec_serve.errors import InvalidInput
from nec_serve.imagery import InputLimits, Normalisation, tile_image
from nec_serve.imagery.limits import Budget, human_bytes
from nec_serve.imagery.writers import GeoTiffWriter
from nec_serve.reports import (
    ArrayReport,
    BandsReport,
    CompressReport,
    CompressSeconds,
    DecodeSeconds,
    Rate,
    StageTimer,
)

__all__ = [
    "coding_levels",
    "default_output",
    "write_bands",
    "class_report",
    "tile_index",
    "CompressStats",
    "compress",
    "decompress",
    "check_decoded_size",
    "admit_record",
    "iter_decoded",
    "write_embeddings",
    "OutputWriter",
    "register_output_writer",
    "output_writer",
]


def default_output(bundle: ModelBundle) -> str:
    """What decompressing with ``bundle`` gives by default (its family says)."""
    return bundle.manifest.family_spec.default_output


def tile_index(records: Iterable[TileRecord]) -> list[dict]:
    """Where each decoded row came from: tile index, source name, pixel origin."""
    return [{"tile": r.index, "source": r.source, "row": r.row, "col": r.col} for r in records]


def class_report(index: list[dict], scores: np.ndarray, class_names: Sequence[str]) -> dict:
    """Per-tile labels from classifier scores ``(tiles, classes)``, beside the tile index.

    Returns ``{"class_names", "tiles": [{tile, source, row, col, class, score, scores}]}``
    where ``class`` is the best-scoring name and ``scores`` maps every name to its score.
    """
    names = list(class_names)
    if scores.ndim != 2 or scores.shape[1] != len(names) or len(index) != len(scores):
        raise InvalidInput(
            f"classifier scores {scores.shape} do not fit {len(index)} tiles x {len(names)} classes"
        )
    tiles = []
    for where, row in zip(index, scores, strict=True):
        best = int(np.argmax(row))
        tiles.append(
            {
                **where,
                "class": names[best],
                "score": round(float(row[best]), 6),
                "scores": {n: round(float(v), 6) for n, v in zip(names, row, strict=True)},
            }
        )
    return {"class_names": names, "tiles": tiles}


@dataclass
class CompressStats:
    """What one compression did so far, accumulated as it runs; :meth:`report` freezes it."""

    images: int = 0
    tiles: int = 0
    source_pixels: int = 0
    raw_bytes: int = 0
    container_bytes: int = 0
    payload_bytes: int = 0
    symbols: int = 0
    entropy_bound_bits: float = 0.0
    quant_sq_err: float = 0.0
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("read", "preprocess", "inference", "coding"), 0.0)
    )
    #: The value of the family's rate knob coded at (None: a family with a fixed rate).
    rate: int | None = None

    @property
    def bits_per_pixel(self) -> float:
        """Container bits per source pixel (all bands of a pixel together)."""
        return 8 * self.container_bytes / max(self.source_pixels, 1)

    @property
    def ratio(self) -> float:
        """Raw source bytes over container bytes."""
        return self.raw_bytes / max(self.container_bytes, 1)

    @property
    def embedding_rmse(self) -> float:
        """RMS difference between the continuous latent and the decoded embedding."""
        return float(np.sqrt(self.quant_sq_err / max(self.symbols, 1)))

    @property
    def overhead_vs_bound(self) -> float:
        """Payload bytes over the entropy bound of the coded symbols, minus one."""
        return 8 * self.payload_bytes / max(self.entropy_bound_bits, 1.0) - 1.0

    def report(self) -> CompressReport:
        """The frozen report of what was done, rounded as published."""
        return CompressReport(
            images=self.images,
            tiles=self.tiles,
            raw_bytes=self.raw_bytes,
            container_bytes=self.container_bytes,
            bits_per_pixel=round(self.bits_per_pixel, 4),
            compression_ratio=round(self.ratio, 2),
            payload_over_entropy_bound_pct=round(100 * self.overhead_vs_bound, 3),
            embedding_rmse=round(self.embedding_rmse, 5),
            seconds=CompressSeconds(**{k: round(v, 3) for k, v in self.seconds.items()}),
        )


class _Counter:
    """Counts bytes written through to a file object."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.n = 0

    def write(self, data: bytes) -> int:
        self.n += len(data)
        return self.f.write(data)


def _normalisation_for(name: str, raw: np.ndarray, bundle: ModelBundle) -> Normalisation:
    if raw.shape[0] != bundle.in_chans:
        raise InvalidInput(
            f"image {name!r} has {raw.shape[0]} bands, model {bundle.manifest.model!r} takes "
            f"{bundle.in_chans}: choose bands, e.g. --bands 1,2,3 for RGB"
        )
    return bundle.normalisation(raw.dtype)


def compress(
    inputs: Iterable[tuple[str, np.ndarray]],
    bundle: ModelBundle,
    engine: Engine,
    out: IO[bytes],
    *,
    bands: list[int] | None = None,
    batch_size: int = 8,
    progress: bool = False,
    rate: int | None = None,
) -> CompressStats:
    """Compress ``(name, (bands, H, W))`` images into one container written to ``out``.

    Tiles are batched up to ``batch_size`` for the engine and written as soon as they are
    coded, so memory is bounded by one image plus one batch. All images must share a
    pixel dtype (the container records one normalisation).

    ``rate`` is the value of the family's rate knob (:attr:`ModelFamily.rate`, e.g. the
    codebook levels to code; default: the most the export has); the container records it.
    Families with a fixed rate refuse it. Containers of a georeferenced family also record
    each georeferenced source's CRS and transform, so that decoding writes GeoTIFFs that
    lie where the input did.
    """
    if batch_size < 1:
        raise InvalidInput(f"invalid batch size {batch_size}, expected >= 1")
    levels = coding_levels(bundle, rate)
    stats = CompressStats(rate=levels)
    sink = _Counter(out)
    batch = _Batch(bundle, engine, levels, stats, _progress(progress, "compress", "tile"))
    writer: ContainerWriter | None = None
    t_read = time.perf_counter()
    for name, raw in inputs:
        stats.seconds["read"] += time.perf_counter() - t_read
        norm = _admit(name, raw, bundle, batch.norm)
        if writer is None:
            batch.norm = norm
            writer = ContainerWriter(sink, _header(bundle, norm, raw.dtype, bands, levels))
        stats.images += 1
        stats.source_pixels += raw.shape[1] * raw.shape[2]
        stats.raw_bytes += raw.nbytes
        geo = getattr(raw, "geo", None)  # a georeferenced reader's GeoArray
        if bundle.manifest.family_spec.georeferenced and geo is not None:
            writer.write_source(name, geo)
        image_tiles, grid = tile_image(raw, bundle.img_size)
        for tile, (row, col) in zip(image_tiles, grid.origins(), strict=True):
            batch.add(tile, TilePlace(name, row, col, grid.height, grid.width))
            if len(batch.tiles) == batch_size:
                batch.flush(writer)
        t_read = time.perf_counter()
    if writer is None:
        raise InvalidInput("no images to compress")
    if batch.tiles:
        batch.flush(writer)
    writer.close()
    batch.bar.close()
    stats.container_bytes = sink.n
    return stats


class _Batch:
    """Tiles waiting for the engine, and where each came from; coded a batch at a time."""

    def __init__(self, bundle: ModelBundle, engine: Engine, levels, stats: CompressStats, bar):
        self.bundle, self.engine, self.levels = bundle, engine, levels
        self.stats, self.bar = stats, bar
        self.norm: Normalisation | None = None  # the container's, set with its header
        self.tiles: list[np.ndarray] = []
        self.pending: list[TilePlace] = []

    def add(self, tile: np.ndarray, where: TilePlace) -> None:
        self.tiles.append(tile)
        self.pending.append(where)

    def flush(self, writer: ContainerWriter) -> None:
        """Normalise, encode, entropy-code and write the waiting tiles; count it all."""
        stats, codec, levels = self.stats, self.bundle.codec, self.levels
        t0 = time.perf_counter()
        batch = self.norm.apply(np.stack(self.tiles)).astype(np.float32, copy=False)
        t1 = time.perf_counter()
        symbols, latent = self.engine.encode(batch)
        t2 = time.perf_counter()
        _check_engine_output(symbols, len(self.tiles), self.bundle)
        # One coder call: the streams, and the report figures counted in the same pass.
        if self.bundle.manifest.family_spec.shared_streams:
            joined = latent
            if latent.shape == symbols.shape:
                joined = join_tiles(latent)
            streams, bound_bits, sq_err = codec.code_batch(join_tiles(symbols), joined, levels)
            writer.write_stream(streams[0], self.pending)
        else:
            streams, bound_bits, sq_err = codec.code_batch(symbols, latent, levels)
            for place, payload in zip(self.pending, streams, strict=True):
                writer.write_stream(payload, [place])
        stats.payload_bytes += sum(map(len, streams))
        stats.entropy_bound_bits += bound_bits
        stats.quant_sq_err += sq_err
        t3 = time.perf_counter()
        stats.seconds["preprocess"] += t1 - t0
        stats.seconds["inference"] += t2 - t1
        stats.seconds["coding"] += t3 - t2
        stats.tiles += len(self.tiles)
        stats.symbols += symbols[:, :levels].size
        self.bar.update(len(self.tiles))
        self.tiles.clear()
        self.pending.clear()


def coding_levels(bundle: ModelBundle, rate: int | None) -> int | None:
    """The rate to code at: None for families with a fixed rate, else 1..levels.

    Raises:
        InvalidInput: ``rate`` given to a family without a rate knob, or out of range.
    """
    if bundle.manifest.family_spec.rate is None:
        if rate is not None:
            with_rate = "/".join(f.name.upper() for f in model_families() if f.rate)
            raise InvalidInput(
                f"a rate ({'/'.join(rate_knobs())}) applies to the {with_rate} family; "
                f"{bundle.manifest.model!r} is a {bundle.family!r} model"
            )
        return None
    return bundle.codec.check_levels(bundle.codec.levels if rate is None else rate)


def _admit(
    name: str,
    raw: np.ndarray,
    bundle: ModelBundle,
    norm: Normalisation | None,
) -> Normalisation:
    """The normalisation of one more image, refusing what the container cannot hold."""
    this_norm = _normalisation_for(name, raw, bundle)
    bundle.manifest.family_params.admit(name, raw)
    if norm is not None and this_norm != norm:
        raise InvalidInput(
            f"image {name!r} has dtype {raw.dtype}, unlike the images before it: "
            "compress images of one dtype per container"
        )
    return this_norm


def _header(
    bundle: ModelBundle,
    norm: Normalisation,
    dtype: np.dtype,
    bands: list[int] | None,
    levels: int | None = None,
) -> ContainerHeader:
    m = bundle.manifest
    rate = {} if levels is None else {m.family_spec.rate: levels}
    return ContainerHeader(
        code_sha256=bundle.code_sha256,
        meta={
            **rate,
            "family": m.family,
            "model": m.model,
            "model_version": m.model_version,
            "channels": bundle.channels,
            "tokens": bundle.tokens,
            "img_size": bundle.img_size,
            "bands": list(bands) if bands else list(range(1, bundle.in_chans + 1)),
            "normalisation": norm.to_dict(),
            "source_dtype": np.dtype(dtype).name,
            "created_by": f"nec-serve {__version__}",
        },
    )


def _check_engine_output(symbols: np.ndarray, n: int, bundle: ModelBundle) -> None:
    expected = (n, bundle.channels, bundle.tokens)
    if symbols.shape != expected or symbols.dtype != np.int32:
        raise InvalidInput(
            f"encoder returned symbols {symbols.dtype}{symbols.shape}, expected int32{expected}: "
            "the served model does not match the export"
        )


def check_compatible(header: ContainerHeader, bundle: ModelBundle) -> None:
    """Refuse a container made by another model family or code (formats 1-2: model, tables)."""
    meta = header.meta
    family = meta.get("family", UNNAMED_FAMILY)
    if family != bundle.family:
        raise InvalidInput(
            f"container holds a {family!r}-family code (model {meta.get('model')!r}), the "
            f"export at {bundle.root} is a {bundle.family!r} model: decode it with a "
            f"{family!r} export"
        )
    if not header.names_code and meta.get("model") != bundle.manifest.model:
        # Formats 1-2 name only the tables; format 3's fingerprint lets any export of the
        # same code decode (a classifier export reads the plain export's containers).
        raise InvalidInput(
            f"container was made by model {meta.get('model')!r}, the export is "
            f"{bundle.manifest.model!r}"
        )
    header.check_code(bundle.code_sha256, bundle.tables.sha256)
    # ContainerHeader has checked that both are integers in range.
    if (meta["channels"], meta["tokens"]) != (bundle.channels, bundle.tokens):
        raise InvalidInput(
            f"container holds {meta['channels']}x{meta['tokens']} symbols per tile, the export "
            f"codes {bundle.channels}x{bundle.tokens}"
        )
    rate = bundle.manifest.family_spec.rate
    if rate is not None:
        if meta.get(rate) is None:
            raise InvalidInput(
                f"container of the {bundle.family.upper()} family does not say how many {rate}"
            )
        bundle.codec.check_levels(meta[rate])
    else:
        for name in rate_knobs():
            if meta.get(name) is not None:
                raise InvalidInput(f"container codes {meta[name]} {name}, the export has none")


def iter_decoded(
    reader: ContainerReader,
    bundle: ModelBundle,
    engine: Engine | None,
    output: str = "embeddings",
    batch_size: int = 8,
    *,
    limits: InputLimits | None = None,
) -> Iterator[tuple[list[TileRecord], np.ndarray]]:
    """Yield ``(tile records, decoded batch)`` from a container, batch by batch.

    Every tile record's declared geometry is admitted (:func:`admit_record`) before it
    joins a batch.
    """
    return _iter_decoded(reader.header, reader, bundle, engine, output, batch_size, limits=limits)


def admit_record(record: TileRecord, limits: InputLimits, label: str) -> None:
    """Check the geometry a tile record declares, as an input's is checked, before any use.

    Its source image must be a size an input may be (``limits.max_pixels``) and the tile's
    origin must lie inside it; a container that declares more is refused, naming the
    tile, before anything is allocated for it.

    Raises:
        InvalidInput: naming ``label``, the tile and what it declares.
    """
    h, w, r, c = record.source_height, record.source_width, record.row, record.col
    what = f"{label}: tile {record.index} (source {record.source!r})"
    if h < 1 or w < 1 or h * w > limits.max_pixels:
        raise InvalidInput(
            f"{what} declares a {h}x{w} source image ({h * w} pixels); a source must hold "
            f"1..max_pixels={limits.max_pixels} pixels"
        )
    if not (0 <= r < h and 0 <= c < w):
        raise InvalidInput(f"{what} lies at row {r}, column {c}, outside its {h}x{w} source")


def _iter_decoded(
    header: ContainerHeader,
    records_in: Iterable[TileRecord],
    bundle: ModelBundle,
    engine: Engine | None,
    output: str,
    batch_size: int,
    timer: StageTimer | None = None,
    *,
    limits: InputLimits | None = None,
    label: str = "container",
    into: Callable[[int], np.ndarray] | None = None,
) -> Iterator[tuple[list[TileRecord], np.ndarray]]:
    """As :func:`iter_decoded`; times its stages with ``timer`` when given.

    Stage ``coding`` is entropy decoding, ``inference`` the graph. When the output is the
    symbols, ``into(n)`` (if given) is where the next ``n`` tiles' symbols are decoded to,
    a writable int32 ``(n, channels, tokens)`` array, which is then what is yielded.
    """
    limits = InputLimits() if limits is None else limits
    outputs = decode_outputs()
    if output not in outputs:
        raise InvalidInput(f"unknown output {output!r}, expected one of {sorted(outputs)}")
    check_compatible(header, bundle)
    role = outputs[output]
    if role is not None and role not in bundle.manifest.graphs:
        raise InvalidInput(
            f"output {output!r} needs the {role} graph, and the export at {bundle.root} has "
            f"none (it has {', '.join(str(r) for r in bundle.manifest.graphs)})"
        )
    records: list[TileRecord] = []

    rate = bundle.manifest.family_spec.rate
    streams = _Streams(bundle, header.meta.get(rate) if rate else None)

    def run() -> np.ndarray:
        t0 = time.perf_counter()
        target = into(len(records)) if into is not None and role is None else None
        symbols = streams.decode(records, out=target)
        t1 = time.perf_counter()
        out = symbols if role is None else engine.decode(role, symbols)
        if timer is not None:
            timer.add("coding", t1 - t0)
            timer.add("inference", time.perf_counter() - t1)
        return out

    for record in records_in:
        admit_record(record, limits, label)
        records.append(record)
        if len(records) == batch_size:
            yield list(records), run()
            records.clear()
    if records:
        yield list(records), run()


def join_tiles(symbols: np.ndarray) -> np.ndarray:
    """``(n, rows, tokens)`` symbols as one tile ``(1, rows, n * tokens)``, row by row.

    How a family with :attr:`ModelFamily.shared_streams` codes a batch as one stream: row
    ``r`` of the joined tile is row ``r`` of every tile in turn, so each row keeps its
    table. :func:`split_tiles` undoes it.
    """
    n, rows, tokens = symbols.shape
    return np.ascontiguousarray(symbols.transpose(1, 0, 2)).reshape(1, rows, n * tokens)


def split_tiles(joined: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` tiles ``(n, rows, tokens)`` of one joined tile ``(rows, n * tokens)``."""
    rows, length = joined.shape
    return joined.reshape(rows, n, length // n).transpose(1, 0, 2)


class _Streams:
    """Entropy-decodes tile records, a stream shared by several tiles once."""

    def __init__(self, bundle: ModelBundle, levels: int | None):
        self.codec, self.tokens, self.levels = bundle.codec, bundle.tokens, levels
        self._last: tuple[bytes, np.ndarray] | None = None  # the last shared stream, decoded

    def decode(self, records: list[TileRecord], out: np.ndarray | None = None) -> np.ndarray:
        """The symbols of ``records``, ``(len(records), rows, tokens)`` (into ``out``)."""
        if all(r.parts == 1 for r in records):
            payloads = [r.payload for r in records]
            return self.codec.decode_batch(payloads, self.tokens, self.levels, out=out)
        tiles = np.stack([self._tile(r) for r in records])
        if out is None:
            return tiles
        out[...] = tiles
        return out

    def _tile(self, record: TileRecord) -> np.ndarray:
        if record.parts == 1:
            return self.codec.decode_batch([record.payload], self.tokens, self.levels)[0]
        if self._last is None or self._last[0] is not record.payload:
            joined = self.codec.decode_batch(
                [record.payload], self.tokens * record.parts, self.levels
            )[0]
            self._last = (record.payload, split_tiles(joined, record.parts))
        return self._last[1][record.part]


def check_decoded_size(
    count: int, tile_shape: tuple[int, ...], dtype: Any, limits: InputLimits, label: str
) -> None:
    """Refuse to decode ``count`` tiles of ``tile_shape``/``dtype`` beyond ``limits``.

    Pure: call it before allocating an output for a whole container (the wrapper's
    memory-mapped ``.npy``), with the tile count and the shape of one decoded tile.

    Args:
        count: tiles to decode.
        tile_shape: shape of one decoded tile, e.g. ``(tokens, channels)``.
        dtype: dtype of the decoded output.
        limits: the limits; ``max_tiles`` and ``max_decoded_bytes`` apply.
        label: what to call the container in the error.

    Raises:
        InvalidInput: naming ``label`` and ``max_tiles`` or ``max_decoded_bytes``, or for
            arguments of the wrong type.
    """
    if not isinstance(limits, InputLimits):
        raise InvalidInput(f"limits must be an InputLimits, got {type(limits).__name__}")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise InvalidInput(f"{label}: tile count must be an integer >= 0, got {count!r}")
    shape = tuple(tile_shape)
    if not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        raise InvalidInput(f"{label}: tile shape must hold integers >= 0, got {tile_shape!r}")
    dt = np.dtype(dtype)
    if count > limits.max_tiles:
        raise InvalidInput(f"{label}: holds {count} tiles, over max_tiles={limits.max_tiles}")
    nbytes = int(count) * math.prod(int(d) for d in shape) * dt.itemsize
    if nbytes > limits.max_decoded_bytes:
        raise InvalidInput(
            f"{label}: {count} tiles of {dt.name}{shape} decode to {human_bytes(nbytes)} "
            f"({nbytes} bytes), over max_decoded_bytes={limits.max_decoded_bytes}"
        )


def decompress(
    fileobj: IO[bytes],
    bundle: ModelBundle,
    engine: Engine | None,
    output: str = "embeddings",
    batch_size: int = 8,
    progress: bool = False,
    *,
    limits: InputLimits | None = None,
    label: str | None = None,
) -> tuple[ContainerHeader, list[TileRecord], np.ndarray]:
    """Decode a whole container into one array ``(tiles, ...)`` plus its tile records.

    The output is held in memory, so the container may hold at most ``limits.max_tiles``
    tiles decoding to at most ``limits.max_decoded_bytes``; both are checked as tiles are
    read, before a batch over the limit is decoded (the size of a decoded tile is known
    from the first batch). ``label`` names the container in errors (default: the file
    object's name).
    """
    limits = InputLimits() if limits is None else limits
    if not isinstance(limits, InputLimits):
        raise InvalidInput(f"limits must be an InputLimits, got {type(limits).__name__}")
    if label is None:
        name = getattr(fileobj, "name", None)
        label = name if isinstance(name, str) else "container"
    reader = ContainerReader(fileobj)
    bar = _progress(progress, "decompress", "tile")
    records: list[TileRecord] = []
    rows = _Rows(limits.max_decoded_bytes)
    tile: list[tuple[tuple[int, ...], np.dtype]] = []  # one decoded tile's shape, dtype

    def admitted() -> Iterator[TileRecord]:
        for n, record in enumerate(reader, 1):
            if n > limits.max_tiles:
                raise InvalidInput(f"{label}: holds more than max_tiles={limits.max_tiles} tiles")
            if tile:
                check_decoded_size(n, *tile[0], limits, label)
            yield record

    symbols = (bundle.codec.channels, bundle.tokens)  # symbols decode straight into rows
    for batch_records, arr in _iter_decoded(
        reader.header,
        admitted(),
        bundle,
        engine,
        output,
        batch_size,
        limits=limits,
        label=label,
        into=lambda n: rows.take(n, symbols, np.dtype(np.int32)),
    ):
        if not tile:
            tile.append((tuple(arr.shape[1:]), arr.dtype))
        check_decoded_size(len(records) + len(batch_records), *tile[0], limits, label)
        records.extend(batch_records)
        rows.add(arr)
        bar.update(len(batch_records))
        del arr  # no view of the rows while they grow: they can then grow in place
    bar.close()
    if not rows.count:
        raise InvalidInput("container holds no tiles")
    return reader.header, records, rows.result()


class _Rows:
    """One ``(n, ...)`` array filled batch by batch, in place of a list and a concatenation.

    It grows by doubling with ``ndarray.resize`` (``realloc``, which moves the pages of a
    large array rather than copying them), so a decoded container is written once and
    memory peaks at its size, not twice it; if a view of it is alive, it grows by copying.
    Doubling stops at ``most_bytes`` (the decode limit, checked by the caller).
    """

    def __init__(self, most_bytes: int) -> None:
        self.array: np.ndarray | None = None
        self.count = 0
        self.most_bytes = most_bytes

    def take(self, n: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The next ``n`` rows of ``shape``/``dtype``, counted as filled."""
        if self.array is None:
            self.array = np.empty((n, *shape), dtype)
        elif self.array.shape[1:] != shape or self.array.dtype != dtype:
            raise InvalidInput(f"decoded tiles change from {self.array.shape[1:]} to {shape}")
        if self.count + n > len(self.array):
            most = self.most_bytes // max(1, self.array[0].nbytes)
            self._resize(max(self.count + n, min(2 * len(self.array), most)))
        self.count += n
        return self.array[self.count - n : self.count]

    def add(self, batch: np.ndarray) -> None:
        """Append ``batch``, unless it is the rows :meth:`take` gave (then it is there)."""
        if self.array is None or batch.base is not self.array:
            self.take(len(batch), tuple(batch.shape[1:]), batch.dtype)[...] = batch

    def result(self) -> np.ndarray:
        """The filled rows, as one array."""
        assert self.array is not None
        self._resize(self.count)
        return self.array

    def _resize(self, length: int) -> None:
        assert self.array is not None
        if length == len(self.array):
            return
        try:
            self.array.resize((length, *self.array.shape[1:]), refcheck=True)
        except ValueError:  # referenced elsewhere: grow (or shrink) by copying
            grown = np.empty((length, *self.array.shape[1:]), self.array.dtype)
            keep = min(length, self.count)
            grown[:keep] = self.array[:keep]
            self.array = grown


def write_embeddings(
    container: Path,
    dest: Path,
    bundle: ModelBundle,
    engine: Engine | None,
    output: str = "embeddings",
    *,
    batch_size: int = 8,
    limits: InputLimits | None = None,
    label: str | None = None,
    progress: bool = False,
) -> ArrayReport:
    """Decode the container file ``container`` into ``dest`` (``.npy``) and its tile index.

    Two passes over the file: the first counts the tiles (every CRC checked, at most
    ``limits.max_tiles``), the second decodes batch by batch straight into a memory-mapped
    ``.npy``, whose size is checked against ``limits.max_decoded_bytes`` before it is
    allocated, so memory stays bounded by one batch. ``dest`` and
    ``dest.with_suffix(".tiles.json")`` (where each row came from) are written under
    temporary names and renamed into place only when complete: a failure leaves neither.
    For ``output="classes"`` the rows are class scores, and
    ``dest.with_suffix(".classes.json")`` (:func:`class_report`) is written the same way.

    Returns:
        The report: the output, tiles, ``dest``, the array's shape and dtype, the seconds
        of the whole decode and of its entropy decoding and its graph.
    """
    limits = InputLimits() if limits is None else limits
    label = label or str(container)
    index_path = dest.with_suffix(".tiles.json")
    classes_path = dest.with_suffix(".classes.json")
    role = decode_outputs().get(output)
    finals = [dest, index_path] + ([classes_path] if role == GraphRole.CLASSIFIER else [])
    parts = [p.with_name(f".{p.name}.part") for p in finals]
    count = _count_tiles(container, limits, label)
    timer = StageTimer()
    bar = _progress(progress, "decompress", "tile")
    try:
        with timer.stage("decode"):
            with container.open("rb") as f:
                reader = ContainerReader(f)
                decoded = _iter_decoded(
                    reader.header,
                    reader,
                    bundle,
                    engine,
                    output,
                    batch_size,
                    timer,
                    limits=limits,
                    label=label,
                )
                index, shape, dtype = _fill_array(parts[0], count, decoded, limits, label, bar)
            parts[1].write_text(json.dumps(index))
            if len(parts) > 2:
                _write_class_report(parts[0], parts[2], index, bundle)
            for part, final in zip(parts, finals, strict=True):
                os.replace(part, final)
    finally:
        bar.close()
        for part in parts:
            part.unlink(missing_ok=True)
    seconds = _decode_seconds(timer)
    return ArrayReport(output, count, seconds, str(dest), shape, np.dtype(dtype).name)


def _fill_array(
    part: Path,
    count: int,
    decoded: Iterable[tuple[list[TileRecord], np.ndarray]],
    limits: InputLimits,
    label: str,
    bar,
) -> tuple[list[dict], tuple[int, ...], np.dtype]:
    """Write ``count`` decoded rows into a memory-mapped ``.npy`` at ``part``.

    Its size is checked against the limits from the first batch, before it is allocated.
    Returns the tile index of the rows, and the array's shape and dtype.
    """
    out = None
    row = 0
    index: list[dict] = []
    for records, arr in decoded:
        if out is None:
            check_decoded_size(count, arr.shape[1:], arr.dtype, limits, label)
            out = np.lib.format.open_memmap(
                part, mode="w+", dtype=arr.dtype, shape=(count, *arr.shape[1:])
            )
        out[row : row + len(arr)] = arr
        row += len(arr)
        index.extend(tile_index(records))
        bar.update(len(records))
    if out is None:
        raise InvalidInput(f"{label}: container holds no tiles")
    out.flush()
    return index, tuple(out.shape), out.dtype


def _write_class_report(
    scores_path: Path, dest: Path, index: list[dict], bundle: ModelBundle
) -> None:
    """Write :func:`class_report` of the class scores at ``scores_path`` to ``dest``."""
    names = bundle.manifest.family_params.score_names()
    scores = np.load(scores_path, mmap_mode="r")
    dest.write_text(json.dumps(class_report(index, np.asarray(scores), names)))
    del scores


def _count_tiles(container: Path, limits: InputLimits, label: str) -> int:
    """The tiles ``container`` holds (every record's CRC checked), at most ``max_tiles``."""
    count = 0
    with container.open("rb") as f:
        for _ in ContainerReader(f):
            count += 1
            if count > limits.max_tiles:
                raise InvalidInput(
                    f"{label}: container holds more than max_tiles={limits.max_tiles} tiles"
                )
    return count


def _member_name(source: str) -> str:
    """A safe ``.tif`` name inside the output tar for a tile source name."""
    parts = [p for p in PurePosixPath(source.replace("\\", "/")).parts if p not in ("/", "..", ".")]
    name = "/".join(parts) or "image"
    stem = name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name
    return stem + ".tif"


class _SourceImages:
    """Decoded tiles of bands into one GeoTIFF per source image, written tile by tile.

    A source's file is created when its first tile arrives, after its declared size was
    admitted (:class:`~nec_serve.imagery.limits.Budget`: one image's limits and, over all
    sources, ``max_decoded_bytes``); each tile is cropped to the source, its
    normalisation undone, rounded and clipped to the output dtype, and written in place.
    """

    def __init__(
        self,
        work: Path,
        names: Sequence[str],
        dtype: str,
        header: ContainerHeader,
        sources: dict[str, dict],
        limits: InputLimits,
        label: str,
        rate: Rate | None,
    ):
        self.work, self.names, self.sources = work, list(names), sources
        self.limits, self.label = limits, label
        self.norm = Normalisation.from_dict(header.meta.get("normalisation") or {})
        self.dtype = np.dtype(dtype)
        self.range = np.iinfo(self.dtype)
        self.tags = {"model": header.meta["model"], **(rate.to_wire() if rate else {})}
        self.budget = Budget(limits)
        self.written: list[tuple[str, Path]] = []
        self.tiles = 0
        self._out: GeoTiffWriter | None = None
        self._source: str | None = None

    def add(self, record: TileRecord, tile: np.ndarray) -> None:
        self.tiles += 1
        if self.tiles > self.limits.max_tiles:
            raise InvalidInput(f"{self.label}: holds more than max_tiles={self.limits.max_tiles}")
        if self._out is None or self._source != record.source:
            self._start(record)
        out = self._out
        r, c = record.row, record.col
        h = min(tile.shape[1], out.shape[1] - r)
        w = min(tile.shape[2], out.shape[2] - c)
        px = np.rint(self.norm.invert(tile[:, :h, :w]))
        out.write(np.clip(px, self.range.min, self.range.max), r, c)

    def _start(self, record: TileRecord) -> None:
        self.close()
        shape = (len(self.names), record.source_height, record.source_width)
        self.budget.image(f"{self.label}: source {record.source!r}", *shape, self.dtype)
        path = self.work / f"{len(self.written)}.tif"
        geo = self.sources.get(record.source)
        self._out = GeoTiffWriter(path, shape, self.dtype, geo, self.names, self.tags)
        self._source = record.source
        self.written.append((record.source, path))

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def write_bands(
    container: Path,
    dest: Path,
    bundle: ModelBundle,
    engine: Engine,
    *,
    batch_size: int = 8,
    limits: InputLimits | None = None,
    label: str | None = None,
    progress: bool = False,
) -> BandsReport:
    """Decode a container into GeoTIFFs of the reconstructed bands.

    Each source image is put back together from its tiles (padding cropped), its
    normalisation undone, rounded and clipped to the pixel type the family's parameters
    name (:meth:`~nec_serve.contract.FamilyParams.output_bands`), and written with the CRS
    and transform its source record holds and the band names. One source gives ``dest``
    (a GeoTIFF); several give ``dest.with_suffix(".tar")``, a tar of ``<source>.tif``.
    Each source's declared size is admitted as an input's would be (``max_pixels``,
    ``max_image_bytes`` and, over all sources, ``max_decoded_bytes``) before its file is
    created, and tiles are written to it as they are decoded, so memory stays bounded by
    one batch and GDAL's write cache (:data:`~nec_serve.imagery.writers.WRITE_CACHE_MB`),
    whatever the source size.
    Outputs are written under temporary names and renamed into place only when complete.

    Returns:
        The report: tiles, images, the rate the container was coded at, the path written
        and its format (``tif`` or ``tar``), seconds.
    """
    limits = InputLimits() if limits is None else limits
    label = label or str(container)
    bands = bundle.manifest.family_params.output_bands()
    if bands is None:
        raise InvalidInput(
            f"output 'bands' needs an export that reconstructs bands; {bundle.root} is a "
            f"{bundle.family!r} model"
        )
    knob = bundle.manifest.family_spec.rate
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    timer = StageTimer()
    try:
        with timer.stage("decode"):
            with container.open("rb") as f:
                reader = ContainerReader(f)
                header = reader.header
                rate = None if knob is None else Rate(knob, header.meta.get(knob))
                images = _SourceImages(work, *bands, header, reader.sources, limits, label, rate)
                decoded = _iter_decoded(
                    header,
                    reader,
                    bundle,
                    engine,
                    GraphRole.RECONSTRUCTION.output,
                    batch_size,
                    timer,
                    limits=limits,
                    label=label,
                )
                _add_tiles(images, decoded, progress)
            if not images.written:
                raise InvalidInput(f"{label}: container holds no tiles")
            final, fmt = _place_images(images.written, dest, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return BandsReport(
        output=GraphRole.RECONSTRUCTION.output,
        tiles=images.tiles,
        images=len(images.written),
        rate=rate,
        seconds=_decode_seconds(timer),
        path=str(final),
        format=fmt,
    )


def _add_tiles(
    images: _SourceImages,
    decoded: Iterable[tuple[list[TileRecord], np.ndarray]],
    progress: bool,
) -> None:
    """Write every decoded tile into its source's GeoTIFF, closing the last one."""
    bar = _progress(progress, "decompress", "tile")
    try:
        for records, arr in decoded:
            for record, tile in zip(records, arr, strict=True):
                images.add(record, tile)
            bar.update(len(records))
    finally:
        images.close()
        bar.close()


def _place_images(written: list[tuple[str, Path]], dest: Path, work: Path) -> tuple[Path, str]:
    """Rename one GeoTIFF to ``dest``, or tar several into ``dest.with_suffix(".tar")``.

    Returns the path written and its format, ``tif`` or ``tar``.
    """
    if len(written) == 1:
        os.replace(written[0][1], dest)
        return dest, "tif"
    final = dest.with_suffix(".tar")
    part = work / "out.tar"
    with tarfile.open(part, "w") as tar:
        for name, path in written:
            tar.add(path, arcname=_member_name(name))
    os.replace(part, final)
    return final, "tar"


def _decode_seconds(timer: StageTimer) -> DecodeSeconds:
    """A decode's seconds as ``timer`` timed them (stages decode, coding, inference)."""
    return DecodeSeconds(
        decode=timer.seconds("decode"),
        coding=timer.seconds("coding"),
        inference=timer.seconds("inference"),
    )


def _progress(enabled: bool, desc: str, unit: str):
    return tqdm(desc=desc, unit=unit, disable=not enabled, leave=False)


# ------------------------------------------------------------------------------ output writers


@dataclass(frozen=True)
class OutputWriter:
    """How one ``decompress --output`` is written, reported and described.

    Attributes:
        suffix: the output file's suffix (the wrapper names its S3 object with it).
        write: ``(container, dest, bundle, engine, output, *, batch_size, limits, label,
            progress) -> report``: decodes ``container`` into ``dest`` atomically and
            returns its :data:`~nec_serve.reports.DecodeReport` (whose wire form is the
            step report's result).
        describe: ``(report, bundle, dest) -> str``, the CLI's line about what was written.
    """

    suffix: str
    write: Any
    describe: Any


_WRITERS: dict[str, OutputWriter] = {}


def register_output_writer(output: str, writer: OutputWriter) -> OutputWriter:
    """Write ``output`` (a registered graph role's output) with ``writer``.

    Outputs without a writer of their own are arrays (:func:`write_embeddings`).

    Raises:
        ValueError: ``output`` already has a writer.
    """
    if output in _WRITERS:
        raise ValueError(f"output {output!r} already has a writer")
    _WRITERS[output] = writer
    return writer


def output_writer(output: str) -> OutputWriter:
    """The writer of ``output``: its own, else the array writer."""
    return _WRITERS.get(output, ARRAY_WRITER)


def _array_describe(done: ArrayReport, bundle: ModelBundle, dest: Path) -> str:
    return f"decoded {done.tiles} tiles -> {dest} {done.dtype}{done.shape}"


#: Every output without a writer of its own: one ``.npy`` array and its tile index.
ARRAY_WRITER = OutputWriter(".npy", write_embeddings, _array_describe)


def _bands_describe(done: BandsReport, bundle: ModelBundle, dest: Path) -> str:
    names, dtype = bundle.manifest.family_params.output_bands()
    rate = "" if done.rate is None else f" at {done.rate.knob}={done.rate.value}"
    return (
        f"decoded {done.tiles} tiles of {done.images} image(s){rate} -> {done.path} "
        f"({done.format}, {dtype} {', '.join(names)})"
    )


def _write_bands(container, dest, bundle, engine, output, **kwargs) -> BandsReport:
    return write_bands(container, dest, bundle, engine, **kwargs)


#: Reconstructed bands: georeferenced GeoTIFFs (a tar of them for several sources).
BANDS_WRITER = register_output_writer(
    GraphRole.RECONSTRUCTION.output,
    OutputWriter(".tif", _write_bands, _bands_describe),
)
