"""Typed reports of what a compression, a decode and a workflow step did.

Each report is a frozen dataclass with a wire form, the JSON object it is published as:
:meth:`to_wire` gives it and :meth:`from_wire` reads it back, naming a missing or
mistyped key. The step report's wire form is ``meta_information.nec`` of the wrapper's
next-step message and ``nec.stats`` of its ``SUCCESS`` status event; the compress
report's is the CLI's ``compress`` output. The wire form is specified in
``docs/formats.md`` ("The step report"): its keys, their order and their rounding are
those published before these types existed, so it carries no version key; a change that
renames, drops or re-units a key must add ``report_version`` (absent means 1).

Stage seconds are typed fields (:class:`CompressSeconds`, :class:`DecodeSeconds`, the
step's own), each report naming its stages for the metrics
(:meth:`StepReport.stage_seconds`); :class:`StageTimer` times them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any

__all__ = [
    "StageTimer",
    "CompressSeconds",
    "DecodeSeconds",
    "Rate",
    "CompressReport",
    "ArrayReport",
    "BandsReport",
    "DecodeReport",
    "StepReport",
    "DuplicateReport",
    "step_report_from_wire",
]

#: Seconds are published rounded to the millisecond.
_SECONDS_DIGITS = 3


class StageTimer:
    """Times the stages of one piece of work, adding up stages timed more than once.

    ``with timer.stage("s3_get"): ...`` adds the block's seconds to the stage (only when
    the block completes); :meth:`add` adds seconds measured elsewhere; :meth:`seconds`
    reads a stage, rounded as published, and refuses one that was never timed.
    """

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name``."""
        t0 = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to stage ``name``."""
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def seconds(self, name: str) -> float:
        """Seconds of stage ``name``, rounded to the millisecond.

        Raises:
            KeyError: the stage was never timed (a report would miss it).
        """
        if name not in self._seconds:
            raise KeyError(f"stage {name!r} was not timed (timed: {sorted(self._seconds)})")
        return round(self._seconds[name], _SECONDS_DIGITS)


# ----------------------------------------------------------------------------- wire helpers


def _get(wire: Mapping, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """``wire[key]``, checked to be of ``kind`` (a bool is none of the kinds asked for)."""
    if key not in wire:
        raise ValueError(f"{what}: missing {key!r} (has {sorted(wire)})")
    value = wire[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{what}: {key!r} is {value!r}, expected {kind}")
    return value


_NUMBER = (int, float)
_OPTIONAL_INT = (int, type(None))


def _seconds_from_wire(cls, wire: Mapping, what: str):
    return cls(**{f.name: float(_get(wire, f"{f.name}_s", _NUMBER, what)) for f in fields(cls)})


def _seconds_to_wire(seconds) -> dict[str, float]:
    return {f"{f.name}_s": getattr(seconds, f.name) for f in fields(seconds)}


# ------------------------------------------------------------------------------ stage seconds


@dataclass(frozen=True)
class CompressSeconds:
    """Seconds a compression spent reading images, normalising, in the graph, coding."""

    read: float
    preprocess: float
    inference: float
    coding: float

    def stages(self) -> dict[str, float]:
        """Seconds by metrics stage (``nec_wrapper_stage_seconds{stage}``)."""
        return {
            "read": self.read,
            "preprocess": self.preprocess,
            "inference": self.inference,
            "coding": self.coding,
        }


@dataclass(frozen=True)
class DecodeSeconds:
    """Seconds of a whole decode (``decode``) and of its entropy decoding and its graph."""

    decode: float
    coding: float
    inference: float

    def stages(self) -> dict[str, float]:
        """Seconds by metrics stage; ``decode`` holds the others, so it is not one."""
        return {"coding": self.coding, "inference": self.inference}


@dataclass(frozen=True)
class Rate:
    """A family's rate knob and the value coded at (``codebooks: 4``); no value: unknown."""

    knob: str
    value: int | None

    def to_wire(self) -> dict[str, int | None]:
        """``{knob: value}``."""
        return {self.knob: self.value}


# ------------------------------------------------------------------------------------ reports


