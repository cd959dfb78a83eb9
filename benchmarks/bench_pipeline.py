"""Pipeline throughput of ONE compress wrapper on the local embedded stack, stage by stage.

Starts the project's own stack (a real Kafka broker, ``LocalKafka``; a real S3 server, moto's,
``LocalS3``; the local ``tritonserver``, ``LocalTritonServer``) with the workflow demo's
building blocks (``nec_dev.workflow_demo``), stores the workflow's config in a local config
store and runs one ``nec-serve wrapper --mode compress`` process with the **Kafka trigger**:
the wrapper consumes the workflow's input topic itself. There is no controller and no
KafkaSource stand-in (HTTP hop) in the path, so nothing but the wrapper (and, with
``--server triton``, the Triton server it calls) competes for the cores.

Real imagery from ``--data`` (default: as the demo finds it, ``nec_dev.data``: ``$NEC_DATA``,
``../shared/data``, else the sample data) is uploaded to S3 as four kinds of input object: a
``.tar.gz`` of three NAIP scenes, a single NAIP GeoTIFF, a Landsat GeoTIFF (bands 1,2,3) and a
``.tar.gz`` of the BigEarthNet patches (B04, B03, B02 stacked into ``.npy``, uint16). One
warm-up message (a BigEarthNet patch; not reported) loads the graphs, then ``--messages``
step messages, cycling through the kinds, are sent at once. The wrapper measures each message
itself and reports it in its ``SUCCESS`` status event on ``monitoring.notify``, under
``nec.stats`` (the step report, ``nec_serve.reports.StepReport``, read back with
``StepReport.from_wire``: the same as ``meta_information.nec`` of the next-step message, plus
``kafka_s``, the time to write that message, which is only known after it is sent; see
docs/formats.md). Stages, in seconds:

- ``s3_get_s``: download the input object; ``read_s``: decode it (GeoTIFF, gunzip + tar, npy);
- ``preprocess_s``: normalise the tiles; ``inference_s``: the encoder graph (Triton gRPC or
  in-process onnxruntime); ``coding_s``: entropy coding and container writing per batch;
- ``other_s``: the rest of the wrapper's processing time (tiling, container header/close);
- ``s3_put_s``: upload the container; ``kafka_s``: send the next-step message (acks=all).

``step_s`` is their sum, the wrapper's time on the message; ``wall_s`` is the time between
this message's ``finished`` event and the previous one (the first: since the messages were
sent), as seen by the benchmark, so it adds what the wrapper does outside the step (status
events, offset commit, polling). ``throughput_*`` are over ``step_s``, ``wall_*`` over
``wall_s``; MB are 10^6 bytes of decoded pixels of the bands used (``raw_bytes``).
``max_rss_mb`` is the wrapper process's peak RSS so far (``ru_maxrss``); with Triton the
model's memory is in the server's processes, not counted here.

``--server triton`` (default) runs the graphs on the local Triton server over gRPC;
``--server inprocess`` in the wrapper with onnxruntime; ``--server triton inprocess`` both,
one fresh wrapper after the other, so the cost of Triton shows. Writes
``benchmarks/results/pipeline.csv`` (a row per message, a ``total`` row per server mode) and
``pipeline.png`` (mean seconds per stage and message, a bar per input kind and server mode).

    .venv/bin/python benchmarks/bench_pipeline.py \\
        --model-dir artifacts/demo/export/mae_vit_compress_adapter [--messages 8] \\
        [--server triton inprocess]
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nec_dev.data import resolve_data
from nec_dev.perf import machine_description
from nec_dev.workflow_demo import (
    create_topics,
    follow,
    json_consumer,
    local_stack,
    spawn_cli,
    stop_processes,
    workflow_message,
    wrapper_args,
    write_tar_gz,
)
from nec_serve.bundle import ModelBundle
from nec_serve.config_store import LocalConfigStore
from nec_serve.imagery import read_bigearthnet_patch
from nec_serve.kafka_io import json_producer
from nec_serve.messages import DEAD_LETTER_TOPIC, STATUS_TOPIC, parse_workflow
from nec_serve.reports import CompressReport, StepReport

BUCKET = "nec-bench"
SERVERS = ("triton", "inprocess")
KINDS = ("naip_tar_gz", "naip_tif", "landsat_tif", "bigearthnet_tar_gz")
#: Stage columns, in pipeline order, and their labels in the chart.
STAGES = {
    "s3_get_s": "S3 get",
    "read_s": "read/decode",
    "preprocess_s": "preprocess",
    "inference_s": "inference",
    "coding_s": "entropy coding",
    "other_s": "tiling/other",
    "s3_put_s": "S3 put",
    "kafka_s": "Kafka",
}
FIELDS = (
    "machine",
    "model",
    "img_size",
    "server",
    "trigger",
    "input_kind",
    "input_key",
    "messages",
    "images",
    "tiles",
    "bytes_in",
    "raw_bytes",
    "bytes_out",
    "bits_per_pixel",
    "compression_ratio",
    *STAGES,
    "step_s",
    "wall_s",
    "throughput_img_per_s",
    "throughput_tiles_per_s",
    "throughput_MB_per_s",
    "wall_img_per_s",
    "wall_MB_per_s",
    "max_rss_mb",
    "load_avg_1m",
)


# -- pure helpers (tested in tests/unit/benchmarks/test_bench_pipeline.py) --------------------


def _rate(amount: float, seconds: float) -> float:
    return round(amount / seconds, 3) if seconds > 0 else 0.0


def stage_columns(report: StepReport) -> dict[str, float]:
    """The stage columns (:data:`STAGES`) of a compress step's report.

    ``other_s`` is the part of the step's processing its compression did not time.

    Raises:
        ValueError: not a compress step's report, or one without its kafka seconds.
    """
    result = report.result
    if not isinstance(result, CompressReport) or report.kafka_s is None:
        raise ValueError(f"{report.input_key}: not a finished compress step's report")
    process = result.seconds
    other = report.process_s - sum(process.stages().values())
    stages = {
        "s3_get_s": report.s3_get_s,
        "read_s": process.read,
        "preprocess_s": process.preprocess,
        "inference_s": process.inference,
        "coding_s": process.coding,
        "other_s": max(other, 0.0),
        "s3_put_s": report.s3_put_s,
        "kafka_s": report.kafka_s,
    }
    return {k: round(stages[k], 3) for k in STAGES}


def message_row(
    report: StepReport,
    *,
    kind: str,
    server: str,
    wall_s: float,
    context: dict,
    load_1m: float = 0.0,
) -> dict:
    """One CSV row from a wrapper's report of a message (its ``SUCCESS`` event's stats).

    ``context`` holds the columns shared by every row (machine, model, img_size, trigger);
    ``load_1m`` is the machine's 1-minute load average when the message finished.
    """
    stages = stage_columns(report)
    step_s = round(sum(stages.values()), 3)
    result = report.result
    mb = result.raw_bytes / 1e6
    row = {
        **context,
        "server": server,
        "input_kind": kind,
        "input_key": report.input_key,
        "messages": 1,
        "images": result.images,
        "tiles": result.tiles,
        "bytes_in": report.bytes_in,
        "raw_bytes": result.raw_bytes,
        "bytes_out": report.bytes_out,
        "bits_per_pixel": result.bits_per_pixel,
        "compression_ratio": result.compression_ratio,
        **stages,
        "step_s": step_s,
        "wall_s": round(wall_s, 3),
        "throughput_img_per_s": _rate(result.images, step_s),
        "throughput_tiles_per_s": _rate(result.tiles, step_s),
        "throughput_MB_per_s": _rate(mb, step_s),
        "wall_img_per_s": _rate(result.images, wall_s),
        "wall_MB_per_s": _rate(mb, wall_s),
        "max_rss_mb": report.max_rss_mb,
        "load_avg_1m": round(load_1m, 2),
    }
    return {k: row[k] for k in FIELDS}


def total_row(rows: Sequence[dict]) -> dict:
    """The ``total`` row of the message rows of one server mode."""
    if not rows:
        raise ValueError("no rows to total")
    servers = {r["server"] for r in rows}
    if len(servers) != 1:
        raise ValueError(f"rows of several server modes: {sorted(servers)}")

    def tot(key: str):
        return sum(r[key] for r in rows)

    pixels = sum(8 * r["bytes_out"] / r["bits_per_pixel"] for r in rows if r["bits_per_pixel"])
    step_s, wall_s = round(tot("step_s"), 3), round(tot("wall_s"), 3)
    mb = tot("raw_bytes") / 1e6
    total = {
        **{k: rows[0][k] for k in ("machine", "model", "img_size", "server", "trigger")},
        "input_kind": "total",
        "input_key": "",
        **{k: tot(k) for k in ("messages", "images", "tiles", "bytes_in", "raw_bytes")},
        "bytes_out": tot("bytes_out"),
        "bits_per_pixel": round(8 * tot("bytes_out") / pixels, 4) if pixels else 0.0,
        "compression_ratio": round(tot("raw_bytes") / max(tot("bytes_out"), 1), 2),
        **{k: round(tot(k), 3) for k in STAGES},
        "step_s": step_s,
        "wall_s": wall_s,
        "throughput_img_per_s": _rate(tot("images"), step_s),
        "throughput_tiles_per_s": _rate(tot("tiles"), step_s),
        "throughput_MB_per_s": _rate(mb, step_s),
        "wall_img_per_s": _rate(tot("images"), wall_s),
        "wall_MB_per_s": _rate(mb, wall_s),
        "max_rss_mb": max(r["max_rss_mb"] for r in rows),
        "load_avg_1m": max(r["load_avg_1m"] for r in rows),
    }
    return {k: total[k] for k in FIELDS}


def stage_means(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean seconds per stage and message, per ``"<kind> (<server>)"``, total rows left out.

    Also ``tiles``: the mean tiles per message. Keys keep the order rows first appear in.
    """
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["input_kind"] != "total":
            groups.setdefault(f"{r['input_kind']} ({r['server']})", []).append(r)
    return {
        label: {k: round(sum(r[k] for r in g) / len(g), 4) for k in (*STAGES, "tiles")}
        for label, g in groups.items()
    }


