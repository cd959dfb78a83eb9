"""One summary of every benchmark's results, against the project's targets.

Reads the CSVs the benchmarks wrote to ``benchmarks/results/`` (whichever exist) and writes
``benchmarks/results/SUMMARY.md``: the machines they ran on, each target with its measured
value and whether it is met, then a short table per benchmark. A target with no measurement
says so; nothing is assumed.

    python benchmarks/report.py
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nec_dev.perf import read_rows, summary_markdown
from nec_serve.contract import GraphRole
from nec_serve.families.nec import NEC

RESULTS = Path(__file__).resolve().parent / "results"

# The targets of issue 5 (DESIGN section 10).
SERVING_OVERHEAD_MAX_PCT = 10.0
CODEC_MIN_MSYM_PER_S = 50.0
CODEC_MAX_OVER_BOUND_PCT = 0.5
GPU_MIN_IMG_PER_S = 3000.0
GPU_MAX_P99_MS = 100.0
GPU_IMG_SIZE = 256


def _f(row: dict, key: str) -> float:
    return float(row[key])


def target_rows(
    codec: Sequence[dict],
    serving: Sequence[dict],
    perf: Sequence[dict],
    encoder: Sequence[dict],
) -> list[dict]:
    """Each target: what it asks, what was measured, and whether it is met (None: unmeasured)."""
    return [_serving_target(serving), *_codec_targets(codec), _gpu_target(perf, encoder)]


def _serving_target(serving: Sequence[dict]) -> dict:
    """The local server's overhead over in-process onnxruntime at batch 8."""
    b8 = [r for r in serving if int(r["batch"]) == 8 and "triton" in r["path"]]
    if b8:
        worst = max(b8, key=lambda r: _f(r, "overhead_pct_vs_in_process"))
        measured = ", ".join(
            f"{r['path']} {_f(r, 'overhead_pct_vs_in_process'):+.1f} %" for r in b8
        )
        met = _f(worst, "overhead_pct_vs_in_process") < SERVING_OVERHEAD_MAX_PCT
    else:
        measured, met = "not measured", None
    return {
        "target": f"local server vs in-process onnxruntime, batch 8: overhead "
        f"< {SERVING_OVERHEAD_MAX_PCT:g} %",
        "measured": measured,
        "met": met,
    }


def _codec_targets(codec: Sequence[dict]) -> list[dict]:
    """Entropy coding speed and coded size (one row saying neither was measured, if so)."""
    if not codec:
        target = "entropy coding speed and size"
        return [{"target": target, "measured": "not measured", "met": None}]
    enc = min(_f(r, "encode_msym_per_s") for r in codec)
    dec = min(_f(r, "decode_msym_per_s") for r in codec)
    over = max(_f(r, "overhead_pct") for r in codec)
    return [
        {
            "target": f"entropy coding, one core: >= {CODEC_MIN_MSYM_PER_S:g} M symbols/s "
            "encode and decode",
            "measured": f"encode >= {enc:.0f}, decode >= {dec:.0f} M symbols/s "
            f"(197, 257, 1025 tokens x 768)",
            "met": min(enc, dec) >= CODEC_MIN_MSYM_PER_S,
        },
        {
            "target": f"coded size within {CODEC_MAX_OVER_BOUND_PCT:g} % of the entropy bound",
            "measured": f"at most +{over:.3f} % (payload; the container's framing: "
            "container/container.csv)",
            "met": over <= CODEC_MAX_OVER_BOUND_PCT,
        },
    ]


def stage_targets(coding: Sequence[dict], container: Sequence[dict]) -> list[dict]:
    """The coding stage's speed (coding.csv) and the container's framing (container.csv).

    Each row of those CSVs that has a target is one target here, judged as the benchmark
    judged it; an absent CSV is one row saying it was not measured.
    """
    rows = []
    judged = [r for r in coding if r.get("target_tiles_per_s")]
    for r in judged:
        rows.append(
            {
                "target": f"coding stage ({r['measure'].removeprefix('stage_')}), "
                f"{r['workload']} tile, one core: >= {_f(r, 'target_tiles_per_s'):g} tiles/s",
                "measured": f"{_f(r, 'tiles_per_s_per_core'):.0f} tiles/s "
                f"({_f(r, 'ms_per_tile'):.3f} ms/tile)",
                "met": r["target_met"] == "True",
            }
        )
    if not judged:
        rows.append({"target": "coding stage speed", "measured": "not measured", "met": None})
    framed = [r for r in container if r.get("target")]
    for r in framed:
        rate = f", {r['rate']} codebook(s)" if r.get("rate") else ""
        rows.append(
            {
                "target": f"container framing, {r['model']}{rate}: within "
                f"{100 * _f(r, 'target'):g} % of the payload",
                "measured": f"+{100 * _f(r, 'overhead'):.2f} % ({_f(r, 'container_bits'):,.1f} "
                f"against {_f(r, 'payload_bits'):,.1f} bits per image; format 2: "
                f"+{100 * _f(r, 'format2_overhead'):.1f} %)",
                "met": r["met"] == "True",
            }
        )
    if not framed:
        rows.append({"target": "container framing", "measured": "not measured", "met": None})
    return rows


