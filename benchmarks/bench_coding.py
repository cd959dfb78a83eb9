"""Per-tile cost of the wrapper's coding stage, one core: the coder alone and the whole stage.

Workload: ViT-B tiles (768 channels x 197 tokens), latents drawn N(median_c, sigma_c) with
sigma_c log-uniform in [0.2, 1.5] per channel, coded with the tables of an
``EntropyBottleneck(768)`` fitted to that distribution (``bench_codec.fit_tables``, cached
under ``benchmarks/results/tmp/``): mostly small symbols around 0, about 1.5 bits each,
as a trained NEC model's latents give. ``--rvq`` adds the categorical coder of the RVQ
family (``--rvq-levels`` codebooks of ``--rvq-entries`` entries over ``--rvq-tokens``
positions, Zipf-like index histograms).

Timed per tile, as the median over ``--repeats`` runs after one warm-up, in batches of
``--batch`` tiles as the pipeline codes them, with numpy/BLAS/torch on one thread:

* ``coder_encode`` / ``coder_decode``: ``encode_batch`` / ``decode_batch`` alone;
* ``stage_encode``: what ``pipeline._Batch.flush`` does after inference: ``code_batch``
  (the streams, the entropy bound and the rounding error; ``encode_batch``,
  ``entropy_bound_bits`` and ``rounding_sq_err`` for a codec without it) and
  ``ContainerWriter.write_tile`` of every tile into an in-memory container;
* ``stage_decode``: what ``pipeline.decompress`` does without a graph: iterate a
  ``ContainerReader`` over that container and ``decode_batch`` each batch of payloads
  straight into the rows of one growing ``(tiles, C, T)`` output array.

Targets (the issue's): 1,500 tiles/s per core for ``stage_encode``, 1,000 for
``stage_decode``. ``--profile`` prints the top of a cProfile of both stages.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads its BLAS: one core

import argparse  # noqa: E402
import cProfile  # noqa: E402
import csv  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import pstats  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from nec_dev.perf import machine_description, timed  # noqa: E402
from nec_serve.categorical import CategoricalCodec, categorical_tables  # noqa: E402
from nec_serve.codec import FactorizedCodec  # noqa: E402
from nec_serve.container import ContainerHeader, ContainerReader, ContainerWriter  # noqa: E402
from nec_serve.pipeline import _Rows  # noqa: E402  (decompress's output, to time it as it is)

ROOT = Path(__file__).resolve().parent
CHANNELS, TOKENS = 768, 197
TARGETS = {"stage_encode": 1500.0, "stage_decode": 1000.0}


def _bench_codec():
    spec = importlib.util.spec_from_file_location("bench_codec", ROOT / "bench_codec.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def vit_workload(tiles: int, seed: int, train_steps: int, cache: Path):
    """Codec, symbols ``(N, C, T)`` int32 and latents ``(N, C, T)`` float32 of ViT-B tiles."""
    tables, sigma = _bench_codec().fit_tables(train_steps, seed, cache)
    rng = np.random.default_rng(seed + 1)
    medians = tables.medians.astype(np.float32)[None, :, None]
    latent = rng.standard_normal((tiles, tables.channels, TOKENS), dtype=np.float32)
    latent = latent * sigma[None, :, None] + medians
    symbols = np.rint(latent - medians).astype(np.int32)
    return FactorizedCodec(tables), symbols, latent, None


def rvq_workload(tiles: int, seed: int, levels: int, entries: int, tokens: int):
    """Categorical codec, its ``(N, levels, T)`` indices, no latents, all levels coded."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, entries + 1) ** 1.1
    p /= p.sum()
    counts = np.stack([rng.multinomial(100_000, p) for _ in range(levels)])
    codec = CategoricalCodec(categorical_tables(counts))
    idx = np.stack([rng.choice(entries, size=(tiles, tokens), p=p) for _ in range(levels)], 1)
    return codec, np.ascontiguousarray(idx, dtype=np.int32), None, levels


def header_for(codec, tokens: int) -> ContainerHeader:
    meta = {"model": "bench", "channels": codec.channels, "tokens": tokens}
    return ContainerHeader(codec.tables.sha256, meta)  # positional: any format version


def batches(n: int, size: int):
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def stage_encode(codec, symbols, latent, levels, batch: int) -> bytes:
    """Code and write every tile as ``pipeline._Batch.flush`` does; the container bytes."""
    sink = io.BytesIO()
    writer = ContainerWriter(sink, header_for(codec, symbols.shape[2]))
    bound = sq_err = 0.0
    for part in batches(len(symbols), batch):
        sym, lat = symbols[part], None if latent is None else latent[part]
        if hasattr(codec, "code_batch"):  # the pipeline's one call
            streams, bits, err = codec.code_batch(sym, lat, levels)
        else:  # before code_batch: three calls
            streams = codec.encode_batch(sym, levels)
            bits = codec.entropy_bound_bits(sym, levels)
            err = codec.rounding_sq_err(sym, lat)
        bound += bits
        sq_err += err
        for k, payload in enumerate(streams):
            writer.write_tile(
                payload,
                source="bench.tif",
                row=224 * (part.start + k),
                col=0,
                source_height=224 * len(symbols),
                source_width=224,
            )
    writer.close()
    return sink.getvalue()