@dataclass(frozen=True)
class CompressReport:
    """What one compression did, with the figures rounded as published.

    Attributes:
        images: images read.
        tiles: tiles coded.
        raw_bytes: bytes of the images' pixels as read.
        container_bytes: bytes of the container written.
        bits_per_pixel: container bits per source pixel (all bands of a pixel together).
        compression_ratio: raw bytes over container bytes.
        payload_over_entropy_bound_pct: payload bytes over the entropy bound of the coded
            symbols, minus one, in percent.
        embedding_rmse: RMS difference between the continuous latent and its decoding.
        seconds: where the time went.
    """

    images: int
    tiles: int
    raw_bytes: int
    container_bytes: int
    bits_per_pixel: float
    compression_ratio: float
    payload_over_entropy_bound_pct: float
    embedding_rmse: float
    seconds: CompressSeconds

    def to_wire(self) -> dict[str, Any]:
        """The published form: the fields, then ``<stage>_s`` per stage."""
        head = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "seconds"}
        return {**head, **_seconds_to_wire(self.seconds)}

    @classmethod
    def from_wire(cls, wire: Mapping) -> CompressReport:
        """Read :meth:`to_wire`'s form (other keys are ignored).

        Raises:
            ValueError: a key missing or of the wrong type, naming it.
        """
        what = "compress report"
        ints = ("images", "tiles", "raw_bytes", "container_bytes")
        floats = (
            "bits_per_pixel",
            "compression_ratio",
            "payload_over_entropy_bound_pct",
            "embedding_rmse",
        )
        return cls(
            **{k: _get(wire, k, int, what) for k in ints},
            **{k: float(_get(wire, k, _NUMBER, what)) for k in floats},
            seconds=_seconds_from_wire(CompressSeconds, wire, what),
        )

    @classmethod
    def wire_keys(cls) -> frozenset[str]:
        """The keys of :meth:`to_wire`."""
        head = {f.name for f in fields(cls) if f.name != "seconds"}
        return frozenset(head | {f"{f.name}_s" for f in fields(CompressSeconds)})


@dataclass(frozen=True)
class ArrayReport:
    """What decoding into an array (``.npy`` plus its tile index) did.

    ``path`` (the ``.npy``), ``shape`` and ``dtype`` describe the array written; they are
    local (the CLI prints them) and not published, so a report read from the wire has
    None there.
    """

    output: str
    tiles: int
    seconds: DecodeSeconds
    path: str | None = None
    shape: tuple[int, ...] | None = None
    dtype: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The published form: ``tiles``, ``output``, ``<stage>_s``."""
        return {"tiles": self.tiles, "output": self.output, **_seconds_to_wire(self.seconds)}

    @classmethod
    def from_wire(cls, wire: Mapping) -> ArrayReport:
        """Read :meth:`to_wire`'s form (other keys are ignored).

        Raises:
            ValueError: a key missing or of the wrong type, naming it.
        """
        what = "array decode report"
        return cls(
            output=_get(wire, "output", str, what),
            tiles=_get(wire, "tiles", int, what),
            seconds=_seconds_from_wire(DecodeSeconds, wire, what),
        )

    @classmethod
    def wire_keys(cls) -> frozenset[str]:
        """The keys of :meth:`to_wire`."""
        return frozenset({"tiles", "output"} | {f"{f.name}_s" for f in fields(DecodeSeconds)})


@dataclass(frozen=True)
class BandsReport:
    """What decoding into GeoTIFFs of reconstructed bands did.

    ``rate`` is the rate the container was coded at (None: the family has no rate knob).
    ``path`` (the GeoTIFF, or the tar of
    several) and ``format`` (``tif`` or ``tar``) are local and not published, so a report
    read from the wire has None there.
    """

    output: str
    tiles: int
    images: int
    rate: Rate | None
    seconds: DecodeSeconds
    path: str | None = None
    format: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The published form: ``output``, ``tiles``, ``images``, the rate, ``<stage>_s``."""
        head = {"output": self.output, "tiles": self.tiles, "images": self.images}
        rate = {} if self.rate is None else self.rate.to_wire()
        return {**head, **rate, **_seconds_to_wire(self.seconds)}

    @classmethod
    def from_wire(cls, wire: Mapping, knob: str | None) -> BandsReport:
        """Read :meth:`to_wire`'s form, whose rate is under ``knob`` (others are ignored).

        Raises:
            ValueError: a key missing or of the wrong type, naming it.
        """
        what = "bands decode report"
        return cls(
            output=_get(wire, "output", str, what),
            tiles=_get(wire, "tiles", int, what),
            images=_get(wire, "images", int, what),
            rate=None if knob is None else Rate(knob, _get(wire, knob, _OPTIONAL_INT, what)),
            seconds=_seconds_from_wire(DecodeSeconds, wire, what),
        )

    @classmethod
    def wire_keys(cls) -> frozenset[str]:
        """The keys of :meth:`to_wire` but the rate's, whose name is the family's."""
        seconds = {f"{f.name}_s" for f in fields(DecodeSeconds)}
        return frozenset({"output", "tiles", "images"} | seconds)


