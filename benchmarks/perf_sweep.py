"""perf_analyzer sweep of the NEC encoder and decoder: throughput vs latency per configuration.

For each server configuration (``--configs``: instances, max batch, dynamic-batching delay)
it writes a model repository beside the export's ``model_repository_local`` (same graphs,
edited ``config.pbtxt``), starts the local ``tritonserver`` on it and runs the pinned
perf_analyzer (``scripts/fetch_perf_analyzer.sh``, fetched on first use) for each model,
protocol (gRPC, HTTP) and batch size over the concurrency values. With ``--grpc-url`` and
``--http-url`` it measures a server that is already running instead (a GPU Triton, say) and
leaves its configuration alone.

Inputs are real: NAIP tiles from ``--data`` (default: as the demo finds it, ``nec_dev.data``)
normalised as the wrapper does, and for the decoders the symbols the encoder makes of them
(``--input zero`` sends zeros instead).

Writes to ``--out`` (default ``benchmarks/results``):

- ``perf_analyzer/<run>_<model>_<protocol>_<config>_b<batch>_c<concurrency>.csv``:
  perf_analyzer's own CSV
- ``perf_sweep.csv``: every measurement, one row per concurrency, units in the field names;
  a curve measured again replaces its old rows and the others stay, so a CPU and a GPU sweep
  made on different machines (``--run``), or one sweep made in several invocations, end up
  side by side
- ``perf_sweep.png``: throughput vs p50/p95/p99 latency, one curve per configuration
- ``perf_sweep.md``: best throughput and lowest p99 per run and model

    python benchmarks/perf_sweep.py --model-dir artifacts/demo/export/mae_vit_compress_adapter
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nec_dev.data import resolve_data
from nec_dev.perf import (
    PERF_ANALYZER_VERSION,
    SERIES_KEYS,
    PerfError,
    Variant,
    ensure_perf_analyzer,
    machine_description,
    merge_runs,
    perf_analyzer_command,
    plot_curves,
    read_rows,
    run_until_stable,
    summary_markdown,
    write_input_data,
    write_rows,
    write_variant_repository,
)
from nec_dev.triton import LocalTritonServer
from nec_serve.bundle import ModelBundle
from nec_serve.contract import GraphRole
from nec_serve.engines import LocalEngine
from nec_serve.imagery import read_raster, tile_image

SCENE = "naip/m_4709963_se_14_1_20180716.tif"
_NOT_MEASURED = "- not measured: "


def real_tiles(bundle: ModelBundle, n: int, data: Path) -> np.ndarray:
    """``n`` normalised tiles of a real NAIP scene (RGB), as the wrapper feeds the encoder."""
    scene = read_raster(data / SCENE, list(range(1, bundle.in_chans + 1)))
    tiles, _ = tile_image(scene, bundle.img_size)
    # Spread over the scene, not its first row of tiles.
    pick = np.linspace(0, len(tiles) - 1, num=min(n, len(tiles))).astype(int)
    return bundle.normalisation(scene.dtype).apply(tiles[pick]).astype(np.float32)


def input_files(bundle: ModelBundle, kind: str, n: int, data: Path, tmp: Path) -> dict[str, str]:
    """perf_analyzer --input-data per served model: JSON files of real tiles/symbols, or 'zero'.

    The encoder gets tiles, every other graph of the export the symbols the encoder makes.
    """
    graphs = bundle.manifest.graphs
    if kind == "zero":
        return {g.name: "zero" for g in graphs.values()}
    tiles = real_tiles(bundle, n, data)
    symbols, _ = LocalEngine(bundle).encode(tiles)
    files = {}
    for role, graph in graphs.items():
        array = tiles if role == GraphRole.ENCODER else symbols
        path = tmp / f"{role.value}.json"
        files[graph.name] = str(write_input_data(path, {graph.inputs[0].name: array}))
    return files


def served_models(bundle: ModelBundle, names: list[str]) -> list[str]:
    """The served model names of ``names``: graph roles of the export, or names as given."""
    by_role = {role.value: graph.name for role, graph in bundle.manifest.graphs.items()}
    return [by_role.get(n, n) for n in names]


class Sweep:
    """The measurements of one run: perf_analyzer per model, protocol, batch, concurrency."""

    def __init__(self, args, bundle: ModelBundle, binary: Path, tmp: Path):
        self.args, self.bundle, self.binary = args, bundle, binary
        self.inputs = input_files(bundle, args.input, args.tiles, args.data, tmp)
        self.encoder = bundle.manifest.graph(GraphRole.ENCODER).name
        self.raw_dir = args.out / "perf_analyzer"
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        self.machine = machine_description()
        self.rows: list[dict] = []
        self.failures: list[str] = []
        self.first_config: str | None = None
        self.tried: set[str] = set()  # the points attempted, as tags

    def server(self, config: str, max_batch: int, urls: dict[str, str], metrics: str | None):
        """Every model, protocol, batch and concurrency against one server configuration."""
        args = self.args
        self.first_config = self.first_config or config
        for model in args.models:
            if args.decoder_first_config_only and model != self.encoder:
                if config != self.first_config:
                    continue
            for protocol in args.protocols:
                for batch in args.batch:
                    if batch > max_batch:
                        print(f"  skip {model} b{batch}: above max batch {max_batch}")
                        continue
                    for conc in sorted(set(args.concurrency)):
                        self.point(config, model, protocol, urls[protocol], batch, conc, metrics)

    def point(self, config, model, protocol, url, batch, conc, metrics) -> None:
        """One perf_analyzer measurement; kept, or listed as a failure, never fatal."""
        args = self.args
        tag = f"{args.run}_{model}_{protocol}_{config}_b{batch}_c{conc}"
        self.tried.add(tag)
        t0 = time.perf_counter()

        def command(window_ms: int) -> list[str]:
            return perf_analyzer_command(
                self.binary,
                model=model,
                url=url,
                protocol=protocol,
                batch=batch,
                concurrency=[conc],
                input_data=self.inputs[model],
                csv_path=self.raw_dir / f"{tag}.csv",
                measurement_ms=window_ms,
                stability_pct=args.stability_pct,
                max_trials=args.max_trials,
                metrics_url=metrics,
            )

        try:
            parsed, window = run_until_stable(
                command, args.measurement_ms, args.retries, args.timeout_s
            )
        except PerfError as err:
            self.failures.append(f"{tag}: {str(err).splitlines()[-1]}")
            print(f"  FAILED {tag}: {err}")
            return
        for r in parsed:
            self.rows.append(
                {
                    "run": args.run,
                    "machine": self.machine,
                    "model": model,
                    "export": self.bundle.manifest.model,
                    "img_size": self.bundle.img_size,
                    "protocol": protocol,
                    "config": config,
                    "batch": batch,
                    "input": args.input,
                    "perf_analyzer": PERF_ANALYZER_VERSION,
                    "measurement_ms": window,
                    **r,
                }
            )
            print(
                f"  {model} {protocol} {config} b{batch} c{r['concurrency']}: "
                f"{r['throughput_infer_per_s']:.1f} inf/s, "
                f"p50 {r['latency_us_p50'] / 1e3:.1f} ms, p99 {r['latency_us_p99'] / 1e3:.1f} ms "
                f"({time.perf_counter() - t0:.0f} s)"
            )


def sweep(args, bundle: ModelBundle, binary: Path, tmp: Path) -> Sweep:
    """Run the sweep: against ``--grpc-url``/``--http-url``, or local servers per config."""
    run = Sweep(args, bundle, binary, tmp)
    if args.grpc_url or args.http_url:
        urls = {"grpc": args.grpc_url, "http": args.http_url}
        run.server(args.config_label, max(args.batch), urls, args.metrics_url)
        return run

    for variant in [Variant.parse(c) for c in args.configs]:
        repo = write_variant_repository(
            bundle.root / f"model_repository_{args.repository}",
            tmp / f"repo-{variant.name}",
            variant,
            sorted(set(args.models)),
        )
        print(f"[{variant.name}] {variant.label}: starting tritonserver")
        with LocalTritonServer(repo, log_path=tmp / f"triton-{variant.name}.log") as server:
            metrics = f"127.0.0.1:{server.metrics_port}/metrics" if args.collect_metrics else None
            urls = {"grpc": server.grpc_url, "http": server.http_url}
            run.server(variant.name, variant.max_batch, urls, metrics)
    return run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="artifacts/demo/export/mae_vit_compress_adapter")
    p.add_argument(
        "--repository",
        default="local",
        choices=["local", "torch"],
        help="the export's repository the local servers start from (torch: PyTorch, GPU if any)",
    )
    p.add_argument("--run", default="cpu", help="label of this machine's rows (cpu, gpu, ...)")
    p.add_argument(
        "--models",
        nargs="+",
        help="graph roles (encoder, decoder, decoder_block1) or served model names to measure "
        "(default: encoder decoder)",
    )
    p.add_argument("--protocols", nargs="+", default=["grpc", "http"], choices=["grpc", "http"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--configs",
        nargs="+",
        default=["i1-b8-d5000", "i2-b8-d5000", "i1-b8-d-"],
        help="server configurations: i<instances>-b<max batch>-d<delay us, or - for none>",
    )
    p.add_argument(
        "--decoder-first-config-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sweep the decoders with the first configuration only (they are cheap)",
    )
    p.add_argument("--input", choices=["real", "zero"], default="real")
    p.add_argument("--tiles", type=int, default=8, help="real tiles in the input data")
    p.add_argument("--data", help="data folder (default: as the demo's, nec_dev.data)")
    p.add_argument("--measurement-ms", type=int, default=5000)
    p.add_argument("--stability-pct", type=int, default=20)
    p.add_argument("--max-trials", type=int, default=6)
    p.add_argument("--retries", type=int, default=2, help="doubling the window when unstable")
    p.add_argument("--timeout-s", type=float, default=900)
    p.add_argument("--collect-metrics", action="store_true", help="GPU metrics from Triton")
    p.add_argument("--grpc-url", help="host:port of a running server (no local server)")
    p.add_argument("--http-url", help="host:port of a running server (no local server)")
    p.add_argument("--metrics-url", help="with --grpc-url/--http-url and --collect-metrics")
    p.add_argument("--config-label", default="as-deployed", help="with --grpc-url/--http-url")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: redraw the curves and the summary from perf_sweep.csv",
    )
    return p


def _measure(args, bundle: ModelBundle, table: Path, failures: list[str]):
    """Sweep, merge the rows into ``table``; (all rows, failures still standing)."""
    if args.input == "real":
        data = resolve_data(args.data)
        print(f"data: {data.describe()}")
        args.data = data.root
    binary = ensure_perf_analyzer()
    with tempfile.TemporaryDirectory(prefix="nec-perf-") as tmp:
        run = sweep(args, bundle, binary, Path(tmp))
    # Earlier failures stay listed unless this run tried that point again.
    failures = [f for f in failures if f.split(":")[0] not in run.tried] + run.failures
    merged = merge_runs(read_rows(table), run.rows, SERIES_KEYS)
    write_rows(table, merged)
    return merged, failures


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.grpc_url is None and args.http_url is None:
        pass
    elif ("grpc" in args.protocols and not args.grpc_url) or (
        "http" in args.protocols and not args.http_url
    ):
        p.error("give --grpc-url and --http-url for the protocols swept, or neither")

    bundle = ModelBundle.load(args.model_dir)
    args.models = served_models(bundle, args.models or ["encoder", "decoder"])
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    table, md = args.out / "perf_sweep.csv", args.out / "perf_sweep.md"
    old = md.read_text().splitlines() if md.is_file() else []
    failures = [x.removeprefix(_NOT_MEASURED) for x in old if x.startswith(_NOT_MEASURED)]
    if args.report_only:
        merged = read_rows(table)
        if not merged:
            p.error(f"--report-only: no measurements in {table}")
    else:
        merged, failures = _measure(args, bundle, table, failures)
    plot_curves(
        merged,
        args.out / "perf_sweep.png",
        title=f"NEC {bundle.manifest.model} {bundle.img_size} px, perf_analyzer "
        f"{PERF_ANALYZER_VERSION}, {args.input} input",
    )
    summary = summary_markdown(merged)
    md.write_text(
        "# perf_analyzer sweep\n\nThroughput counts inferences (images for the encoder); "
        "latency is per request as the client sees it.\n\n"
        + summary
        + "".join(f"\n{_NOT_MEASURED}{f}" for f in failures)
    )
    print(summary)
    for f in failures:
        print(f"not measured: {f}")
    print(f"wrote {table}, perf_sweep.png, perf_sweep.md ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
