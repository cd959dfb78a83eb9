"""perf_analyzer sweep: CSV parsing, inputs, server variants, retries, report; one real sweep."""

from __future__ import annotations

import base64
import csv
import importlib.util
import json
import stat
from pathlib import Path

import numpy as np
import pytest

from nec_dev.perf import (
    SERIES_KEYS,
    PerfError,
    Variant,
    merge_runs,
    parse_perf_csv,
    perf_analyzer_command,
    plot_curves,
    run_until_stable,
    summary_markdown,
    write_input_data,
    write_variant_repository,
)

ROOT = Path(__file__).resolve().parents[3]

# What perf_analyzer 2.60.0 printed here against the local server (gRPC, -f, no --verbose-csv).
PLAIN = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,\
Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,\
p90 latency,p95 latency,p99 latency
1,303.78,7,119,5095,35,873,407,3,6401,6862,6949,7091
2,2359.26,4,345,97,39,970,206,1,1548,1902,2090,5326
"""
# With --verbose-csv --collect-metrics over HTTP, on a machine without a GPU.
VERBOSE = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,\
Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,\
p90 latency,p95 latency,p99 latency,Avg latency,request/response,response wait,\
Avg GPU Utilization,Avg GPU Power Usage,Max GPU Memory Usage,Total GPU Memory
1,148.492,128,353,5117,50,960,81,0,6666,7102,7176,7360,6693,128,6557,,,,
"""


def test_parse_plain_csv_names_units():
    rows = parse_perf_csv(PLAIN)
    assert [r["concurrency"] for r in rows] == [1, 2]
    assert rows[1]["throughput_infer_per_s"] == pytest.approx(2359.26)
    assert rows[0]["server_queue_us"] == 5095.0
    assert rows[0]["latency_us_p50"] == 6401.0 and rows[0]["latency_us_p99"] == 7091.0
    assert rows[1]["network_server_send_recv_us"] == 345.0


def test_parse_verbose_csv_keeps_empty_metrics_as_none():
    (row,) = parse_perf_csv(VERBOSE)
    assert row["latency_us_avg"] == 6693.0
    assert row["response_wait_us"] == 6557.0
    assert row["gpu_utilization_raw"] is None and row["gpu_memory_total_raw"] is None


def test_parse_keeps_unknown_columns_as_text():
    text = PLAIN.replace("p99 latency\n", "p99 latency,Avg HTTP time\n", 1)
    text = text.replace("7091\n", "7091,abc\n").replace("5326\n", "5326,12\n")
    rows = parse_perf_csv(text)
    assert rows[0]["avg_http_time_raw"] == "abc" and rows[1]["avg_http_time_raw"] == "12"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("Concurrency,Inferences/Second,p50 latency\n1,2,3\n", "'p99 latency'"),
        ("Inferences/Second,p50 latency,p99 latency\n1,2,3\n", "'Concurrency'"),
        (PLAIN.splitlines()[0] + "\n", "no measurements"),
        (PLAIN + "3,1,2\n", "line 4 has 3 cells"),
        (PLAIN.replace("303.78", "n/a"), "'Inferences/Second' is 'n/a'"),
    ],
)
def test_parse_rejects_bad_csv_naming_what(text, message):
    with pytest.raises(PerfError, match=message):
        parse_perf_csv(text)


def test_input_data_is_exact_base64_per_sample(tmp_path):
    images = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    symbols = np.arange(3 * 4 * 5, dtype=np.int32).reshape(3, 4, 5)
    path = write_input_data(tmp_path / "in.json", {"images": images, "symbols": symbols})
    data = json.loads(path.read_text())["data"]
    assert len(data) == 3
    for i, entry in enumerate(data):
        assert entry["images"]["shape"] == [3, 8, 8]
        got = np.frombuffer(base64.b64decode(entry["images"]["b64"]), np.float32)
        np.testing.assert_array_equal(got.reshape(3, 8, 8), images[i])
        got = np.frombuffer(base64.b64decode(entry["symbols"]["b64"]), np.int32)
        np.testing.assert_array_equal(got.reshape(4, 5), symbols[i])