_TABLE = (
    ("server", "server", "{}"),
    ("input_kind", "input", "{}"),
    ("images", "img", "{}"),
    ("tiles", "tiles", "{}"),
    ("raw_bytes", "MB", "{:.1f}"),
    *((k, k[: -len("_s")], "{:.3f}") for k in STAGES),
    ("step_s", "step_s", "{:.2f}"),
    ("wall_s", "wall_s", "{:.2f}"),
    ("throughput_img_per_s", "img/s", "{:.2f}"),
    ("throughput_tiles_per_s", "tiles/s", "{:.2f}"),
    ("throughput_MB_per_s", "MB/s", "{:.2f}"),
    ("max_rss_mb", "RSS_MB", "{:.0f}"),
    ("load_avg_1m", "load", "{:.1f}"),
)


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of the rows (MB = 10^6 raw pixel bytes)."""
    cells = [[h for _, h, _ in _TABLE]]
    for r in rows:
        cells.append([fmt.format(r[k] / 1e6 if k == "raw_bytes" else r[k]) for k, _, fmt in _TABLE])
    widths = [max(len(c[i]) for c in cells) for i in range(len(_TABLE))]
    lines = []
    for line in cells:
        padded = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: Path) -> None:
    """Write the rows with the :data:`FIELDS` header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(FIELDS))
        w.writeheader()
        w.writerows(rows)


