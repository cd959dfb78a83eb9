"""perf_analyzer sweeps against the inference server: inputs, commands, CSV, curves, report.

Triton's ``perf_analyzer`` (pinned wheel, fetched by ``scripts/fetch_perf_analyzer.sh``) drives
the server with a fixed number of requests in flight (its concurrency) and measures
throughput and client-side latency percentiles; with Triton it also reads the server's
statistics (queue, compute) for each measurement. This module holds the parts of a sweep
that are worth testing on their own:

- :func:`write_input_data`: perf_analyzer's ``--input-data`` JSON from real arrays. Its
  default "random" input is raw random bits (NaN, values up to 3.4e38), which is not an
  image; the sweep sends real tiles (or zeros, and says which).
- :class:`Variant` and :func:`write_variant_repository`: one server configuration
  (instances, max batch size, dynamic-batching delay) as a model repository beside the
  exported one, its ``config.pbtxt`` rebuilt by export's config builder
  (``nec_export.triton.triton_config``), so the sweep measures what export writes.
- :func:`perf_analyzer_command`, :func:`run_perf_analyzer`: the command line and its run.
- :func:`parse_perf_csv`: perf_analyzer's CSV to rows whose field names carry their units.
- :func:`merge_runs`, :func:`plot_curves`, :func:`summary_markdown`: results of several
  runs (a CPU and a GPU machine, say) in one CSV, one figure and one table.

``benchmarks/perf_sweep.py`` is the command that strings these together.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nec_dev.process import run_fetch_script
from nec_serve.errors import NecError

__all__ = [
    "PERF_ANALYZER_VERSION",
    "SERIES_KEYS",
    "PerfError",
    "Variant",
    "ensure_perf_analyzer",
    "latency_stats",
    "machine_description",
    "merge_runs",
    "parse_perf_csv",
    "perf_analyzer_command",
    "plot_curves",
    "read_rows",
    "run_perf_analyzer",
    "run_until_stable",
    "summary_markdown",
    "write_input_data",
    "write_rows",
    "write_variant_repository",
]

#: perf_analyzer release that ``scripts/fetch_perf_analyzer.sh`` pins.
PERF_ANALYZER_VERSION = "2.60.0"

_ROOT = Path(__file__).resolve().parents[1]
_FETCH_SCRIPT = _ROOT / "scripts" / "fetch_perf_analyzer.sh"


class PerfError(NecError):
    """perf_analyzer could not be fetched or run, or printed something we cannot read."""


# -- perf_analyzer's CSV ---------------------------------------------------------------------

#: perf_analyzer's column -> (our field, its type). Times are microseconds; throughput is
#: inferences (images, for the encoder) per second, i.e. requests x batch size.
_COLUMNS: dict[str, tuple[str, type]] = {
    "Concurrency": ("concurrency", int),
    "Request Rate": ("request_rate_per_s", float),
    "Inferences/Second": ("throughput_infer_per_s", float),
    "Client Send": ("client_send_us", float),
    "Network+Server Send/Recv": ("network_server_send_recv_us", float),
    "Server Queue": ("server_queue_us", float),
    "Server Compute Input": ("server_compute_input_us", float),
    "Server Compute Infer": ("server_compute_infer_us", float),
    "Server Compute Output": ("server_compute_output_us", float),
    "Client Recv": ("client_recv_us", float),
    "p50 latency": ("latency_us_p50", float),
    "p90 latency": ("latency_us_p90", float),
    "p95 latency": ("latency_us_p95", float),
    "p99 latency": ("latency_us_p99", float),
    "Avg latency": ("latency_us_avg", float),
    "request/response": ("request_response_us", float),
    "response wait": ("response_wait_us", float),
    # --collect-metrics: "uuid:value;" per GPU, kept as printed.
    "Avg GPU Utilization": ("gpu_utilization_raw", str),
    "Avg GPU Power Usage": ("gpu_power_raw", str),
    "Max GPU Memory Usage": ("gpu_memory_max_raw", str),
    "Total GPU Memory": ("gpu_memory_total_raw", str),
}
_REQUIRED = ("Inferences/Second", "p50 latency", "p99 latency")


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _field_for(column: str) -> tuple[str, type]:
    if column in _COLUMNS:
        return _COLUMNS[column]
    # A column this table does not know (a newer perf_analyzer): keep it, as text.
    return re.sub(r"[^a-z0-9]+", "_", column.lower()).strip("_") + "_raw", str


def parse_perf_csv(text: str) -> list[dict]:
    """Rows of perf_analyzer's ``-f`` CSV, one per concurrency (or request rate).

    Field names carry units (``latency_us_p99``, ``throughput_infer_per_s``); empty cells
    become ``None``. Raises :class:`PerfError` naming the line or column that is wrong.
    """
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header or not any(cell.strip() for cell in header):
        raise PerfError("perf_analyzer CSV is empty")
    header = [h.strip() for h in header]
    missing = [c for c in _REQUIRED if c not in header]
    if "Concurrency" not in header and "Request Rate" not in header:
        missing.insert(0, "Concurrency")
    if missing:
        raise PerfError(f"perf_analyzer CSV has no column {', '.join(map(repr, missing))}")
    fields = [_field_for(h) for h in header]
    rows = []
    for lineno, cells in enumerate(reader, start=2):
        if not cells or not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise PerfError(
                f"perf_analyzer CSV line {lineno} has {len(cells)} cells, the header {len(header)}"
            )
        row: dict = {}
        for (name, kind), column, cell in zip(fields, header, cells, strict=True):
            cell = cell.strip()
            if cell == "":
                row[name] = None
                continue
            try:
                row[name] = kind(float(cell)) if kind is int else kind(cell)
            except ValueError:
                raise PerfError(
                    f"perf_analyzer CSV line {lineno}: {column!r} is {cell!r}, not a number"
                ) from None
        rows.append(row)
    if not rows:
        raise PerfError("perf_analyzer CSV has a header and no measurements")
    return rows


# -- inputs ----------------------------------------------------------------------------------


def write_input_data(path: str | Path, tensors: Mapping[str, np.ndarray]) -> Path:
    """Write perf_analyzer ``--input-data`` JSON: one entry per sample, exact bytes (base64).

    ``tensors`` maps each model input to an array whose first axis is the sample; every
    input needs the same number of samples. perf_analyzer cycles through the entries.
    """
    if not tensors:
        raise ValueError("no input tensors")
    counts = {name: len(arr) for name, arr in tensors.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise ValueError(f"inputs need the same, non-zero number of samples, got {counts}")
    entries = []
    for i in range(next(iter(counts.values()))):
        entry = {}
        for name, arr in tensors.items():
            sample = np.ascontiguousarray(arr[i])
            if sample.dtype.byteorder == ">":
                raise ValueError(f"input {name!r} is big-endian; Triton expects little-endian")
            entry[name] = {
                "b64": base64.b64encode(sample.tobytes()).decode("ascii"),
                "shape": list(sample.shape),
            }
        entries.append(entry)
    path = Path(path)
    path.write_text(json.dumps({"data": entries}))
    return path


# -- server configurations -------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One server configuration to sweep: instances, max batch size, batching delay."""

    instances: int = 1
    max_batch: int = 8
    delay_us: int = 5000  # dynamic batching max_queue_delay_microseconds; -1 = no batcher

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """``"i2-b8-d500"``: 2 instances, max batch 8, 500 us delay; ``d-`` = no batcher."""
        m = re.fullmatch(r"i(\d+)-b(\d+)-d(\d+|-)", spec.strip())
        if not m or int(m[1]) < 1 or int(m[2]) < 1:
            raise ValueError(
                f"server configuration {spec!r} is not like 'i1-b8-d5000' "
                "(instances >= 1, max batch >= 1, dynamic batching delay in us or '-' for none)"
            )
        return cls(int(m[1]), int(m[2]), -1 if m[3] == "-" else int(m[3]))

    @property
    def name(self) -> str:
        """Short spec, as parsed: ``i1-b8-d5000``."""
        delay = "-" if self.delay_us < 0 else str(self.delay_us)
        return f"i{self.instances}-b{self.max_batch}-d{delay}"

    @property
    def label(self) -> str:
        """For people: ``1 inst, max batch 8, delay 5000 us``."""
        batcher = "no batcher" if self.delay_us < 0 else f"delay {self.delay_us} us"
        return f"{self.instances} inst, max batch {self.max_batch}, {batcher}"


