"""Encoder latency and throughput: in-process onnxruntime vs the local Triton server.

One run, same machine, same export, same input (real NAIP tiles): the encoder graph
in-process with onnxruntime, then through ``tritonserver`` (PyTriton's bundled binary,
Python backend running the same ONNX graph) over gRPC, HTTP and gRPC + system shared
memory. Reports p50/p90/p99 latency per request and images/s, and the overhead of each
path against in-process at the same batch size. Writes ``benchmarks/results/serving.csv``.

    python benchmarks/bench_serving.py --model-dir artifacts/demo/export/mae_vit_compress_adapter
"""

from __future__ import annotations

import argparse
import csv
import platform
import time
from pathlib import Path

import numpy as np

from nec_serve.imagery import Normalisation, read_raster, tile_image
from nec_serve.pipeline import LocalEngine, ModelBundle
from nec_serve.serving.client import TritonEngine
from nec_serve.serving.local import LocalTritonServer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def real_tiles(bundle: ModelBundle, n: int) -> np.ndarray:
    scene = read_raster(DATA / "naip" / "m_4709963_se_14_1_20180716.tif", [1, 2, 3])
    tiles, _ = tile_image(scene, bundle.img_size)
    tiles = np.concatenate([tiles] * (1 + n // len(tiles)))[:n]
    return Normalisation.for_dtype(scene.dtype, 3).apply(tiles).astype(np.float32)


def measure(fn, batch: np.ndarray, iters: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn(batch)
    lat = []
    t_all = time.perf_counter()
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(batch)
        lat.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    ms = np.array(lat) * 1e3
    return {
        "latency_ms_p50": round(float(np.percentile(ms, 50)), 2),
        "latency_ms_p90": round(float(np.percentile(ms, 90)), 2),
        "latency_ms_p99": round(float(np.percentile(ms, 99)), 2),
        "throughput_img_per_s": round(iters * len(batch) / total, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="artifacts/demo/export/mae_vit_compress_adapter")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/serving.csv")
    args = p.parse_args()

    bundle = ModelBundle.load(args.model_dir)
    local = LocalEngine(bundle)
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
        for b in args.batch:
            batch = real_tiles(bundle, b)
            base = None
            for name, engine in engines.items():
                # Symbols only, as the wrapper asks; in-process computes both anyway.
                fn = (
                    engine.encode_symbols
                    if hasattr(engine, "encode_symbols")
                    else (lambda x, e=engine: e.encode(x)[0])
                )
                r = measure(fn, batch, args.iters, args.warmup)
                base = base or r
                rows.append(
                    {
                        "model": bundle.manifest["model"],
                        "img_size": bundle.img_size,
                        "path": name,
                        "batch": b,
                        **r,
                        "overhead_pct_vs_in_process": round(
                            100 * (base["throughput_img_per_s"] / r["throughput_img_per_s"] - 1), 1
                        ),
                        "machine": f"{platform.processor() or platform.machine()} "
                        f"{__import__('os').cpu_count()} cores",
                    }
                )
                print(rows[-1])
        for e in engines.values():
            if isinstance(e, TritonEngine):
                e.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