def plot_stages(rows: Sequence[dict], path: Path, title: str) -> None:
    """Stacked horizontal bars: mean seconds per stage and message, per input kind and server.

    A second panel shows the same bars without inference, so the small stages can be read.
    """
    import matplotlib  # only for the plot; Agg is chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = stage_means(rows)
    labels = list(means)
    colors = dict(zip(STAGES, plt.get_cmap("tab10").colors, strict=False))
    fig, axes = plt.subplots(
        1, 2, figsize=(13, 1.4 + 0.55 * len(labels)), sharey=True, width_ratios=(3, 2)
    )
    panels = (
        (axes[0], tuple(STAGES), "seconds per message (mean), all stages"),
        (axes[1], tuple(k for k in STAGES if k != "inference_s"), "the same without inference"),
    )
    for ax, keys, xlabel in panels:
        left = [0.0] * len(labels)
        for key in keys:
            widths = [means[lab][key] for lab in labels]
            ax.barh(labels, widths, left=left, label=STAGES[key], color=colors[key])
            left = [a + b for a, b in zip(left, widths, strict=True)]
        for y, (lab, x) in enumerate(zip(labels, left, strict=True)):
            note = f" {x:.2f} s" + (f", {means[lab]['tiles']:g} tiles" if ax is axes[0] else "")
            ax.text(x, y, note, va="center", fontsize=8)
        ax.set_xlim(0, (max(left) if left else 1) * 1.3 or 1)
        ax.set_xlabel(xlabel)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, ncols=len(STAGES), fontsize=8, loc="lower center")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    """One S3 object to compress."""

    kind: str
    key: str  # S3 key under the bucket
    path: Path  # local file uploaded as ``key``


