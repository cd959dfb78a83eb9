"""Rate against distortion of the RVQ Sentinel-2 compressor, as D3.4 Figure 8 measures it.

On the test split of the model's run (whole SSL4EO locations, BigEarthNet patches and
EuroSAT MS patches no training step saw), ten bands (B02-B08, B8A, B11, B12):

* ``rvq``: the export's real pipeline for N = 1..8 codebooks: every test image in one
  container per N (``compress --codebooks N``), decoded to GeoTIFFs (``decompress
  --output bands``) and read back. Bits are the container's (headers, tile records and
  source records included; the payload alone is reported too); tiles at the edges of
  images are padded to the export's tile size, and those bits count.
* ``rvq_fixed8``: the same at N = 8 for a model trained with 8 codebooks always
  (``--compare``), the one-model-many-rates check.
* ``jpeg2000``: each band of each image alone as 16-bit JPEG 2000 (OpenJPEG through
  Pillow, a bare codestream) at fixed compression ratios.
* ``jpeg``: each band alone at 8 bits (the deliverable's baseline): scaled by the band's
  min and max in that image (two float32 per band, counted), JPEG at several qualities.
* ``zstd``: each image's raw bytes, level 19 (lossless).

Distortion is D3.4's: the RMS error of each band over all test pixels as a percentage of
that band's range (max - min over the test images, reflectance x 10000), then the mean
over bands; the RMS error in reflectance x 10000 is reported too. Rate is given per spatial
pixel (all ten bands of a pixel, ``bpp``) and per band-pixel (``bpp / 10``).

Also measured: the categorical coder's speed and its size over the tables' entropy bound,
and whether tables conditioned on the previous level's index (bucketed) would save bits.
Writes ``rvq.csv``, ``rvq.png`` and ``rvq.md`` under ``--out``.

    python benchmarks/bench_rvq.py --shipped rvq-s2 --compare rvq-s2-fixed8
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import zstandard
from PIL import Image

from nec_dev.demo_rvq import band_error, read_bands
from nec_dev.perf import machine_description
from nec_export import export_model
from nec_models.checkpoint import read_checkpoint
from nec_models.sentinel2 import load_s2, read_s2_raw, read_s2_split
from nec_models.shipped import load_trained, materialize, split_of
from nec_serve.bundle import ModelBundle
from nec_serve.engines import LocalEngine
from nec_serve.imagery import tile_image
from nec_serve.pipeline import compress, write_bands

RESULTS = Path(__file__).resolve().parent / "results" / "rvq"
J2K_RATIOS = (400, 200, 100, 50, 25, 12, 6)  # OpenJPEG compression ratios vs 16-bit raw
JPEG_QUALITIES = (10, 30, 50, 70, 85, 95)
FIELDS = (
    "method",
    "setting",
    "bpp",
    "bpp_per_band",
    "payload_bpp",
    "rmse_pct",
    "rmse",
    "over_bound_pct",
    *(
        f"rmse_pct_{b}"
        for b in ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
    ),
)


# ------------------------------------------------------------------------------ data, metric


def _model_and_split(shipped: str | None, checkpoint: str | None):
    if shipped:
        ckpt, split = materialize(shipped), split_of(shipped)
    else:
        ckpt, split = read_checkpoint(checkpoint), Path(checkpoint).parent / "split.csv"
    return load_trained(ckpt), read_s2_split(split)


def _export(model, work: Path, name: str) -> ModelBundle:
    out = work / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(model, out)
    return ModelBundle.load(out)


class Scorer:
    """D3.4's distortion over the test images: RMS error per band in % of its range."""

    def __init__(self, images: list[tuple[str, np.ndarray]]):
        self.images = images
        self.pixels = sum(a.shape[1] * a.shape[2] for _, a in images)
        self.bands = images[0][1].shape[0]

    def score(self, decoded: list[np.ndarray]) -> dict:
        return band_error([a for _, a in self.images], decoded)

    def row(self, method: str, setting, bits: float, decoded, **extra) -> dict:
        s = self.score(decoded)
        bpp = bits / self.pixels
        row = {
            "method": method,
            "setting": setting,
            "bpp": round(bpp, 5),
            "bpp_per_band": round(bpp / self.bands, 5),
            "rmse_pct": round(s["rmse_pct"], 4),
            "rmse": round(s["rmse_all"], 2),
            **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in extra.items()},
        }
        row.update({f: round(float(v), 4) for f, v in zip(FIELDS[8:], s["pct"], strict=True)})
        return row


# ------------------------------------------------------------------------------ the model