def write_variant_repository(
    source: str | Path, dest: str | Path, variant: Variant, models: Iterable[str]
) -> Path:
    """A model repository at ``dest`` serving ``models`` of ``source`` under ``variant``.

    Version directories are linked, not copied. Each ``config.pbtxt`` is parsed with
    Triton's ``ModelConfig`` protobuf for what the variant keeps (tensors, backend,
    parameters) and rebuilt by export's builder (``nec_export.triton.triton_config``) with
    the variant's instance count, max batch size and batching delay, and export's preferred
    batch sizes: the sweep measures configurations export writes. With several instances on
    the CPU the onnxruntime threads are split between them.
    """
    # On use: tritonclient's gRPC protobufs cannot share a process with kserve (#3099), and
    # nec_export's package imports PyTorch.
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from nec_export.triton import Kind, to_pbtxt, triton_config
    from nec_serve.contract import DataType, TensorSpec

    def specs(tensors) -> tuple[TensorSpec, ...]:
        return tuple(
            TensorSpec(t.name, DataType(model_config_pb2.DataType.Name(t.data_type)), t.dims)
            for t in tensors
        )

    source, dest = Path(source), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for model in models:
        src = source / model
        if not (src / "config.pbtxt").is_file():
            raise PerfError(f"model {model!r} is not in repository {source}")
        config = text_format.Parse(
            (src / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        if config.max_batch_size == 0:
            raise PerfError(f"model {model!r} in {source} does not batch (max_batch_size 0)")
        parameters = {k: v.string_value for k, v in config.parameters.items()}
        if "intra_op_thread_count" in parameters and variant.instances > 1:
            threads = max(1, (os.cpu_count() or 1) // variant.instances)
            parameters["intra_op_thread_count"] = str(threads)
        built = triton_config(
            config.name or model,
            specs(config.input),
            specs(config.output),
            kind=Kind.KIND_CPU,
            backend=config.backend,
            max_batch_size=variant.max_batch,
            instances=variant.instances,
            max_queue_delay_us=None if variant.delay_us < 0 else variant.delay_us,
            parameters=parameters,
        )
        (dest / model).mkdir()
        (dest / model / "config.pbtxt").write_text(to_pbtxt(built))
        for version in src.iterdir():
            if version.is_dir() and version.name.isdigit():
                (dest / model / version.name).symlink_to(version.resolve())
    return dest


# -- running perf_analyzer -------------------------------------------------------------------


def ensure_perf_analyzer(timeout: float = 600.0) -> Path:
    """The perf_analyzer launcher, fetched on first use (``NEC_PERF_ANALYZER`` overrides)."""
    override = os.environ.get("NEC_PERF_ANALYZER")
    if override:
        path = Path(override)
        if not os.access(path, os.X_OK):
            raise PerfError(f"NEC_PERF_ANALYZER={override} is not an executable file")
        return path
    cache = Path(os.environ.get("NEC_CACHE_DIR", _ROOT / ".cache"))
    launcher = cache / "perf_analyzer" / "perf_analyzer"
    run_fetch_script(
        _FETCH_SCRIPT,
        lambda: os.access(launcher, os.X_OK),
        f"perf_analyzer is not at {launcher}",
        PerfError,
        timeout,
    )
    return launcher


def perf_analyzer_command(
    binary: str | Path,
    *,
    model: str,
    url: str,
    protocol: str,
    batch: int,
    concurrency: Sequence[int],
    input_data: str | Path,
    csv_path: str | Path,
    measurement_ms: int = 5000,
    stability_pct: int = 10,
    max_trials: int = 10,
    metrics_url: str | None = None,
) -> list[str]:
    """The perf_analyzer command line for one model, protocol and batch size.

    ``concurrency`` must be an arithmetic range (``--concurrency-range`` start:end:step).
    """
    if protocol not in ("grpc", "http"):
        raise ValueError(f"protocol {protocol!r} is not 'grpc' or 'http'")
    if batch < 1:
        raise ValueError(f"batch size {batch} must be >= 1")
    (start, end, step) = _as_range(concurrency)
    cmd = [
        str(binary),
        "-m",
        model,
        "-u",
        url,
        "-i",
        protocol,
        "-b",
        str(batch),
        "--concurrency-range",
        f"{start}:{end}:{step}",
        "--input-data",
        str(input_data),
        "--measurement-mode",
        "time_windows",
        "--measurement-interval",
        str(measurement_ms),
        "--stability-percentage",
        str(stability_pct),
        "--max-trials",
        str(max_trials),
        "-f",
        str(csv_path),
        "--verbose-csv",
    ]
    if metrics_url:
        cmd += ["--collect-metrics", "--metrics-url", metrics_url]
    return cmd


def _as_range(values: Sequence[int]) -> tuple[int, int, int]:
    vals = list(values)
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"concurrency values {vals} must be >= 1")
    if len(vals) == 1:
        return vals[0], vals[0], 1
    step = vals[1] - vals[0]
    if step <= 0 or any(b - a != step for a, b in zip(vals, vals[1:], strict=False)):
        raise ValueError(f"concurrency values {vals} are not an arithmetic range")
    return vals[0], vals[-1], step


def run_perf_analyzer(cmd: Sequence[str], timeout_s: float) -> tuple[list[dict], str]:
    """Run perf_analyzer; returns the parsed CSV rows and its printed report."""
    csv_path = Path(cmd[cmd.index("-f") + 1])
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise PerfError(
            f"perf_analyzer did not finish in {timeout_s:.0f} s: {' '.join(cmd)}"
        ) from err
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or not csv_path.is_file():
        tail = "\n".join(out.splitlines()[-15:])
        raise PerfError(f"perf_analyzer failed (status {proc.returncode}):\n{tail}")
    return parse_perf_csv(csv_path.read_text()), out


def run_until_stable(
    command: Callable[[int], list[str]], measurement_ms: int, retries: int, timeout_s: float
) -> tuple[list[dict], int]:
    """Run ``command(window_ms)`` until perf_analyzer finds a stable measurement.

    Each time it finds none, the window doubles, up to ``retries`` times. Returns the rows
    and the window used; other failures raise at once.
    """
    window = measurement_ms
    for attempt in range(retries + 1):
        try:
            rows, _ = run_perf_analyzer(command(window), timeout_s)
            return rows, window
        except PerfError as err:
            if "stable measurement" not in str(err) or attempt == retries:
                raise
            window *= 2
    raise AssertionError("unreachable")  # pragma: no cover


# -- several runs: one CSV, one figure, one table --------------------------------------------


def merge_runs(existing: list[dict], new: list[dict], keys: Sequence[str] = ("run",)) -> list[dict]:
    """Rows of ``existing`` whose ``keys`` no new row has, then ``new``.

    A re-run replaces what it measured again and keeps the rest: by ``run`` alone, one
    machine's rows; by :data:`SERIES_KEYS`, one curve. So a CPU and a GPU sweep made on
    different machines, or a sweep made in several invocations, end up in one file.
    """

    def key(r: Mapping) -> tuple:
        return tuple(str(r.get(k)) for k in keys)

    replaced = {key(r) for r in new}
    return [r for r in existing if key(r) not in replaced] + list(new)


#: The fields that name one curve of a perf_analyzer sweep.
SERIES_KEYS = ("run", "model", "protocol", "config", "batch")


def _series_key(row: Mapping) -> tuple:
    return (row["run"], row["model"], row["protocol"], row["config"], int(row["batch"]))


def plot_curves(rows: Sequence[Mapping], path: str | Path, title: str = "") -> Path:
    """Throughput vs latency (p50, p95, p99), one panel per model, one curve per configuration.

    A curve's points are the concurrency values, in order; x is inferences/s, y latency in ms.
    """
    import matplotlib  # heavy, and only the plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(
        len(models), 3, figsize=(15, 4.2 * len(models)), squeeze=False, sharey="row"
    )
    series: dict[tuple, list[Mapping]] = {}
    for r in rows:
        series.setdefault(_series_key(r), []).append(r)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, model in enumerate(models):
        keys = sorted(k for k in series if k[1] == model)
        for j, pct in enumerate(("p50", "p95", "p99")):
            ax = axes[i][j]
            for n, key in enumerate(keys):
                pts = sorted(series[key], key=lambda r: int(r["concurrency"]))
                x = [float(r["throughput_infer_per_s"]) for r in pts]
                y = [float(r[f"latency_us_{pct}"]) / 1e3 for r in pts]
                run, _, proto, config, batch = key
                ax.plot(
                    x,
                    y,
                    marker="o" if proto == "grpc" else "s",
                    linestyle="-" if proto == "grpc" else "--",
                    color=colours[n % len(colours)],
                    label=f"{run} {proto} {config} b{batch}",
                )
                for r, xi, yi in zip(pts, x, y, strict=True):
                    ax.annotate(str(r["concurrency"]), (xi, yi), fontsize=7, alpha=0.7)
            ax.set_title(f"{model}: {pct} latency")
            ax.set_xlabel("throughput (inferences/s)")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("latency (ms, log)")
        axes[i][2].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ms(us) -> str:
    ms = float(us) / 1e3
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.1f}"


