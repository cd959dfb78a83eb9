"""The pure helpers of benchmarks/bench_pipeline.py (no stack is started here)."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from nec_serve.pipeline import CompressStats
from nec_serve.reports import StepReport

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def bench():
    path = ROOT / "benchmarks" / "bench_pipeline.py"
    spec = importlib.util.spec_from_file_location("bench_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


CONTEXT = {"machine": "x86_64 2 cores", "model": "m", "img_size": 224, "trigger": "kafka"}


def _stats(images, tiles, pixels, container, seconds, *, get, process, put, kafka, rss, key):
    """A wrapper's report of one compress step."""
    cs = CompressStats(
        images=images,
        tiles=tiles,
        source_pixels=pixels,
        raw_bytes=3 * pixels,
        container_bytes=container,
        seconds=seconds,
    )
    return StepReport(
        mode="compress",
        result=cs.report(),
        message_id="0" * 32,
        input_key=key,
        output_key="result-nec-compress/x.necb",
        bytes_in=1000,
        bytes_out=container,
        s3_get_s=get,
        process_s=process,
        s3_put_s=put,
        max_rss_mb=rss,
        kafka_s=kafka,
    )


def _naip_tar_stats():
    seconds = {"read": 0.1, "preprocess": 0.05, "inference": 1.5, "coding": 0.25}
    return _stats(
        3, 60, 3 * 934 * 724, 100_000, seconds,
        get=0.2, process=2.0, put=0.1, kafka=0.05, rss=900.0, key="input/00-naip.tar.gz",
    )  # fmt: skip


def _landsat_stats():
    seconds = {"read": 0.02, "preprocess": 0.01, "inference": 0.4, "coding": 0.07}
    return _stats(
        1, 8, 697 * 377, 20_000, seconds,
        get=0.05, process=0.5, put=0.05, kafka=0.02, rss=950.5, key="input/01-2015.tif",
    )  # fmt: skip


def test_rows_read_the_published_report(bench):
    """A row from a status event's stats, read back, is the row from the report itself."""
    report = _naip_tar_stats()
    published = json.loads(json.dumps(report.to_wire()))
    row = {"kind": "naip_tar_gz", "server": "triton", "wall_s": 2.5, "context": CONTEXT}
    assert bench.message_row(StepReport.from_wire(published), **row) == bench.message_row(
        report, **row
    )
    # The next-step message's copy has no kafka seconds yet: not a row, said loudly.
    with pytest.raises(ValueError, match="not a finished compress step"):
        bench.message_row(dataclasses.replace(report, kafka_s=None), **row)


def test_message_row(bench):
    row = bench.message_row(
        _naip_tar_stats(),
        kind="naip_tar_gz",
        server="triton",
        wall_s=2.5,
        context=CONTEXT,
        load_1m=1.234,
    )
    assert list(row) == list(bench.FIELDS)
    assert row["other_s"] == pytest.approx(0.1)  # 2.0 - (0.1 + 0.05 + 1.5 + 0.25)
    assert row["step_s"] == pytest.approx(2.35)  # 0.2 + 2.0 + 0.1 + 0.05
    assert sum(row[k] for k in bench.STAGES) == pytest.approx(row["step_s"])
    assert row["raw_bytes"] == 3 * 3 * 934 * 724
    assert row["throughput_img_per_s"] == pytest.approx(3 / 2.35, abs=1e-3)
    assert row["throughput_tiles_per_s"] == pytest.approx(60 / 2.35, abs=1e-3)
    assert row["throughput_MB_per_s"] == pytest.approx(6.085944 / 2.35, abs=1e-3)
    assert row["wall_img_per_s"] == pytest.approx(1.2)
    assert row["bits_per_pixel"] == pytest.approx(8 * 100_000 / (3 * 934 * 724), abs=1e-4)
    assert row["compression_ratio"] == pytest.approx(3 * 3 * 934 * 724 / 100_000, abs=0.01)
    assert (row["server"], row["input_kind"], row["messages"], row["max_rss_mb"]) == (
        "triton",
        "naip_tar_gz",
        1,
        900.0,
    )
    assert row["load_avg_1m"] == 1.23