def rvq_rows(bundle: ModelBundle, scorer: Scorer, work: Path, method: str, levels) -> list[dict]:
    engine = LocalEngine(bundle)
    rows = []
    for n in levels:
        buf = io.BytesIO()
        stats = compress(iter(scorer.images), bundle, engine, buf, rate=n)
        container = work / f"{method}-{n}.necb"
        container.write_bytes(buf.getvalue())
        done = write_bands(container, work / f"{method}-{n}.tif", bundle, engine)
        decoded = _read_outputs(Path(done.path), len(scorer.images))
        rows.append(
            scorer.row(
                method,
                n,
                8.0 * len(buf.getvalue()),
                decoded,
                payload_bpp=8.0 * stats.payload_bytes / scorer.pixels,
                over_bound_pct=100 * stats.overhead_vs_bound,
            )
        )
        print(f"  {method} N={n}: {rows[-1]['bpp']:.3f} bpp, {rows[-1]['rmse_pct']:.3f} % RMS")
    return rows


def _read_outputs(path: Path, count: int) -> list[np.ndarray]:
    out = [pixels for _, pixels in read_bands(path)]  # in container order
    assert len(out) == count, (len(out), count)
    return out


# ------------------------------------------------------------------------------ baselines


def _j2k16(band: np.ndarray, ratio: int) -> tuple[int, np.ndarray]:
    img = Image.fromarray(np.ascontiguousarray(band.astype(np.uint16)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG2000", quality_mode="rates", quality_layers=[ratio], no_jp2=True)
    return len(buf.getvalue()), np.asarray(Image.open(io.BytesIO(buf.getvalue())))


def _jpeg8(band: np.ndarray, quality: int) -> tuple[int, np.ndarray]:
    lo, hi = float(band.min()), float(band.max())
    scale = (hi - lo) / 255 or 1.0
    q = np.clip(np.rint((band - lo) / scale), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(q).save(buf, format="JPEG", quality=quality)
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue()))).astype(np.float64)
    return len(buf.getvalue()) + 8, back * scale + lo  # + the two float32 bounds


def baseline_rows(scorer: Scorer, quick: bool) -> list[dict]:
    rows = []
    grids = (
        ("jpeg2000", _j2k16, J2K_RATIOS[::2] if quick else J2K_RATIOS),
        ("jpeg", _jpeg8, JPEG_QUALITIES[::2] if quick else JPEG_QUALITIES),
    )
    for method, codec, settings in grids:
        for setting in settings:
            nbytes, decoded = 0, []
            for _, img in scorer.images:
                bands = []
                for band in img:
                    n, rec = codec(np.maximum(band, 0), setting)
                    nbytes += n
                    bands.append(rec)
                decoded.append(np.stack(bands))
            rows.append(scorer.row(method, setting, 8.0 * nbytes, decoded))
    zstd = zstandard.ZstdCompressor(level=19)
    nbytes = sum(
        len(zstd.compress(np.ascontiguousarray(img).tobytes())) for _, img in scorer.images
    )
    rows.append(scorer.row("zstd", 19, 8.0 * nbytes, [img for _, img in scorer.images]))
    return rows


# ------------------------------------------------------------------------------ the coder


def _indices(bundle: ModelBundle, images: list[np.ndarray]) -> np.ndarray:
    """All levels' indices of every tile of ``images`` (reflectance), ``(tiles, L, T)``."""
    engine = LocalEngine(bundle)
    norm = bundle.normalisation(np.float32)
    out = []
    for img in images:
        tiles, _ = tile_image(img * np.float32(norm.scale), bundle.img_size)
        for i in range(0, len(tiles), 16):
            out.append(engine.encode(norm.apply(tiles[i : i + 16]))[0])
    return np.concatenate(out)


