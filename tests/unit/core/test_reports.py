"""Typed reports (nec_serve/reports.py): wire forms, key order, stage timing, metrics."""

from __future__ import annotations

import dataclasses
import json

import pytest
from support.wire import COMPRESS_KEYS
from support.wire import STEP_KEYS as WIRE_STEP_KEYS

from nec_serve.metrics import STAGES, WrapperMetrics, sample_names
from nec_serve.pipeline import CompressStats
from nec_serve.reports import (
    ArrayReport,
    BandsReport,
    CompressReport,
    CompressSeconds,
    DecodeSeconds,
    DuplicateReport,
    Rate,
    StageTimer,
    StepReport,
    step_report_from_wire,
)

#: The step keys of the SUCCESS status event's copy, ``kafka_s`` last.
STEP_KEYS = [*WIRE_STEP_KEYS, "kafka_s"]


def _compress_report() -> CompressReport:
    stats = CompressStats(
        images=2,
        tiles=12,
        source_pixels=7000,
        raw_bytes=21000,
        container_bytes=1234,
        payload_bytes=1100,
        symbols=9000,
        entropy_bound_bits=8000.0,
        quant_sq_err=750.0,
        seconds={"read": 0.01234, "preprocess": 0.002, "inference": 0.5, "coding": 0.0456},
    )
    return stats.report()


def _step(result, mode: str = "compress", rate: Rate | None = None, kafka=0.02) -> StepReport:
    return StepReport(
        mode=mode,
        result=result,
        rate=rate,
        message_id="ab" * 16,
        input_key="input/tiles.tar.gz",
        output_key=f"result-nec-{mode}/tiles.x",
        bytes_in=5000,
        bytes_out=1234,
        s3_get_s=0.011,
        process_s=0.75,
        s3_put_s=0.013,
        max_rss_mb=512.5,
        kafka_s=kafka,
    )


def _decode_seconds() -> DecodeSeconds:
    return DecodeSeconds(decode=0.4, coding=0.05, inference=0.3)


def _array() -> ArrayReport:
    return ArrayReport("embeddings", 12, _decode_seconds(), "/w/x.npy", (12, 196, 768), "float32")


def _bands() -> BandsReport:
    return BandsReport(
        "bands", 16, 2, Rate("codebooks", 3), _decode_seconds(), "/w/x.tar", format="tar"
    )


def test_compress_report_rounds_as_published():
    report = _compress_report()
    assert list(report.to_wire()) == COMPRESS_KEYS
    assert report.to_wire() == {
        "images": 2,
        "tiles": 12,
        "raw_bytes": 21000,
        "container_bytes": 1234,
        "bits_per_pixel": round(8 * 1234 / 7000, 4),
        "compression_ratio": round(21000 / 1234, 2),
        "payload_over_entropy_bound_pct": round(100 * (8 * 1100 / 8000 - 1), 3),
        "embedding_rmse": round((750 / 9000) ** 0.5, 5),
        "read_s": 0.012,
        "preprocess_s": 0.002,
        "inference_s": 0.5,
        "coding_s": 0.046,
    }


@pytest.mark.parametrize(
    "report, keys",
    [
        (_step(_compress_report()), [*COMPRESS_KEYS, "mode", *STEP_KEYS]),
        (
            _step(_compress_report(), rate=Rate("codebooks", 4)),
            [*COMPRESS_KEYS, "codebooks", "mode", *STEP_KEYS],
        ),
        (
            _step(_array(), "decompress"),
            ["mode", "tiles", "output", "decode_s", "coding_s", "inference_s", *STEP_KEYS],
        ),
        (
            _step(_bands(), "decompress"),
            [
                "mode",
                "output",
                "tiles",
                "images",
                "codebooks",
                "decode_s",
                "coding_s",
                "inference_s",
                *STEP_KEYS,
            ],
        ),
        (_step(_compress_report(), kafka=None), [*COMPRESS_KEYS, "mode", *STEP_KEYS[:-1]]),
    ],
    ids=["compress", "compress-rate", "array", "bands", "next-message"],
)
def test_step_wire_keeps_the_published_keys_and_round_trips(report, keys):
    wire = report.to_wire()
    assert list(wire) == keys
    assert wire["mode"] == report.mode
    published = json.loads(json.dumps(wire))
    back = StepReport.from_wire(published)
    assert back.to_wire() == wire
    assert json.dumps(back.to_wire()) == json.dumps(wire)  # same order, same numbers
    assert step_report_from_wire(published) == back