def test_input_data_needs_equal_sample_counts(tmp_path):
    with pytest.raises(ValueError, match="same, non-zero number"):
        write_input_data(tmp_path / "x.json", {"a": np.zeros((2, 1)), "b": np.zeros((3, 1))})
    with pytest.raises(ValueError, match="no input"):
        write_input_data(tmp_path / "x.json", {})


def test_variant_parse_and_name():
    v = Variant.parse("i2-b16-d500")
    assert (v.instances, v.max_batch, v.delay_us) == (2, 16, 500)
    assert v.name == "i2-b16-d500"
    none = Variant.parse("i1-b8-d-")
    assert none.delay_us == -1 and none.name == "i1-b8-d-" and "no batcher" in none.label
    for bad in ("i0-b8-d5", "i1-b0-d5", "1-8-5", "i1-b8"):
        with pytest.raises(ValueError, match="not like 'i1-b8-d5000'"):
            Variant.parse(bad)


def test_variant_repository_edits_config_through_protobuf(tiny_export, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    src = tiny_export / "model_repository_local"
    dest = write_variant_repository(src, tmp_path / "repo", Variant(2, 4, 100), ["nec_encoder"])
    assert sorted(p.name for p in dest.iterdir()) == ["nec_encoder"]
    cfg = text_format.Parse(
        (dest / "nec_encoder" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert cfg.max_batch_size == 4
    assert [(g.kind, g.count) for g in cfg.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_CPU, 2)
    ]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4]
    assert cfg.backend == "python" and cfg.input[0].name == "images"
    version = dest / "nec_encoder" / "1"
    assert version.is_symlink() and (version / "model.onnx").is_file()

    plain = write_variant_repository(src, tmp_path / "repo", Variant(1, 8, -1), ["nec_decoder"])
    cfg = text_format.Parse(
        (plain / "nec_decoder" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert not cfg.HasField("dynamic_batching") and cfg.max_batch_size == 8
    with pytest.raises(PerfError, match="'nope' is not in repository"):
        write_variant_repository(src, tmp_path / "r2", Variant(), ["nope"])


def test_variant_repository_measures_what_export_ships(tiny_export, tmp_path):
    """The sweep's default variant is export's CPU configuration, byte for byte."""
    src = tiny_export / "model_repository_local"
    graphs = ["nec_decoder", "nec_encoder"]
    dest = write_variant_repository(src, tmp_path / "repo", Variant(), graphs)
    for graph in graphs:
        shipped = (src / graph / "config.pbtxt").read_text()
        assert (dest / graph / "config.pbtxt").read_text() == shipped


def _command(binary, **kwargs):
    args = dict(model="m", url="u", protocol="grpc", batch=1, concurrency=[1], input_data="zero")
    args.setdefault("csv_path", "x")
    return perf_analyzer_command(binary, **{**args, **kwargs})


def test_command_line():
    cmd = perf_analyzer_command(
        "/pa",
        model="nec_encoder",
        url="127.0.0.1:9001",
        protocol="http",
        batch=8,
        concurrency=[2, 4, 6],
        input_data="in.json",
        csv_path="out.csv",
        measurement_ms=7000,
        metrics_url="127.0.0.1:9002/metrics",
    )
    args = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert cmd[0] == "/pa"
    assert args["-m"] == "nec_encoder" and args["-i"] == "http" and args["-b"] == "8"
    assert args["--concurrency-range"] == "2:6:2"
    assert args["--input-data"] == "in.json" and args["--measurement-interval"] == "7000"
    assert "--collect-metrics" in cmd and "--verbose-csv" in cmd
    for bad, message in (
        ({"protocol": "tcp"}, "not 'grpc' or 'http'"),
        ({"concurrency": [1, 2, 4]}, "not an arithmetic range"),
        ({"batch": 0}, "batch size 0"),
    ):
        with pytest.raises(ValueError, match=message):
            _command("/pa", **bad)


def _fake_perf_analyzer(tmp_path: Path) -> Path:
    """Fault injection: 'unstable' below 4000 ms windows, then a CSV (status 2 as the real)."""
    script = tmp_path / "perf_analyzer"
    script.write_text(
        "#!/usr/bin/env bash\n"
        "while [ $# -gt 0 ]; do case $1 in --measurement-interval) w=$2;; -f) f=$2;; esac; "
        "shift; done\n"
        'if [ "$w" -lt 4000 ]; then echo "Failed to obtain stable measurement."; exit 2; fi\n'
        f"cat > \"$f\" <<'EOF'\n{PLAIN}EOF\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_unstable_measurements_are_retried_with_longer_windows(tmp_path):
    fake = _fake_perf_analyzer(tmp_path)
    seen = []

    def command(window_ms):
        seen.append(window_ms)
        return _command(fake, csv_path=tmp_path / "out.csv", measurement_ms=window_ms)

    rows, window = run_until_stable(command, 1000, retries=2, timeout_s=30)
    assert seen == [1000, 2000, 4000] and window == 4000 and len(rows) == 2
    seen.clear()
    with pytest.raises(PerfError, match="stable measurement"):
        run_until_stable(command, 1000, retries=1, timeout_s=30)
    assert seen == [1000, 2000]


def _rows(run, model, tput_lat):
    return [
        {
            "run": run,
            "machine": f"{run} box",
            "model": model,
            "protocol": "grpc",
            "config": "i1-b8-d5000",
            "batch": 8,
            "concurrency": c,
            "throughput_infer_per_s": t,
            "latency_us_p50": lat * 800,
            "latency_us_p95": lat * 950,
            "latency_us_p99": lat * 1000,
        }
        for c, (t, lat) in enumerate(tput_lat, start=1)
    ]


def test_merge_summary_and_plot(tmp_path):
    cpu = _rows("cpu", "nec_encoder", [(4.0, 2000), (5.0, 3500)])
    gpu_old = _rows("gpu", "nec_encoder", [(1.0, 1.0)])
    gpu = _rows("gpu", "nec_encoder", [(2500.0, 40), (3100.0, 90), (3000.0, 160)])
    gpu[1].update(
        server_queue_us=30_000.0,
        server_compute_input_us=1_000.0,
        server_compute_infer_us=50_000.0,
        server_compute_output_us=4_000.0,
    )
    merged = merge_runs(cpu + gpu_old, gpu)
    assert len(merged) == 5 and {r["run"] for r in merged} == {"cpu", "gpu"}
    assert all(r["throughput_infer_per_s"] != 1.0 for r in merged)
    # By curve: a batch-1 series measured again replaces only itself (CSV rows are text).
    again = [{**r, "batch": "8"} for r in _rows("cpu", "nec_encoder", [(6.0, 1000)])]
    other = [{**r, "batch": 1} for r in _rows("cpu", "nec_encoder", [(9.0, 100)])]
    by_series = merge_runs(merged, again + other, SERIES_KEYS)
    assert [r["throughput_infer_per_s"] for r in by_series if r["run"] == "cpu"] == [6.0, 9.0]
    assert len([r for r in by_series if r["run"] == "gpu"]) == 3

    table = summary_markdown(merged)
    lines = table.splitlines()
    assert len(lines) == 4
    assert (
        "| cpu | cpu box | nec_encoder | 5.0 | i1-b8-d5000, grpc, b8, c2 | 2800 / 3500 |" in table
    )
    assert (
        "| gpu | gpu box | nec_encoder | 3100.0 | i1-b8-d5000, grpc, b8, c2 | 72 / 90 | 30 / 55 |"
        in table
    )
    assert "| 2800 / 3500 | - |" in table  # no server statistics in the CPU rows
    assert lines[3].endswith("| 40 | i1-b8-d5000, grpc, b8, c1 |")

    png = plot_curves(merged, tmp_path / "curves.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def _load_sweep():
    spec = importlib.util.spec_from_file_location("perf_sweep", ROOT / "benchmarks/perf_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.triton
def test_real_sweep_against_local_tritonserver(tiny_export, tmp_path, data_dir):
    """The pinned perf_analyzer against the real local server, real tiles, both protocols."""
    out = tmp_path / "results"
    rc = _load_sweep().main(
        [
            "--model-dir",
            str(tiny_export),
            "--models",
            "nec_encoder",
            "nec_decoder",
            "--configs",
            "i1-b4-d-",
            "--batch",
            "1",
            "4",
            "--concurrency",
            "1",
            "--measurement-ms",
            "1000",
            "--stability-pct",
            "50",
            "--tiles",
            "4",
            "--data",
            str(data_dir),
            "--run",
            "test",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    with (out / "perf_sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    got = {(r["model"], r["protocol"], r["batch"]) for r in rows}
    assert got == {
        (m, p, b) for m in ("nec_encoder", "nec_decoder") for p in ("grpc", "http") for b in "14"
    }
    for r in rows:
        assert r["run"] == "test" and r["input"] == "real" and r["config"] == "i1-b4-d-"
        assert float(r["throughput_infer_per_s"]) > 0
        assert 0 < float(r["latency_us_p50"]) <= float(r["latency_us_p99"])
    raw = sorted(p.name for p in (out / "perf_analyzer").iterdir())
    assert "test_nec_encoder_http_i1-b4-d-_b4_c1.csv" in raw and len(raw) == 8
    assert (out / "perf_sweep.png").stat().st_size > 20_000
    assert "| test |" in (out / "perf_sweep.md").read_text()


def test_report_only_redraws_from_the_csv(tmp_path, tiny_export):
    out = tmp_path / "results"
    out.mkdir()
    rows = _rows("cpu", "nec_encoder", [(4.0, 2000), (5.0, 3500)])
    for r in rows:
        r.update(protocol="http", config="i1-b8-d-")
    sweep = _load_sweep()
    sweep.write_rows(out / "perf_sweep.csv", rows)
    (out / "perf_sweep.md").write_text("old\n- not measured: cpu_x_c4: Failed to obtain stable\n")
    rc = sweep.main(["--model-dir", str(tiny_export), "--out", str(out), "--report-only"])
    assert rc == 0
    md = (out / "perf_sweep.md").read_text()
    assert "| cpu | cpu box | nec_encoder | 5.0 | i1-b8-d-, http, b8, c2 |" in md
    assert md.rstrip().endswith("- not measured: cpu_x_c4: Failed to obtain stable")
    assert (out / "perf_sweep.png").stat().st_size > 20_000
    assert not (out / "perf_analyzer").exists()  # nothing was measured


def test_latency_stats_and_csv_round_trip(tmp_path):
    from nec_dev.perf import latency_stats, read_rows, write_rows

    secs = np.array([0.1, 0.2, 0.3, 0.4])
    st = latency_stats(secs, batch=8)
    assert st["latency_ms_p50"] == 250.0 and st["throughput_img_per_s"] == 32.0
    assert st["latency_ms_p90"] == pytest.approx(370.0) and st["latency_ms_p99"] == 397.0
    assert list(latency_stats(secs, 1, percentiles=(50,))) == [
        "latency_ms_p50",
        "throughput_img_per_s",
    ]
    write_rows(tmp_path / "r.csv", [{"a": 1}, {"a": 2, "b": "x"}])
    assert read_rows(tmp_path / "r.csv") == [{"a": "1", "b": ""}, {"a": "2", "b": "x"}]
    assert read_rows(tmp_path / "missing.csv") == []
