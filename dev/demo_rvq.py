"""The demo's second family: the shipped RVQ Sentinel-2 compressor on its test split.

The shipped model (``rvq-s2``, ``weights/sentinel2/``) takes ten Sentinel-2 bands
(B02-B08, B8A, B11, B12) as reflectance x 10000. The images of its test split (whole
SSL4EO locations, BigEarthNet patches and EuroSAT MS patches it never trained on; the
split ships beside the weights) are compressed into one container per rate
(``--codebooks`` 1, 2, 4 and 8 of the one model), decoded to georeferenced GeoTIFFs and
compared with the input: bits per pixel from the container, the RMS error in % of each
band's range (the deliverable's metric), and whether the output lies where the input did.
Then, in the workflow, a step message asks for a rate in ``meta_information.codebooks``.
"""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import numpy as np
import rasterio

from nec_dev.demo_trained import export_shipped
from nec_models.sentinel2 import S2Item, read_s2_raw, read_s2_split
from nec_serve.engines import LocalEngine
from nec_serve.errors import InvalidInput
from nec_serve.pipeline import compress, write_bands

__all__ = [
    "RVQ_MODEL",
    "RVQ_RATES",
    "SSL4EO_BANDS",
    "band_error",
    "read_bands",
    "run_rvq_demo",
    "s2_workflow_inputs",
]

#: The shipped RVQ model the demo runs beside NEC.
RVQ_MODEL = "rvq-s2"
#: Codebook counts the demo compresses at (one model).
RVQ_RATES = (1, 2, 4, 8)
#: 1-based indices of the ten bands in an SSL4EO-S12 GeoTIFF (B01-B12 without B10).
SSL4EO_BANDS = "2,3,4,5,6,7,8,9,11,12"


def _under(item: S2Item, data: Path) -> S2Item:
    """``item`` with its path under ``data`` (splits record the path training used)."""
    parts = Path(item.path).parts
    rel = Path(*parts[parts.index(item.dataset) :]) if item.dataset in parts else Path(item.path)
    return S2Item(item.dataset, item.group, str(data / rel))


def _test_items(weights_dir: Path, data: Path) -> tuple[list[S2Item], int]:
    """The shipped model's test items found under ``data``, and how many the split has."""
    test = read_s2_split(weights_dir / "split.csv")["test"]
    return [i for i in (_under(i, data) for i in test) if Path(i.path).exists()], len(test)


def test_images(weights_dir: Path, data: Path) -> list[tuple[str, np.ndarray]]:
    """The shipped model's test split, read as the service reads it.

    All of it in the full data; the sample data holds a subset (the count is printed).
    """
    items, total = _test_items(weights_dir, data)
    if len(items) < total:
        print(f"[rvq] {len(items)} of the {total} test images present")
    if not items:
        raise InvalidInput(f"{data}: none of the {RVQ_MODEL} test images is there")
    return [(Path(i.path).name, read_s2_raw(i)) for i in items]


def read_bands(path: Path) -> list[tuple[dict, np.ndarray]]:
    """(georeferencing, pixels) of each GeoTIFF ``write_bands`` wrote (a .tif or a .tar)."""
    files = []
    if path.suffix == ".tar":
        with tarfile.open(path) as tar:
            files = [io.BytesIO(tar.extractfile(m).read()) for m in tar.getmembers()]
    else:
        files = [path]
    out = []
    for f in files:
        with rasterio.open(f) as ds:
            out.append(({"crs": ds.crs, "transform": ds.transform}, ds.read()))
    return out


def band_error(refs: list[np.ndarray], decoded: list[np.ndarray]) -> dict:
    """D3.4's distortion: each band's RMS error over all pixels, also in % of its range.

    The range of a band is its max - min over ``refs`` (the inputs, in raw units).
    Returns ``{"rmse": per band, "pct": per band, "rmse_pct": mean of pct, "rmse_all":
    RMS over all bands}``.
    """
    flat = [r.reshape(r.shape[0], -1).astype(np.float64) for r in refs]
    span = np.max([f.max(1) for f in flat], 0) - np.min([f.min(1) for f in flat], 0)
    sq = np.zeros(len(span))
    for ref, rec in zip(flat, decoded, strict=True):
        sq += ((rec.reshape(rec.shape[0], -1).astype(np.float64) - ref) ** 2).sum(1)
    rmse = np.sqrt(sq / sum(f.shape[1] for f in flat))
    pct = 100 * rmse / span
    return {
        "rmse": rmse,
        "pct": pct,
        "rmse_pct": float(pct.mean()),
        "rmse_all": float(np.sqrt((rmse**2).mean())),
    }


def run_rvq_demo(entry: dict, data: Path, work: Path, threads: int = 0) -> list[dict]:
    """Compress the test split at each of :data:`RVQ_RATES`, decode, measure; print rows."""
    bundle = export_shipped(RVQ_MODEL, work / "export" / RVQ_MODEL)
    engine = LocalEngine(bundle, threads=threads)
    images = test_images(Path(entry["dir"]), data)
    pixels = sum(a.shape[1] * a.shape[2] for _, a in images)
    geos = [getattr(a, "geo", None) for _, a in images]
    raw_bytes = sum(a.nbytes for _, a in images)
    print(
        f"\n[rvq] {RVQ_MODEL}: {len(images)} test images ({pixels:,} pixels x 10 bands, "
        f"{raw_bytes:,} bytes as 16-bit) at {', '.join(map(str, RVQ_RATES))} codebooks"
    )
    rows = []
    for n in RVQ_RATES:
        container = work / f"s2_test.c{n}.necb"
        t0 = time.perf_counter()
        with container.open("wb") as f:
            stats = compress(iter(images), bundle, engine, f, rate=n)
        t1 = time.perf_counter()
        done = write_bands(container, work / f"s2_test.c{n}.tif", bundle, engine)
        t2 = time.perf_counter()
        decoded = read_bands(Path(done.path))
        error = band_error([a for _, a in images], [rec for _, rec in decoded])
        placed = sum(
            want is None
            or (
                geo["crs"].to_string() == want["crs"]
                and tuple(geo["transform"])[:6] == tuple(want["transform"])
            )
            for (geo, _), want in zip(decoded, geos, strict=True)
        )
        row = {
            "codebooks": n,
            "container_bytes": stats.container_bytes,
            "bpp": round(8 * stats.container_bytes / pixels, 3),
            "ratio_16bit": round(raw_bytes / stats.container_bytes, 1),
            "rmse_pct_of_range": round(error["rmse_pct"], 3),
            "rmse_reflectance_x1e4": round(error["rmse_all"], 1),
            "over_bound_pct": round(100 * stats.overhead_vs_bound, 3),
            "georeferenced": f"{placed}/{len(images)}",
            "compress_s": round(t1 - t0, 2),
            "decompress_s": round(t2 - t1, 2),
        }
        rows.append(row)
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    return rows


def s2_workflow_inputs(data: Path, tmp: Path, weights_dir: Path) -> list[tuple[str, Path]]:
    """What the RVQ workflow drops in S3: one SSL4EO test scene as it is (12 bands)."""
    items, _ = _test_items(weights_dir, data)
    scenes = [i for i in items if i.dataset == "ssl4eo_s12"]
    if not scenes:
        raise InvalidInput(f"{data}: no SSL4EO-S12 scene of the {RVQ_MODEL} test split")
    path = Path(scenes[0].path)
    return [(path.name, path)]