def stage_decode(codec, data: bytes, tokens: int, levels, batch: int) -> np.ndarray:
    """Read and decode every tile as ``pipeline.decompress`` does; ``(tiles, C, T)``.

    Each batch is decoded straight into the rows of the output, which grow in place
    (``pipeline._Rows``), as ``decompress`` does when the output is the symbols.
    """
    reader = ContainerReader(io.BytesIO(data))
    rows = _Rows(1 << 40)
    shape, dtype = (codec.channels, tokens), np.dtype(np.int32)
    payloads = []
    for record in reader:
        payloads.append(record.payload)
        if len(payloads) == batch:
            codec.decode_batch(payloads, tokens, levels, out=rows.take(batch, shape, dtype))
            payloads = []
    if payloads:
        codec.decode_batch(payloads, tokens, levels, out=rows.take(len(payloads), shape, dtype))
    return rows.result()


def measure(name: str, workload, batch: int, repeats: int, profile: bool) -> list[dict]:
    codec, symbols, latent, levels = workload
    n, _, tokens = symbols.shape
    parts = batches(n, batch)
    streams = [s for p in parts for s in codec.encode_batch(symbols[p], levels)]
    data = stage_encode(codec, symbols, latent, levels, batch)
    expect = symbols if levels is None else symbols[:, :levels]
    back = stage_decode(codec, data, tokens, levels, batch)
    assert np.array_equal(back[:, : expect.shape[1]], expect), "round trip failed"
    runs = {
        "coder_encode": lambda: [codec.encode_batch(symbols[p], levels) for p in parts],
        "coder_decode": lambda: [codec.decode_batch(streams[p], tokens, levels) for p in parts],
        "stage_encode": lambda: stage_encode(codec, symbols, latent, levels, batch),
        "stage_decode": lambda: stage_decode(codec, data, tokens, levels, batch),
    }
    if profile:
        for what in ("stage_encode", "stage_decode"):
            prof = cProfile.Profile()
            prof.runcall(runs[what])
            print(f"--- cProfile {name} {what} ({n} tiles)")
            pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    rows = []
    for what, fn in runs.items():
        seconds = timed(fn, repeats) / n
        target = TARGETS.get(what) if name == "vit-b" else None
        rows.append(
            {
                "workload": name,
                "measure": what,
                "symbols_per_tile": int(expect[0].size),
                "tiles": n,
                "batch": batch,
                "ms_per_tile": 1e3 * seconds,
                "tiles_per_s_per_core": 1.0 / seconds,
                "target_tiles_per_s": "" if target is None else target,
                "target_met": "" if target is None else 1.0 / seconds >= target,
                "coded_bytes_per_tile": len(data) / n,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=64, help="tiles per timed run")
    parser.add_argument("--batch", type=int, default=8, help="tiles per coder call")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument(
        "--tables-cache", type=Path, default=ROOT / "results" / "tmp" / "bench_tables.bin"
    )
    parser.add_argument("--rvq", action="store_true", help="also the RVQ categorical coder")
    parser.add_argument("--rvq-levels", type=int, default=8)
    parser.add_argument("--rvq-entries", type=int, default=1024)
    parser.add_argument("--rvq-tokens", type=int, default=256)
    parser.add_argument("--profile", action="store_true", help="print cProfile of the stages")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "coding.csv")
    args = parser.parse_args(argv)

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    vit = vit_workload(args.tiles, args.seed, args.train_steps, args.tables_cache)
    rows = measure("vit-b", vit, args.batch, args.repeats, args.profile)
    if args.rvq:
        rvq = rvq_workload(
            args.tiles, args.seed, args.rvq_levels, args.rvq_entries, args.rvq_tokens
        )
        rows += measure("rvq", rvq, args.batch, args.repeats, args.profile)
    machine = machine_description()
    print(f"{'workload':>8} {'measure':>13} {'ms/tile':>8} {'tiles/s':>8} {'target':>7}  met")
    for row in rows:
        row["machine"] = machine
        print(
            f"{row['workload']:>8} {row['measure']:>13} {row['ms_per_tile']:8.3f} "
            f"{row['tiles_per_s_per_core']:8.0f} {row['target_tiles_per_s']!s:>7}  "
            f"{row['target_met']}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