def _gpu_target(perf: Sequence[dict], encoder: Sequence[dict]) -> dict:
    """The served encoder's GPU throughput; else the in-process bound, unjudged."""
    gpu_perf = [
        r
        for r in perf
        if r["model"] == NEC.graph_name(GraphRole.ENCODER)
        and int(r["img_size"]) == GPU_IMG_SIZE
        and "gpu" in r["run"].lower()
        and float(r["latency_us_p99"]) / 1e3 < GPU_MAX_P99_MS
    ]
    gpu_raw = [
        r
        for r in encoder
        if r["engine"] == "torch-cuda" and int(r["img_size"]) == GPU_IMG_SIZE and r["mode"] == "h2d"
    ]
    target = (
        f"NEC ViT-B encoder, {GPU_IMG_SIZE} px, one H100, served: > {GPU_MIN_IMG_PER_S:g} img/s "
        f"with p99 < {GPU_MAX_P99_MS:g} ms"
    )
    if gpu_perf:
        best = max(gpu_perf, key=lambda r: _f(r, "throughput_infer_per_s"))
        return {
            "target": target,
            "measured": f"{_f(best, 'throughput_infer_per_s'):.0f} img/s at p99 "
            f"{_f(best, 'latency_us_p99') / 1e3:.0f} ms ({best['machine']})",
            "met": _f(best, "throughput_infer_per_s") > GPU_MIN_IMG_PER_S,
        }
    if gpu_raw:
        best = max(gpu_raw, key=lambda r: _f(r, "throughput_img_per_s"))
        return {
            "target": target,
            "measured": f"served: not measured; in-process PyTorch bound "
            f"{_f(best, 'throughput_img_per_s'):.0f} img/s ({best['dtype']}, batch "
            f"{best['batch']}, {best['machine']})",
            "met": None,
        }
    return {"target": target, "measured": "not measured: no GPU run", "met": None}


def _table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _codec_row(r: dict) -> dict:
    fmt = {"encode_msym_per_s": ".0f", "decode_msym_per_s": ".0f", "overhead_pct": "+.3f"}
    fmt |= dict.fromkeys(
        ("compressai_compress_msym_per_s", "compressai_decompress_msym_per_s"), ".1f"
    )
    return {**r, **{k: format(_f(r, k), f) for k, f in fmt.items() if r.get(k)}}


_CODEC_COLUMNS = (
    "tokens",
    "encode_msym_per_s",
    "decode_msym_per_s",
    "compressai_compress_msym_per_s",
    "compressai_decompress_msym_per_s",
    "overhead_pct",
    "bytes_equal_compressai",
)
_SERVING_COLUMNS = (
    "path",
    "batch",
    "latency_ms_p50",
    "latency_ms_p99",
    "throughput_img_per_s",
    "overhead_pct_vs_in_process",
)
_ENCODER_COLUMNS = (
    "run",
    "engine",
    "mode",
    "img_size",
    "batch",
    "dtype",
    "throughput_img_per_s",
    "latency_ms_p50",
    "latency_ms_p99",
)
#: pipeline.csv's columns shown (bench_pipeline.py's FIELDS; ``other_s`` left out).
_PIPELINE_COLUMNS = (
    "server",
    "input_kind",
    "images",
    "tiles",
    "s3_get_s",
    "read_s",
    "preprocess_s",
    "inference_s",
    "coding_s",
    "s3_put_s",
    "kafka_s",
    "throughput_img_per_s",
    "throughput_MB_per_s",
    "max_rss_mb",
)
_VERDICT = {True: "met", False: "**missed**", None: "not measured"}


def summary(results: Path) -> str:
    """The whole SUMMARY.md text."""
    names = ("codec", "serving", "perf_sweep", "encoder", "pipeline")
    codec, serving, perf, encoder, pipeline = (read_rows(results / f"{n}.csv") for n in names)
    everything = (codec, serving, perf, encoder, pipeline)
    machines = sorted({r["machine"] for rows in everything for r in rows if r.get("machine")})
    coding, container = (
        read_rows(results / "coding.csv"),
        read_rows(results / "container" / "container.csv"),
    )
    judged = target_rows(codec, serving, perf, encoder) + stage_targets(coding, container)
    targets = [{**t, "met": _VERDICT[t["met"]]} for t in judged]
    parts = [
        "# Benchmark results\n",
        "Machines: " + ("; ".join(machines) or "none recorded") + "\n",
        "## Targets\n",
        _table(targets, ["target", "measured", "met"]),
    ]
    if codec:
        parts.append("\n## Codec, one thread (`benchmarks/bench_codec.py`, codec.csv)\n")
        parts.append(_table([_codec_row(r) for r in codec], _CODEC_COLUMNS))
    if serving:
        parts.append("\n## Serving overhead (`benchmarks/bench_serving.py`, serving.csv)\n")
        parts.append(_table(serving, _SERVING_COLUMNS))
    if perf:
        parts.append("\n## perf_analyzer sweep (`benchmarks/perf_sweep.py`, perf_sweep.csv/png)\n")
        parts.append(summary_markdown(perf))
    if encoder:
        parts.append("\n## Encoder in-process (`benchmarks/bench_encoder.py`, encoder.csv)\n")
        parts.append(_table(encoder, _ENCODER_COLUMNS))
    if pipeline:
        parts.append(
            "\n## Pipeline, one wrapper (`benchmarks/bench_pipeline.py`, pipeline.csv/png)\n"
        )
        parts.append(_table(pipeline, [c for c in _PIPELINE_COLUMNS if c in pipeline[0]]))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    text = summary(args.results)
    (args.results / "SUMMARY.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