def test_total_row_and_stage_means(bench):
    rows = [
        bench.message_row(
            _naip_tar_stats(), kind="naip_tar_gz", server="triton", wall_s=2.5, context=CONTEXT
        ),
        bench.message_row(
            _landsat_stats(), kind="landsat_tif", server="triton", wall_s=0.7, context=CONTEXT
        ),
        bench.message_row(
            _naip_tar_stats(), kind="naip_tar_gz", server="triton", wall_s=2.3, context=CONTEXT
        ),
    ]
    total = bench.total_row(rows)
    assert total["input_kind"] == "total"
    assert (total["messages"], total["images"], total["tiles"]) == (3, 7, 128)
    assert total["step_s"] == pytest.approx(2.35 + 0.62 + 2.35)
    assert total["wall_s"] == pytest.approx(5.5)
    assert total["inference_s"] == pytest.approx(3.4)
    assert total["max_rss_mb"] == 950.5
    assert total["load_avg_1m"] == 0.0
    assert total["throughput_img_per_s"] == pytest.approx(7 / 5.32, abs=1e-3)
    assert total["wall_img_per_s"] == pytest.approx(7 / 5.5, abs=1e-3)
    raw = 2 * 3 * 3 * 934 * 724 + 3 * 697 * 377
    assert total["raw_bytes"] == raw
    assert total["throughput_MB_per_s"] == pytest.approx(raw / 1e6 / 5.32, abs=1e-3)
    pixels = 2 * 3 * 934 * 724 + 697 * 377
    assert total["bits_per_pixel"] == pytest.approx(8 * 220_000 / pixels, rel=1e-3)
    assert total["compression_ratio"] == pytest.approx(raw / 220_000, abs=0.01)

    means = bench.stage_means([*rows, total])
    assert list(means) == ["naip_tar_gz (triton)", "landsat_tif (triton)"]
    assert means["naip_tar_gz (triton)"]["inference_s"] == pytest.approx(1.5)
    assert means["naip_tar_gz (triton)"]["tiles"] == 60
    assert means["landsat_tif (triton)"]["other_s"] == pytest.approx(0.0)  # 0.5 - 0.5

    with pytest.raises(ValueError, match="several server modes"):
        bench.total_row([rows[0], {**rows[1], "server": "inprocess"}])


def test_table_csv_and_chart(bench, tmp_path):
    rows = [
        bench.message_row(
            _landsat_stats(), kind="landsat_tif", server="inprocess", wall_s=0.7, context=CONTEXT
        )
    ]
    rows.append(bench.total_row(rows))
    table = bench.format_table(rows).splitlines()
    assert table[0].split()[:4] == ["server", "input", "img", "tiles"]
    assert table[1].split()[:5] == ["inprocess", "landsat_tif", "1", "8", "0.8"]
    assert table[2].split()[1] == "total"
    assert "0.400" in table[1].split()  # inference_s

    out = tmp_path / "pipeline.csv"
    bench.write_csv(rows, out)
    with out.open() as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == list(bench.FIELDS)
    assert [r["input_kind"] for r in read] == ["landsat_tif", "total"]
    assert float(read[1]["step_s"]) == pytest.approx(0.62)

    png = tmp_path / "pipeline.png"
    bench.plot_stages(rows, png, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 5000


def test_prepare_inputs_cycles_kinds_on_real_data(bench, data_dir, tmp_path):
    import tarfile

    import numpy as np

    calibration = "m_4709963_se_14_1_20090818.tif"
    warmup, inputs = bench.prepare_inputs(data_dir, tmp_path, 6, [calibration])
    assert [i.kind for i in inputs] == [*bench.KINDS, "naip_tar_gz", "naip_tif"]
    assert len({i.key for i in inputs}) == 6
    assert inputs[1].key == "input/01-naip_tif-m_4709963_se_14_1_20180716.tif"
    assert inputs[2].path == data_dir / "landsat" / "2015.tif"
    # The sample data: one NAIP scene besides the calibration one, two Landsat scenes.
    assert inputs[5].path.name == "m_4709963_se_14_1_20180716.tif"  # no other scene back
    with tarfile.open(inputs[0].path) as tf:
        names = tf.getnames()
    assert names == ["naip/m_4709963_se_14_1_20180716.tif"]  # each scene once
    with tarfile.open(inputs[3].path) as tf:
        assert tf.getnames() == ["bigearthnet/S2A_MSIL2A_20170617T113321_4_55.npy"]
    patch = np.load(warmup.path)
    assert patch.shape == (3, 120, 120) and patch.dtype == np.uint16
