"""Encoder latency and throughput: in-process onnxruntime vs the local Triton server.

One run, same machine, same export, same input (real NAIP tiles): the encoder graph
in-process with onnxruntime, then through ``tritonserver`` (PyTriton's bundled binary,
Python backend running the same ONNX graph) over gRPC, HTTP and gRPC + system shared
memory. Reports p50/p90/p99 latency per request and images/s, and the overhead of each
path against in-process at the same batch size: the ratio of median latencies (and, in
``overhead_mean_pct_*``, of mean throughput). The paths take turns call by call, so load
from elsewhere falls on all of them alike. Writes ``benchmarks/results/serving.csv`` and
``serving.png``.

    python benchmarks/bench_serving.py --model-dir artifacts/demo/export/mae_vit_compress_adapter
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from nec_dev.data import resolve_data
from nec_dev.perf import latency_stats, machine_description, write_rows
from nec_dev.triton import LocalTritonServer
from nec_serve.bundle import ModelBundle
from nec_serve.engines import LocalEngine
from nec_serve.imagery import read_raster, tile_image
from nec_serve.serving.client import TritonEngine


def real_tiles(bundle: ModelBundle, n: int, data: Path) -> np.ndarray:
    scene = read_raster(data / "naip" / "m_4709963_se_14_1_20180716.tif", [1, 2, 3])
    tiles, _ = tile_image(scene, bundle.img_size)
    tiles = np.concatenate([tiles] * (1 + n // len(tiles)))[:n]
    return bundle.normalisation(scene.dtype).apply(tiles).astype(np.float32)


def interleaved(fns: dict, batch: np.ndarray, iters: int, warmup: int) -> dict[str, np.ndarray]:
    """Seconds per call of each path, the paths taking turns (rotating order) each round.

    On a shared machine a burst of load then lands on every path alike, rather than on
    whichever path happened to be measured at the time.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name](batch)
    secs: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iters):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            fns[name](batch)
            secs[name].append(time.perf_counter() - t0)
    return {n: np.array(v) for n, v in secs.items()}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 3.6), squeeze=False)
    for ax, b in zip(axes[0], batches, strict=True):
        rs = [r for r in rows if r["batch"] == b]
        y = np.arange(len(rs))
        p50 = [r["latency_ms_p50"] for r in rs]
        p90 = [r["latency_ms_p90"] - r["latency_ms_p50"] for r in rs]
        ax.barh(y, p50, xerr=[np.zeros(len(rs)), p90], color="tab:blue", alpha=0.8)
        ax.set_yticks(y, [r["path"] for r in rs])
        for yi, r in zip(y, rs, strict=True):
            ax.annotate(
                f" {r['overhead_pct_vs_in_process']:+.1f} %",
                (r["latency_ms_p50"], yi),
                va="center",
                fontsize=8,
            )
        ax.invert_yaxis()
        ax.set_xlabel("latency per request, ms (bar p50, whisker p90)")
        ax.set_title(f"batch {b}")
    fig.suptitle(f"NEC encoder: in-process vs local tritonserver ({rows[0]['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="artifacts/demo/export/mae_vit_compress_adapter")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/serving.csv")
    p.add_argument("--data", help="data folder (default: as the demo's, nec_dev.data)")
    args = p.parse_args()
    data = resolve_data(args.data)
    print(f"data: {data.describe()}")

    bundle = ModelBundle.load(args.model_dir)
    local = LocalEngine(bundle)
    machine = machine_description()
    rows = []
    with LocalTritonServer(bundle.root / "model_repository_local") as server:
        engines = {
            "in-process onnxruntime": local,
            "triton grpc": TritonEngine(f"grpc://{server.grpc_url}", bundle),
            "triton http": TritonEngine(f"http://{server.http_url}", bundle),
            "triton grpc+shm": TritonEngine(
                f"grpc://{server.grpc_url}", bundle, shared_memory=True
            ),
        }
        # Symbols only, as the wrapper asks; in-process computes both anyway.
        fns = {
            name: (
                e.encode_symbols if isinstance(e, TritonEngine) else (lambda x, e=e: e.encode(x)[0])
            )
            for name, e in engines.items()
        }
        for b in args.batch:
            batch = real_tiles(bundle, b, data.root)
            secs = interleaved(fns, batch, args.iters, args.warmup)
            base = latency_stats(secs["in-process onnxruntime"], b)
            for name, s in secs.items():
                r = latency_stats(s, b)
                rows.append(
                    {
                        "model": bundle.manifest.model,
                        "img_size": bundle.img_size,
                        "path": name,
                        "batch": b,
                        "iters": args.iters,
                        **r,
                        # Medians: robust to the odd slow call on a shared machine.
                        "overhead_pct_vs_in_process": round(
                            100 * (r["latency_ms_p50"] / base["latency_ms_p50"] - 1), 1
                        ),
                        "overhead_mean_pct_vs_in_process": round(
                            100 * (base["throughput_img_per_s"] / r["throughput_img_per_s"] - 1), 1
                        ),
                        "machine": machine,
                    }
                )
                print(rows[-1])
        for e in engines.values():
            if isinstance(e, TritonEngine):
                e.close()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_rows(out, rows)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