#: A decode report: an array or GeoTIFF bands.
DecodeReport = ArrayReport | BandsReport

#: The step's own keys, after its result's (``kafka_s`` only once the next message is sent).
_STEP_INTS = ("bytes_in", "bytes_out")
_STEP_STRS = ("message_id", "input_key", "output_key")


@dataclass(frozen=True)
class StepReport:
    """What one wrapper step did: its result's report and the step's own figures.

    Attributes:
        mode: ``compress`` or ``decompress``.
        result: the compression's or the decode's report.
        rate: compress steps whose message asked for a rate: that rate; else None.
        message_id: the next-step message's id.
        input_key: the S3 key read.
        output_key: the S3 key written.
        bytes_in: bytes of the input object.
        bytes_out: bytes of the output object.
        s3_get_s: seconds downloading the input.
        process_s: seconds compressing or decoding (the result's stages and the rest).
        s3_put_s: seconds uploading the output (and what decoding writes beside it).
        max_rss_mb: the process's peak resident memory so far, in MiB.
        kafka_s: seconds sending the next message and recording it; None until then (the
            next message itself carries the report without it).
    """

    mode: str
    result: CompressReport | ArrayReport | BandsReport
    message_id: str
    input_key: str
    output_key: str
    bytes_in: int
    bytes_out: int
    s3_get_s: float
    process_s: float
    s3_put_s: float
    max_rss_mb: float
    rate: Rate | None = None
    kafka_s: float | None = None

    def with_kafka(self, seconds: float) -> StepReport:
        """This report with the seconds the next message took."""
        return replace(self, kafka_s=seconds)

    def stage_seconds(self) -> dict[str, float]:
        """Seconds by metrics stage (``nec_wrapper_stage_seconds{stage}``).

        Raises:
            ValueError: ``kafka_s`` is not known yet.
        """
        if self.kafka_s is None:
            raise ValueError(f"step report of {self.output_key} has no kafka seconds yet")
        return {
            "s3_get": self.s3_get_s,
            **self.result.seconds.stages(),
            "s3_put": self.s3_put_s,
            "kafka": self.kafka_s,
        }

    @property
    def bits_per_pixel(self) -> float | None:
        """A compression's container bits per source pixel; None for a decode."""
        return self.result.bits_per_pixel if isinstance(self.result, CompressReport) else None

    def to_wire(self) -> dict[str, Any]:
        """The published form (``meta_information.nec``; docs/formats.md).

        A compress step gives its result's keys, the rate, ``mode``; a decompress step
        ``mode``, then its result's keys. Then the step's own keys; ``kafka_s`` last, when
        known.
        """
        rate = {} if self.rate is None else self.rate.to_wire()
        mode = {"mode": self.mode}
        # Key order as published before the report was typed: compress put its mode last.
        if self.mode == "compress":
            head = {**self.result.to_wire(), **rate, **mode}
        else:
            head = {**mode, **self.result.to_wire()}
        own = {
            "message_id": self.message_id,
            "input_key": self.input_key,
            "output_key": self.output_key,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "s3_get_s": self.s3_get_s,
            "process_s": self.process_s,
            "s3_put_s": self.s3_put_s,
            "max_rss_mb": self.max_rss_mb,
        }
        kafka = {} if self.kafka_s is None else {"kafka_s": self.kafka_s}
        return {**head, **own, **kafka}

    @classmethod
    def own_keys(cls) -> frozenset[str]:
        """The step's own keys (every key of :meth:`to_wire` its result does not give)."""
        seconds = ("s3_get_s", "process_s", "s3_put_s", "max_rss_mb", "kafka_s")
        return frozenset({"mode", *_STEP_STRS, *_STEP_INTS, *seconds})

    @classmethod
    def from_wire(cls, wire: Mapping) -> StepReport:
        """Read :meth:`to_wire`'s form.

        The result's kind is told by its keys: a compress step's are
        :meth:`CompressReport.wire_keys`, a decompress step's an array's or bands' (with
        the rate under the one key left); a compress step's one key left is its rate.

        Raises:
            ValueError: a key missing, of the wrong type, or not of any report, naming it.
        """
        what = "step report"
        mode = _get(wire, "mode", str, what)
        rest = set(wire) - cls.own_keys()
        result, rate = _result_from_wire(mode, wire, rest)
        kafka = wire.get("kafka_s")
        return cls(
            mode=mode,
            result=result,
            rate=rate,
            **{k: _get(wire, k, str, what) for k in _STEP_STRS},
            **{k: _get(wire, k, int, what) for k in _STEP_INTS},
            **{
                k: float(_get(wire, k, _NUMBER, what))
                for k in ("s3_get_s", "process_s", "s3_put_s", "max_rss_mb")
            },
            kafka_s=None if kafka is None else float(_get(wire, "kafka_s", _NUMBER, what)),
        )


