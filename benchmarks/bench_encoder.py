"""The NEC encoder in-process: the raw-framework upper bound that a server can approach.

Runs the graph the server runs (``EncoderGraph``: images -> symbols, latent) with PyTorch on
the GPU when there is one (``--device auto``), else on the CPU, and optionally the exported
ONNX graph with onnxruntime on the CPU, over image sizes and batch sizes. Weights are random
(``--model`` from the registry): speed does not depend on them.

On CUDA two numbers per point: ``compute`` (inputs already on the GPU, the bound) and
``h2d`` (inputs copied from pinned host memory every call, as a server does). Latency is per
batch, timed after ``torch.cuda.synchronize()``. ``--dtype bf16`` runs under autocast;
the symbols then differ from fp32 at rounding boundaries, so it is for speed only.

Writes ``benchmarks/results/encoder.csv``; rows of other ``--run`` labels already there are
kept, so CPU and GPU runs made on different machines sit together.

    python benchmarks/bench_encoder.py --img-size 224 --batch 1 8              # here, CPU
    python benchmarks/bench_encoder.py --run gpu --img-size 224 256 512 \\
        --batch 1 8 32 64 128 256 --dtype fp32 bf16                              # an H100
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nec_dev.perf import latency_stats, machine_description, merge_runs, read_rows, write_rows
from nec_export.families.nec import EncoderGraph
from nec_models import create_model


def timed(fn, iters: int, warmup: int, sync) -> np.ndarray:
    """Seconds per call of ``fn`` after ``warmup`` calls; ``sync`` waits for the device."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return np.array(out)


def row(run, machine, engine, mode, size, batch, dtype, secs) -> dict:
    return {
        "run": run,
        "machine": machine,
        "engine": engine,
        "mode": mode,
        "img_size": size,
        "batch": batch,
        "dtype": dtype,
        "iters": len(secs),
        **latency_stats(secs, batch, percentiles=(50, 99), digits=3),
    }


def torch_points(args, size: int, machine: str) -> list[dict]:
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    torch.manual_seed(0)
    graph = EncoderGraph(create_model(args.model, img_size=size)).eval().to(device)
    if args.compile:
        graph = torch.compile(graph, mode="max-autotune-no-cudagraphs", dynamic=False)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for dtype in args.dtype:
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
        for batch in args.batch:
            host = torch.randn(batch, graph_in_chans(graph), size, size)
            if cuda:
                host = host.pin_memory()
            on_device = host.to(device)

            def compute(x=on_device, amp=amp):
                with torch.inference_mode(), torch.autocast(device.type, amp, enabled=bool(amp)):
                    return graph(x)

            def h2d(x=host, amp=amp):
                with torch.inference_mode(), torch.autocast(device.type, amp, enabled=bool(amp)):
                    return graph(x.to(device, non_blocking=True))

            modes = {"compute": compute, "h2d": h2d} if cuda else {"compute": compute}
            for mode, fn in modes.items():
                try:
                    secs = timed(fn, args.iters, args.warmup, sync)
                except torch.OutOfMemoryError:
                    print(f"  torch {device.type} {size}px b{batch} {dtype}: out of memory")
                    torch.cuda.empty_cache()
                    break
                r = row(args.run, machine, f"torch-{device.type}", mode, size, batch, dtype, secs)
                rows.append(r)
                print_row(r)
    return rows


def graph_in_chans(graph) -> int:
    inner = getattr(graph, "_orig_mod", graph)
    return inner.model.in_chans


def onnx_points(args, machine: str) -> list[dict]:
    from nec_serve.bundle import ModelBundle
    from nec_serve.engines import LocalEngine

    bundle = ModelBundle.load(args.onnx_dir)
    engine = LocalEngine(bundle)
    rows = []
    for batch in args.batch:
        x = np.random.default_rng(0).standard_normal(
            (batch, bundle.in_chans, bundle.img_size, bundle.img_size), dtype=np.float32
        )
        secs = timed(lambda x=x: engine.encode(x), args.iters, args.warmup, lambda: None)
        r = row(
            args.run, machine, "onnxruntime-cpu", "compute", bundle.img_size, batch, "fp32", secs
        )
        rows.append(r)
        print_row(r)
    return rows


def print_row(r: dict) -> None:
    print(
        f"  {r['engine']:16s} {r['mode']:7s} {r['img_size']}px b{r['batch']:<4d} {r['dtype']:5s}"
        f" {r['throughput_img_per_s']:9.1f} img/s  p50 {r['latency_ms_p50']:8.2f} ms"
        f"  p99 {r['latency_ms_p99']:8.2f} ms"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mae_vit_compress_adapter")
    p.add_argument("--img-size", type=int, nargs="+", default=[224])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the graph first")
    p.add_argument("--onnx-dir", help="also time this export's ONNX encoder (onnxruntime, CPU)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--run", default="cpu", help="label of this machine's rows")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/encoder.csv"))
    args = p.parse_args(argv)

    machine = machine_description()
    print(f"{machine}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    for size in args.img_size:
        rows += torch_points(args, size, machine)
    if args.onnx_dir:
        rows += onnx_points(args, machine)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_rows(args.out, merge_runs(read_rows(args.out), rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
