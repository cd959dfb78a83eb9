"""Single-thread speed and size of the rANS coder against CompressAI 1.2.8 (and constriction).

Workload: one image = 768 channels x T tokens (T = 197, 257, 1025), symbols from
N(0, sigma_c) latents with sigma_c log-uniform in [0.2, 1.5] per channel, coded with the
tables of an ``EntropyBottleneck(768)`` fitted to that distribution: ``--train-steps`` Adam
steps (lr 1e-2, 512 samples per channel per step) on the bottleneck's noisy likelihood,
then ``update(force=True, update_quantiles=True)``. This gives CDF lengths of 19-81
(median 45) and about 1.5 bits per symbol.
The fitted tables are cached under ``benchmarks/results/tmp/`` (delete to refit).

Measured, each as the median over ``--repeats`` runs after one warm-up run, on one thread
(``torch.set_num_threads(1)``; our coder is single-threaded):

* ``encode_*`` / ``decode_*``: ``FactorizedCodec.encode`` / ``.decode`` per image;
* ``compressai_compress_*`` / ``compressai_decompress_*``: ``EntropyBottleneck.compress`` /
  ``.decompress`` on the (B, C, T, 1) latent (what a CompressAI user calls; includes its
  rounding and the Python list conversions of its pybind11 API);
* ``compressai_ans_*``: ``compressai.ans.RansEncoder.encode_with_indexes`` /
  ``RansDecoder.decode_with_indexes`` alone, with the Python lists built beforehand;
* ``constriction_*`` (if ``constriction`` is installed): its ``AnsCoder`` with one
  ``Categorical`` model per channel built once from the same quantized probabilities
  (escape-coded symbols are clipped to the escape entry, so its size is indicative only).

Units: ``msym_per_s`` = 10^6 symbols/s; ``coded_mb_per_s`` = 10^6 bytes of bitstream per
second (written by encode, read by decode); ``int32_mb_per_s`` = 10^6 bytes of int32
symbols per second (read by encode, written by decode). ``bound_bytes`` is
``entropy_bound_bits / 8``; ``overhead_pct`` = 100 * (coded / bound - 1).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

from nec_dev.perf import machine_description, timed
from nec_serve.codec import FactorizedCodec
from nec_serve.tables import EntropyTables

CHANNELS = 768
TOKENS = (197, 257, 1025)
ROOT = Path(__file__).resolve().parent


def fit_tables(steps: int, seed: int, cache: Path):
    """Entropy tables of an EntropyBottleneck fitted to N(0, sigma_c) latents."""
    import torch
    from compressai.entropy_models import EntropyBottleneck

    rng = np.random.default_rng(seed)
    sigma = np.exp(rng.uniform(np.log(0.2), np.log(1.5), CHANNELS)).astype(np.float32)
    if cache.exists():
        return EntropyTables.load(cache), sigma
    torch.manual_seed(seed)
    eb = EntropyBottleneck(CHANNELS)
    params = [p for name, p in eb.named_parameters() if name != "quantiles"]
    opt = torch.optim.Adam(params, lr=1e-2)
    scale = torch.from_numpy(sigma)[None, :, None]
    t0 = time.perf_counter()
    for step in range(steps):
        y = torch.randn(1, CHANNELS, 512) * scale
        _, likelihood = eb(y, training=True)
        loss = -torch.log2(likelihood).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  fit step {step}: {loss.item():.3f} bits/symbol", file=sys.stderr)
    eb.update(force=True, update_quantiles=True)
    print(f"  fitted in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    tables = EntropyTables(
        quantized_cdf=eb._quantized_cdf.numpy(),
        cdf_length=eb._cdf_length.numpy(),
        offset=eb._offset.numpy(),
        medians=eb.quantiles[:, 0, 1].detach().numpy(),
        precision=eb.entropy_coder_precision,
    )
    cache.parent.mkdir(parents=True, exist_ok=True)
    tables.save(cache)
    return tables, sigma


def bottleneck_from_tables(tables: EntropyTables):
    """A CompressAI EntropyBottleneck that codes with exactly these tables."""
    import torch
    from compressai.entropy_models import EntropyBottleneck

    eb = EntropyBottleneck(tables.channels)
    eb._quantized_cdf = torch.from_numpy(np.array(tables.quantized_cdf))
    eb._cdf_length = torch.from_numpy(np.array(tables.cdf_length))
    eb._offset = torch.from_numpy(np.array(tables.offset))
    with torch.no_grad():
        eb.quantiles[:, 0, 1] = torch.from_numpy(np.array(tables.medians))
    return eb


def constriction_columns(tables: EntropyTables, sym: np.ndarray, repeats: int) -> dict:
    try:
        import constriction
    except ImportError:
        return {}
    models = []
    for c in range(tables.channels):
        n = int(tables.cdf_length[c]) - 1
        freq = np.diff(tables.quantized_cdf[c, : n + 1].astype(np.float64))
        models.append(constriction.stream.model.Categorical(freq / freq.sum(), perfect=False))
    low = tables.offset[None, :, None]
    high = (tables.offset + tables.cdf_length - 2)[None, :, None]
    clipped = (np.clip(sym, low, high) - low).astype(np.int32)

    def encode_all():
        out = []
        for image in clipped:
            coder = constriction.stream.stack.AnsCoder()
            for c in range(image.shape[0] - 1, -1, -1):
                coder.encode_reverse(image[c], models[c])
            out.append(coder.get_compressed())
        return out

    streams = encode_all()

    def decode_all():
        for data in streams:
            coder = constriction.stream.stack.AnsCoder(data)
            for c in range(clipped.shape[1]):
                coder.decode(models[c], clipped.shape[2])

    check = constriction.stream.stack.AnsCoder(streams[0])
    assert np.array_equal(check.decode(models[0], clipped.shape[2]), clipped[0, 0])
    n_sym = clipped.size
    return {
        "constriction_encode_msym_per_s": n_sym / timed(encode_all, repeats) / 1e6,
        "constriction_decode_msym_per_s": n_sym / timed(decode_all, repeats) / 1e6,
        "constriction_bytes_per_image": float(np.mean([4 * s.size for s in streams])),
    }


def bench_tokens(codec, eb, sigma, tokens: int, images: int, repeats: int, seed: int) -> dict:
    import torch
    from compressai import ans

    rng = np.random.default_rng(seed + tokens)
    medians = np.array(codec.tables.medians[None, :, None, None])
    latent = rng.standard_normal((images, CHANNELS, tokens, 1)).astype(np.float32)
    latent = latent * sigma[None, :, None, None] + medians
    x = torch.from_numpy(latent)
    sym = eb.quantize(x, "symbols", torch.from_numpy(medians))[..., 0].numpy()
    sym = np.ascontiguousarray(sym, dtype=np.int32)
    n_sym = sym.size

    streams = codec.encode_batch(sym)
    reference = eb.compress(x)
    bytes_equal = streams == reference
    decoded_equal = np.array_equal(codec.decode_batch(reference, tokens), sym)

    t_enc = timed(lambda: [codec.encode(s) for s in sym], repeats)
    t_dec = timed(lambda: [codec.decode(d, tokens) for d in streams], repeats)
    t_cai_enc = timed(lambda: eb.compress(x), repeats)
    t_cai_dec = timed(lambda: eb.decompress(reference, (tokens, 1)), repeats)

    indexes = np.repeat(np.arange(CHANNELS, dtype=np.int32), tokens).tolist()
    cdfs = eb._quantized_cdf.tolist()
    lengths = eb._cdf_length.tolist()
    offsets = eb._offset.tolist()
    sym_lists = [s.reshape(-1).tolist() for s in sym]
    encoder, decoder = ans.RansEncoder(), ans.RansDecoder()
    t_ans_enc = timed(
        lambda: [
            encoder.encode_with_indexes(s, indexes, cdfs, lengths, offsets) for s in sym_lists
        ],
        repeats,
    )
    t_ans_dec = timed(
        lambda: [decoder.decode_with_indexes(d, indexes, cdfs, lengths, offsets) for d in streams],
        repeats,
    )

    coded = float(np.mean([len(s) for s in streams]))
    bound = codec.entropy_bound_bits(sym) / 8 / images
    low, high = codec.tables.symbol_range()
    escaped = (sym < low[None, :, None]) | (sym > high[None, :, None])
    row = {
        "channels": CHANNELS,
        "tokens": tokens,
        "images": images,
        "symbols_per_image": n_sym // images,
        "escaped_pct": 100 * float(escaped.mean()),
        "bytes_equal_compressai": bytes_equal,
        "decode_equal_compressai": decoded_equal,
        "coded_bytes_per_image": coded,
        "bound_bytes_per_image": bound,
        "overhead_pct": 100 * (coded / bound - 1),
        "bits_per_symbol": 8 * coded * images / n_sym,
        "encode_msym_per_s": n_sym / t_enc / 1e6,
        "encode_coded_mb_per_s": coded * images / t_enc / 1e6,
        "encode_int32_mb_per_s": 4 * n_sym / t_enc / 1e6,
        "decode_msym_per_s": n_sym / t_dec / 1e6,
        "decode_coded_mb_per_s": coded * images / t_dec / 1e6,
        "decode_int32_mb_per_s": 4 * n_sym / t_dec / 1e6,
        "compressai_compress_msym_per_s": n_sym / t_cai_enc / 1e6,
        "compressai_decompress_msym_per_s": n_sym / t_cai_dec / 1e6,
        "compressai_ans_encode_msym_per_s": n_sym / t_ans_enc / 1e6,
        "compressai_ans_decode_msym_per_s": n_sym / t_ans_dec / 1e6,
        "encode_speedup_vs_compressai": t_cai_enc / t_enc,
        "decode_speedup_vs_compressai": t_cai_dec / t_dec,
    }
    row.update(constriction_columns(codec.tables, sym, repeats))
    return row


def print_table(rows: list[dict]) -> None:
    columns = [
        ("tokens", "T", "d"),
        ("bits_per_symbol", "bits/sym", ".3f"),
        ("overhead_pct", "over%", ".3f"),
        ("escaped_pct", "esc%", ".3f"),
        ("bytes_equal_compressai", "same", ""),
        ("encode_msym_per_s", "enc Msym/s", ".1f"),
        ("decode_msym_per_s", "dec Msym/s", ".1f"),
        ("encode_coded_mb_per_s", "enc MB/s", ".1f"),
        ("decode_coded_mb_per_s", "dec MB/s", ".1f"),
        ("compressai_compress_msym_per_s", "CAI enc", ".2f"),
        ("compressai_decompress_msym_per_s", "CAI dec", ".2f"),
        ("compressai_ans_encode_msym_per_s", "ans enc", ".2f"),
        ("compressai_ans_decode_msym_per_s", "ans dec", ".2f"),
        ("constriction_encode_msym_per_s", "cstr enc", ".1f"),
        ("constriction_decode_msym_per_s", "cstr dec", ".1f"),
    ]
    columns = [c for c in columns if c[0] in rows[0]]
    print(" ".join(f"{title:>10}" for _, title, _ in columns))
    for row in rows:
        print(" ".join(f"{format(row[key], fmt):>10}" for key, _, fmt in columns))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument("--images", type=int, default=4, help="images per measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "codec.csv")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument(
        "--tables-cache", type=Path, default=ROOT / "results" / "tmp" / "bench_tables.bin"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    tables, sigma = fit_tables(args.train_steps, args.seed, args.tables_cache)
    print(
        f"tables: {tables.channels} channels, cdf_length {tables.cdf_length.min()}"
        f"-{tables.cdf_length.max()} (mean {tables.cdf_length.mean():.1f}), "
        f"sha256 {tables.sha256[:12]}"
    )
    codec = FactorizedCodec(tables)
    eb = bottleneck_from_tables(tables)
    try:
        import constriction  # noqa: F401
    except ImportError:
        print("constriction not installed: skipping its columns (pip install constriction)")

    rows = [bench_tokens(codec, eb, sigma, t, args.images, args.repeats, args.seed) for t in TOKENS]
    machine = machine_description()
    for row in rows:
        row["machine"] = machine
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )
    print(f"wrote {args.out}")
    return (
        0 if all(r["bytes_equal_compressai"] and r["decode_equal_compressai"] for r in rows) else 1
    )


if __name__ == "__main__":
    sys.exit(main())