def test_local_fields_stay_off_the_wire():
    """Where a decode wrote and what shape are the CLI's, not the status event's."""
    back = StepReport.from_wire(_step(_bands(), "decompress").to_wire()).result
    assert back == dataclasses.replace(_bands(), path=None, format=None)
    assert "path" not in _bands().to_wire()
    back = StepReport.from_wire(_step(_array(), "decompress").to_wire()).result
    assert back == ArrayReport("embeddings", 12, _decode_seconds())


def test_duplicate_report_round_trips():
    dup = DuplicateReport("input/a.tif", "result-nec-compress/a.necb", "cd" * 16)
    assert list(dup.to_wire()) == ["input_key", "output_key", "duplicate_of"]
    assert step_report_from_wire(dup.to_wire()) == dup


@pytest.mark.parametrize(
    "drop, match",
    [("read_s", "missing 'read_s'"), ("bytes_out", "missing 'bytes_out'"), ("mode", "'mode'")],
)
def test_from_wire_names_a_missing_key(drop, match):
    wire = _step(_compress_report()).to_wire()
    del wire[drop]
    with pytest.raises(ValueError, match=match):
        StepReport.from_wire(wire)


def test_from_wire_refuses_wrong_types_and_unknown_shapes():
    wire = _step(_compress_report()).to_wire()
    with pytest.raises(ValueError, match="'tiles' is '12'"):
        StepReport.from_wire({**wire, "tiles": "12"})
    with pytest.raises(ValueError, match="'images' is True"):
        StepReport.from_wire({**wire, "images": True})
    decode = _step(_array(), "decompress").to_wire()
    with pytest.raises(ValueError, match="no decode report's"):
        StepReport.from_wire({k: v for k, v in decode.items() if k != "output"})
    with pytest.raises(ValueError, match="unknown mode"):
        StepReport.from_wire({**decode, "mode": "transcode"})


def test_reports_are_frozen():
    report = _step(_compress_report())
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.bytes_in = 0
    assert report.with_kafka(1.5).kafka_s == 1.5 and report.kafka_s == 0.02


def test_stage_timer_adds_up_and_refuses_an_untimed_stage():
    timer = StageTimer()
    with timer.stage("s3_get"):
        pass
    timer.add("coding", 0.0004)
    timer.add("coding", 0.0011)
    assert timer.seconds("coding") == 0.002  # added, then rounded once
    assert 0 <= timer.seconds("s3_get") < 1
    with pytest.raises(KeyError, match="'kafka' was not timed"):
        timer.seconds("kafka")
    with pytest.raises(RuntimeError), timer.stage("s3_put"):
        raise RuntimeError("failed")
    with pytest.raises(KeyError):  # a failed stage is not a timed one
        timer.seconds("s3_put")


def test_compress_seconds_are_all_required():
    with pytest.raises(TypeError):
        CompressSeconds(read=0.1, preprocess=0.1, inference=0.1)  # no coding
    stats = CompressStats()
    del stats.seconds["coding"]
    with pytest.raises(TypeError):
        stats.report()


def _stage_counts(metrics: WrapperMetrics) -> dict[str, float]:
    return {
        s.labels["stage"]: s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "nec_wrapper_stage_seconds_count"
    }


def _stage_sums(metrics: WrapperMetrics) -> dict[str, float]:
    return {
        s.labels["stage"]: s.value
        for family in metrics.registry.collect()
        for s in family.samples
        if s.name == "nec_wrapper_stage_seconds_sum"
    }


def test_metrics_observe_every_stage_of_a_compress_step():
    metrics = WrapperMetrics("compress")
    report = _step(_compress_report())
    metrics.observe_step(report)
    assert _stage_counts(metrics) == dict.fromkeys(STAGES, 1.0)
    wire = report.to_wire()
    assert _stage_sums(metrics) == pytest.approx({s: wire[f"{s}_s"] for s in STAGES})
    assert "nec_wrapper_bits_per_pixel_sum" in sample_names(metrics.registry)


def test_metrics_observe_the_stages_a_decompress_step_has():
    metrics = WrapperMetrics("decompress")
    for result in (_array(), _bands()):
        metrics.observe_step(_step(result, "decompress"))
    ran = {"s3_get", "coding", "inference", "s3_put", "kafka"}
    assert _stage_counts(metrics) == {s: 2.0 if s in ran else 0.0 for s in STAGES}


def test_metrics_refuse_a_report_missing_a_stage():
    metrics = WrapperMetrics("compress")
    with pytest.raises(ValueError, match="no kafka seconds"):
        metrics.observe_step(_step(_compress_report(), kafka=None))
    assert set(_stage_counts(metrics).values()) == {0.0}  # nothing half recorded