def prepare_inputs(
    data: Path, tmp: Path, messages: int, exclude: Sequence[str] = ()
) -> tuple[Input, list[Input]]:
    """The warm-up input and ``messages`` inputs cycling through :data:`KINDS`.

    Repeats of a kind take other scenes where the data has them (NAIP, Landsat); a NAIP
    archive holds three scenes, or all there are. Files named in ``exclude`` (the export's
    calibration scene) are left out.
    """
    naip = sorted(p for p in (data / "naip").glob("*.tif") if p.name not in exclude)
    landsat = sorted((data / "landsat").glob("*.tif"))
    patches = sorted(p for p in (data / "bigearthnet").iterdir() if p.is_dir())
    npys = []
    for patch in patches:
        npys.append(tmp / f"{patch.name}.npy")
        np.save(npys[-1], read_bigearthnet_patch(patch))
    ben = write_tar_gz(tmp / "bigearthnet.tar.gz", ((f"bigearthnet/{p.name}", p) for p in npys))
    warmup = Input("warmup", "input/warmup.npy", npys[0])
    inputs = []
    for i in range(messages):
        kind, rep = KINDS[i % len(KINDS)], i // len(KINDS)
        if kind == "naip_tar_gz":
            scenes = [naip[(3 * rep + j) % len(naip)] for j in range(min(3, len(naip)))]
            path = write_tar_gz(tmp / f"naip-{rep}.tar.gz", ((f"naip/{s.name}", s) for s in scenes))
        elif kind == "naip_tif":
            path = naip[-1 - rep % len(naip)]
        elif kind == "landsat_tif":
            path = landsat[-1 - rep % len(landsat)]
        else:
            path = ben
        suffix = ".tar.gz" if path.name.endswith(".tar.gz") else path.suffix
        inputs.append(
            Input(kind, f"input/{i:02d}-{kind}-{path.name[: -len(suffix)]}{suffix}", path)
        )
    return warmup, inputs


# -- running one wrapper ----------------------------------------------------------------------


class _Collector:
    """Collects the reports of a workflow's ``SUCCESS`` status events on ``monitoring.notify``."""

    def __init__(self, workflow: str, keys: Sequence[str]):
        self.workflow = workflow
        self.pending = set(keys)
        self.reports: dict[str, StepReport] = {}
        self.at: dict[str, float] = {}
        self.load: dict[str, float] = {}

    def __call__(self, topic: str, value: dict) -> bool:
        if value.get("workflow_name") != self.workflow:
            return False
        nec = value.get("nec") or {}
        if topic == DEAD_LETTER_TOPIC or value.get("status") == "CRITICAL":
            raise RuntimeError(
                f"{self.workflow}: a message failed: "
                f"{value.get('error') or nec.get('reason') or value.get('description')}"
            )
        if value.get("status") == "SUCCESS" and "stats" in nec:
            report = StepReport.from_wire(nec["stats"])
            key = report.input_key
            if key in self.pending:
                self.pending.discard(key)
                self.reports[key] = report
                self.at[key] = time.perf_counter()
                self.load[key] = os.getloadavg()[0]
                print(
                    f"  {key}: {report.result.tiles} tiles, step "
                    f"{report.s3_get_s + report.process_s + report.s3_put_s:.2f} s",
                    flush=True,
                )
        return not self.pending


def _step(key: str) -> dict:
    folder, filename = key.rsplit("/", 1)
    return {
        "previous_component_end": True,
        "S3_bucket_desc": {"folder": folder, "filename": filename},
        "meta_information": {"source": "nec-serve pipeline benchmark"},
    }