def _server_split(row: Mapping) -> str:
    """Triton's own account of a request (its statistics): time queued, time computing."""
    parts = ("server_compute_input_us", "server_compute_infer_us", "server_compute_output_us")
    if any(row.get(k) in (None, "") for k in ("server_queue_us", *parts)):
        return "-"
    return f"{_ms(row['server_queue_us'])} / {_ms(sum(float(row[k]) for k in parts))}"


def summary_markdown(rows: Sequence[Mapping]) -> str:
    """Per run and model: the best throughput, with its latency, and the lowest latency.

    One table across runs, so a GPU and a CPU sweep sit side by side. Where Triton reported
    its statistics, the best point also shows how much of the latency was queueing and how
    much computing on the server (the rest is the client, the network and the protocol).
    """
    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
        groups.setdefault((r["run"], r["model"]), []).append(r)
    lines = [
        "| run | machine | model | best throughput (inf/s) | at: config, protocol, batch, "
        "concurrency | p50 / p99 there (ms) | server queue / compute there (ms) "
        "| lowest p99 (ms) | at |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (run, model), rs in sorted(groups.items()):
        best = max(rs, key=lambda r: float(r["throughput_infer_per_s"]))
        fast = min(rs, key=lambda r: float(r["latency_us_p99"]))
        lines.append(
            f"| {run} | {best.get('machine', '')} | {model} "
            f"| {float(best['throughput_infer_per_s']):.1f} "
            f"| {best['config']}, {best['protocol']}, b{best['batch']}, c{best['concurrency']} "
            f"| {_ms(best['latency_us_p50'])} / {_ms(best['latency_us_p99'])} "
            f"| {_server_split(best)} "
            f"| {_ms(fast['latency_us_p99'])} "
            f"| {fast['config']}, {fast['protocol']}, b{fast['batch']}, c{fast['concurrency']} |"
        )
    return "\n".join(lines) + "\n"


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a results CSV (text values), or none if the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: str | Path, rows: Sequence[Mapping]) -> None:
    """Write rows to a CSV whose columns are every key, in order of first appearance."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with Path(path).open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def latency_stats(
    secs: np.ndarray, batch: int, percentiles: Sequence[int] = (50, 90, 99), digits: int = 2
) -> dict:
    """Latency percentiles (ms) of timed calls of ``batch`` images, and images per second."""
    ms = np.asarray(secs) * 1e3
    out = {f"latency_ms_p{q}": round(float(np.percentile(ms, q)), digits) for q in percentiles}
    out["throughput_img_per_s"] = round(batch * len(ms) / float(np.sum(secs)), 2)
    return out


def machine_description() -> str:
    """What ran a benchmark: CPU model and cores, and the GPUs nvidia-smi lists, if any."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
                break
    except OSError:
        pass
    desc = f"{cpu or platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout
            gpus = [g.strip() for g in out.splitlines() if g.strip()]
            if gpus:
                desc += f", {len(gpus)} x {gpus[0]}"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return desc