def _one_rate_key(left: set[str], what: str) -> str:
    if len(left) != 1:
        raise ValueError(f"{what}: expected one rate key beside the report's, got {sorted(left)}")
    return next(iter(left))


def _result_from_wire(
    mode: str, wire: Mapping, keys: set[str]
) -> tuple[CompressReport | ArrayReport | BandsReport, Rate | None]:
    """The result report and the step's rate of a step's wire form (``keys``: the result's)."""
    if mode == "compress":
        left = keys - CompressReport.wire_keys()
        rate = None
        if left:
            knob = _one_rate_key(left, "compress step report")
            rate = Rate(knob, _get(wire, knob, int, "compress step report"))
        return CompressReport.from_wire(wire), rate
    if mode != "decompress":
        raise ValueError(f"step report: unknown mode {mode!r}, expected compress or decompress")
    if keys == ArrayReport.wire_keys():
        return ArrayReport.from_wire(wire), None
    if keys >= BandsReport.wire_keys():
        left = keys - BandsReport.wire_keys()
        knob = _one_rate_key(left, "bands decode report") if left else None
        return BandsReport.from_wire(wire, knob), None
    raise ValueError(f"step report: keys {sorted(keys)} are no decode report's")


@dataclass(frozen=True)
class DuplicateReport:
    """A step found already published: what it would have written, under which id."""

    input_key: str
    output_key: str
    duplicate_of: str

    def to_wire(self) -> dict[str, str]:
        """The published form: ``input_key``, ``output_key``, ``duplicate_of``."""
        return {
            "input_key": self.input_key,
            "output_key": self.output_key,
            "duplicate_of": self.duplicate_of,
        }

    @classmethod
    def from_wire(cls, wire: Mapping) -> DuplicateReport:
        """Read :meth:`to_wire`'s form.

        Raises:
            ValueError: a key missing or of the wrong type, naming it.
        """
        return cls(**{f.name: _get(wire, f.name, str, "duplicate report") for f in fields(cls)})


def step_report_from_wire(wire: Mapping) -> StepReport | DuplicateReport:
    """A step's ``nec.stats`` as published in its ``SUCCESS`` status event, read back."""
    return DuplicateReport.from_wire(wire) if "duplicate_of" in wire else StepReport.from_wire(wire)