def run_wrapper(
    stack, server: str, export_dir: Path, warmup: Input, inputs: Sequence[Input], work: Path, args
) -> list[tuple[Input, StepReport, float, float]]:
    """Run one compress wrapper (Kafka trigger) over ``inputs``.

    Returns ``(input, report, wall_s, load average)`` per message, in the order they finished.
    """
    tag = f"nec-bench-{server}"
    t_in, t_out = f"{tag}.in", f"{tag}.out"
    store = work / f"configs-{server}"
    LocalConfigStore(store).put(
        parse_workflow(
            workflow_message(
                "published", "nec-compress", t_in, t_out, stack.s3, bucket=BUCKET, workflow=tag
            )
        )
    )
    create_topics(stack.bootstrap, [t_in, t_out, STATUS_TOPIC, DEAD_LETTER_TOPIC])
    log = work / f"wrapper-{server}.log"
    steps = work / f"steps-{server}"
    steps.mkdir(exist_ok=True)
    cli = wrapper_args(
        "compress",
        export_dir,
        stack.bootstrap,
        store,
        steps,
        trigger="kafka",
        server=stack.triton_url if server == "triton" else None,
        bands="1,2,3",
        batch_size=args.batch_size,
        group=tag,
    )
    proc = spawn_cli(cli, log)
    consumer = json_consumer(stack.bootstrap, STATUS_TOPIC, DEAD_LETTER_TOPIC)
    producer = json_producer(stack.bootstrap)
    try:
        t0 = time.perf_counter()
        producer.send(t_in, _step(warmup.key)).get(30)
        if not follow(consumer, _Collector(tag, [warmup.key]), args.timeout, [(proc, log)]):
            raise RuntimeError(f"warm-up not finished after {args.timeout} s; log {log}")
        print(f"[{server}] wrapper up and warmed up ({time.perf_counter() - t0:.1f} s)")
        collector = _Collector(tag, [i.key for i in inputs])
        t_sent = time.perf_counter()
        for item in inputs:
            producer.send(t_in, _step(item.key)).get(30)
        if not follow(consumer, collector, args.timeout, [(proc, log)]):
            raise RuntimeError(
                f"{len(collector.pending)} messages not finished after {args.timeout} s; log {log}"
            )
    finally:
        stop_processes([proc])
        consumer.close()
        producer.close()
    done = sorted(inputs, key=lambda i: collector.at[i.key])
    out, last = [], t_sent
    for item in done:
        at = collector.at[item.key]
        out.append((item, collector.reports[item.key], at - last, collector.load[item.key]))
        last = at
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="artifacts/demo/export/mae_vit_compress_adapter")
    p.add_argument("--server", nargs="+", choices=SERVERS, default=["triton"])
    p.add_argument("--messages", type=int, default=8, help="step messages per server mode")
    p.add_argument("--batch-size", type=int, default=8, help="the wrapper's --batch-size")
    p.add_argument("--data", help="data folder (default: as the demo's, nec_dev.data)")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait per phase")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pipeline.csv"))
    p.add_argument("--work", type=Path, help="logs of the stack and wrappers (default: temp)")
    args = p.parse_args()
    # kafka-python 2.x flags the project's plain-callable (de)serializers; they work.
    warnings.filterwarnings(
        "ignore", "(key|value)_serializer does not implement", DeprecationWarning
    )
    if args.messages < 1:
        p.error("--messages must be >= 1")
    data = resolve_data(args.data)
    print(f"data: {data.describe()}")

    export_dir = Path(args.model_dir).resolve()
    bundle = ModelBundle.load(export_dir)
    context = {
        "machine": machine_description(),
        "model": bundle.manifest.model,
        "img_size": bundle.img_size,
        "trigger": "kafka",
    }
    servers = list(dict.fromkeys(args.server))
    rows: list[dict] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nec-bench-pipeline-") as tmp:
        work = (args.work or Path(tmp) / "work").resolve()
        work.mkdir(parents=True, exist_ok=True)
        inputs_dir = Path(tmp) / "inputs"
        inputs_dir.mkdir()
        calibration = Path((bundle.manifest.calibration or {}).get("source") or "")
        warmup, inputs = prepare_inputs(data.root, inputs_dir, args.messages, [calibration.name])
        repository = export_dir / "model_repository_local" if "triton" in servers else None
        with local_stack(repository, work) as stack:
            print(f"[stack] {stack.describe()} (up in {stack.start_s:.1f} s)")
            s3 = stack.s3.client()
            s3.create_bucket(Bucket=BUCKET)
            for item in {i.key: i for i in (warmup, *inputs)}.values():
                s3.upload_file(str(item.path), BUCKET, item.key)
            for server in servers:
                print(f"[{server}] {len(inputs)} messages through one compress wrapper")
                results = run_wrapper(stack, server, export_dir, warmup, inputs, work, args)
                mode_rows = [
                    message_row(
                        report,
                        kind=item.kind,
                        server=server,
                        wall_s=wall,
                        context=context,
                        load_1m=load,
                    )
                    for item, report, wall, load in results
                ]
                rows += [*mode_rows, total_row(mode_rows)]
    print(f"\nbenchmark finished in {time.perf_counter() - t_start:.1f} s ({context['machine']})")
    print(format_table(rows))
    write_csv(rows, args.out)
    png = args.out.with_suffix(".png")
    plot_stages(
        rows,
        png,
        f"one compress wrapper, {context['model']} {context['img_size']} px, "
        f"Kafka trigger, {context['machine']}",
    )
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