def coder_numbers(bundle: ModelBundle, test_idx: np.ndarray) -> dict:
    """Indices per second encoded and decoded on one core, at N = 8 and N = 1."""
    codec = bundle.codec
    reps = max(1, int(2e6 // test_idx.size))
    out = {}
    for n in (1, codec.levels):
        count = test_idx[:, :n].size * reps
        t0 = time.perf_counter()
        for _ in range(reps):
            streams = codec.encode_batch(test_idx, n)
        t1 = time.perf_counter()
        for _ in range(reps):
            codec.decode_batch(streams, test_idx.shape[2], n)
        t2 = time.perf_counter()
        bound = codec.entropy_bound_bits(test_idx, n)
        out[n] = {
            "encode_mindex_s": count / (t1 - t0) / 1e6,
            "decode_mindex_s": count / (t2 - t1) / 1e6,
            "over_bound_pct": 100 * (8 * sum(map(len, streams)) / bound - 1),
            "streams": len(streams),
        }
    return out


def _cross_entropy(counts: np.ndarray, symbols: np.ndarray) -> float:
    """Bits of ``symbols`` under the +1-smoothed distribution of ``counts``."""
    p = (counts + 1) / (counts.sum() + len(counts))
    return float(-np.log2(p[symbols]).sum())


def perplexity(indices: np.ndarray, k: int) -> list[float]:
    """``2 ** entropy`` of each level's index distribution in ``(tiles, L, T)``."""
    out = []
    for level in range(indices.shape[1]):
        p = np.bincount(indices[:, level].ravel(), minlength=k) / indices[:, level].size
        p = p[p > 0]
        out.append(float(2 ** -(p * np.log2(p)).sum()))
    return out


def conditioning(train_idx: np.ndarray, test_idx: np.ndarray, k: int, buckets: int = 16) -> dict:
    """Bits of the test indices: one table per level vs per (level, previous-index bucket).

    Buckets group the previous level's entries by frequency rank into ``buckets`` groups
    of about equal training mass; each table is +1 smoothed like the shipped ones.
    """
    levels = train_idx.shape[1]
    plain = cond = 0.0
    for level in range(levels):
        tr, te = train_idx[:, level].ravel(), test_idx[:, level].ravel()
        counts = np.bincount(tr, minlength=k).astype(np.float64)
        plain += _cross_entropy(counts, te)
        if level == 0:
            cond += _cross_entropy(counts, te)
            continue
        prev_counts = np.bincount(train_idx[:, level - 1].ravel(), minlength=k)
        order = np.argsort(-prev_counts, kind="stable")
        mass = np.cumsum(prev_counts[order]) / max(prev_counts.sum(), 1)
        bucket_of = np.empty(k, dtype=np.int64)
        bucket_of[order] = np.minimum((mass * buckets).astype(np.int64), buckets - 1)
        ctx_tr = bucket_of[train_idx[:, level - 1].ravel()]
        ctx_te = bucket_of[test_idx[:, level - 1].ravel()]
        table = np.zeros((buckets, k))
        np.add.at(table, (ctx_tr, tr), 1)
        p = (table + 1) / (table.sum(1, keepdims=True) + k)
        cond += float(-np.log2(p[ctx_te, te]).sum())
    n = test_idx.size
    return {
        "bits_per_index_plain": plain / n,
        "bits_per_index_conditioned": cond / n,
        "saving_pct": 100 * (1 - cond / plain),
        "buckets": buckets,
    }


# ------------------------------------------------------------------------------ outputs


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {
        "rvq": ("o-", "RVQ, one model, N = 1..8 codebooks"),
        "rvq_fixed8": ("s", "RVQ trained for N = 8 only"),
        "jpeg2000": ("^-", "JPEG 2000 per band, 16 bit"),
        "jpeg": ("v-", "JPEG per band, 8 bit"),
    }
    for method, (style, label) in styles.items():
        pts = sorted((r["bpp_per_band"], r["rmse_pct"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=label)
        if method == "rvq":
            for r in rows:
                if r["method"] == "rvq":
                    ax.annotate(str(r["setting"]), (r["bpp_per_band"], r["rmse_pct"]), fontsize=7)
    z = [r for r in rows if r["method"] == "zstd"]
    if z:
        ax.axvline(z[0]["bpp_per_band"], ls=":", c="grey", label="zstd lossless")
    ax.axhline(2.0, ls="--", c="red", lw=0.8, label="2 % (D3.4)")
    ax.set_xscale("log")
    ax.set_xlabel("bits per band-pixel (container bytes)")
    ax.set_ylabel("RMS error, % of band range")
    ax.set_title("Sentinel-2, 10 bands, test split")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _log_interp(x: float, pts: list[tuple[float, float]]) -> float | None:
    """The bpp a codec needs for RMS ``x``, log-interpolated on its (rmse, bpp) curve."""
    pts = sorted(pts)
    for (r0, b0), (r1, b1) in zip(pts, pts[1:], strict=False):
        if r0 <= x <= r1:
            w = (x - r0) / (r1 - r0) if r1 > r0 else 0.0
            return math.exp(math.log(b0) + w * (math.log(b1) - math.log(b0)))
    return None


def summary(rows, coder, cond, info: dict) -> str:
    rvq = [r for r in rows if r["method"] == "rvq"]
    j2k = [(r["rmse_pct"], r["bpp"]) for r in rows if r["method"] == "jpeg2000"]
    lines = [
        "# RVQ Sentinel-2 compressor: rate against distortion",
        "",
        f"Model {info['model']} ({info['export']}); test split: {info['images']} images, "
        f"{info['pixels']:,} pixels x 10 bands ({info['datasets']}). Machine: {info['machine']}.",
        "",
        "| N | bpp | bits/band-pixel | payload bpp | RMS % of range | RMS (x10^4) | "
        "JPEG 2000 bpp at this RMS | RVQ / JPEG 2000 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    below, halves = 0, 0
    for r in rvq:
        j = _log_interp(r["rmse_pct"], j2k)
        ratio = r["bpp"] / j if j else None
        below += r["rmse_pct"] < 2.0
        halves += bool(ratio is not None and ratio <= 0.5)
        lines.append(
            f"| {r['setting']} | {r['bpp']:.3f} | {r['bpp_per_band']:.4f} | "
            f"{r['payload_bpp']:.3f} | {r['rmse_pct']:.3f} | {r['rmse']:.1f} | "
            f"{f'{j:.3f}' if j else 'outside its curve'} | "
            f"{f'{ratio:.2f}' if ratio else '-'} |"
        )
    fixed = [r for r in rows if r["method"] == "rvq_fixed8"]
    n8 = next((r for r in rvq if r["setting"] == 8), None)
    lines += ["", "## Targets", ""]
    lines.append(f"- Below 2 % RMS: {below} of {len(rvq)} rates.")
    lines.append(
        f"- At most half the bits of per-band JPEG 2000 at equal RMS: {halves} of {len(rvq)}."
    )
    for n, c in coder.items():
        lines.append(
            f"- Coder at N = {n}: encode {c['encode_mindex_s']:.1f} M indices/s, decode "
            f"{c['decode_mindex_s']:.1f} M/s (one thread); size over the tables' entropy bound "
            f"{c['over_bound_pct']:.3f} % ({c['streams']} tile streams)."
        )
    if fixed and n8:
        rel = 100 * (n8["rmse_pct"] / fixed[0]["rmse_pct"] - 1)
        lines.append(
            f"- N = 8 of the one model: {n8['rmse_pct']:.3f} % RMS against "
            f"{fixed[0]['rmse_pct']:.3f} % for the model trained for 8 codebooks only "
            f"({rel:+.1f} %, target within 10 %)."
        )
    lines.append(
        "- Codebook usage on the test split, perplexity (2^entropy, of "
        f"{info['entries']} entries) per level: "
        + ", ".join(f"{p:.0f}" for p in info["perplexity"])
        + "."
    )
    lines.append(
        f"- Tables conditioned on the previous level's index ({cond['buckets']} frequency "
        f"buckets): {cond['bits_per_index_conditioned']:.3f} against "
        f"{cond['bits_per_index_plain']:.3f} bits per index on the test split "
        f"({cond['saving_pct']:+.2f} % saved)."
    )
    lines += [
        "",
        "## Baselines",
        "",
        "| method | setting | bpp | RMS % of range |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        if r["method"] not in ("rvq", "rvq_fixed8"):
            lines.append(
                f"| {r['method']} | {r['setting']} | {r['bpp']:.3f} | {r['rmse_pct']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shipped", default="rvq-s2", help="a shipped RVQ model")
    p.add_argument("--checkpoint", help="a `train rvq` checkpoint instead of --shipped")
    p.add_argument("--compare", help="shipped model (or checkpoint) trained for N = 8 only")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--quick", action="store_true", help="fewer baseline settings")
    p.add_argument("--max-images", type=int, default=0, help="first N test/train images (0: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, split = _model_and_split(None if args.checkpoint else args.shipped, args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = _export(model, work, "rvq")
        cap = args.max_images or None
        test_items, train_items = split["test"][:cap], split["train"][:cap]
        images = [(Path(i.path).name, read_s2_raw(i)) for i in test_items]
        scorer = Scorer(images)
        print(f"test split: {len(images)} images, {scorer.pixels} pixels")
        rows = rvq_rows(bundle, scorer, work, "rvq", range(1, bundle.codec.levels + 1))
        if args.compare:
            shipped = not Path(args.compare).exists()
            other, _ = _model_and_split(
                args.compare if shipped else None, None if shipped else args.compare
            )
            rows += rvq_rows(_export(other, work, "fixed8"), scorer, work, "rvq_fixed8", [8])
        rows += baseline_rows(scorer, args.quick)
        train_idx = _indices(bundle, load_s2(train_items))
        test_idx = _indices(bundle, load_s2(test_items))
        coder = coder_numbers(bundle, test_idx)
        cond = conditioning(train_idx, test_idx, bundle.codec.entries)
    with (out / "rvq.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    plot(rows, out / "rvq.png")
    info = {
        "model": args.checkpoint or args.shipped,
        "export": f"{bundle.img_size} px tiles, {bundle.codec.levels} x {bundle.codec.entries}",
        "images": len(images),
        "pixels": scorer.pixels,
        "datasets": ", ".join(sorted({i.dataset for i in test_items})),
        "machine": machine_description(),
        "entries": bundle.codec.entries,
        "perplexity": perplexity(test_idx, bundle.codec.entries),
    }
    text = summary(rows, coder, cond, info)
    (out / "rvq.md").write_text(text + f"\nRan in {time.perf_counter() - t0:.0f} s.\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
