"""Write the golden containers of tests/unit/core/test_golden.py (run by hand, never by the tests).

Each case exports a shipped model (``weights/``), compresses fixed inputs from the sample
data in-process, and keeps what the bytes of a container depend on beyond the code under
test:

- ``manifest.json`` and the entropy tables of the export (tables computed by PyTorch and
  CompressAI could differ on another machine, so they are frozen here; the graphs are not
  kept, the coding side never reads them);
- ``engine.npz``: what the encoder graph returned for each batch (symbols, latent; float16
  for RVQ, whose containers and reports never read it) and the
  SHA-256 of each batch it was given, so that the test replays the graph's output and
  still checks that reading, tiling and normalisation hand the graph the same floats;
- the inputs (a crop of a sample scene where the case needs one);
- ``<case>.nec``: the container (format 3).

``<case>.v2.nec`` are the same inputs in format 2, as this script wrote them before format
3: they are frozen read fixtures (the readers still read format 2) and are never
regenerated.

    .venv/bin/python tests/golden/make_golden.py

Regenerating changes the golden files: do it only for an intended format change, and say
so in the commit.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SAMPLES = ROOT / "data" / "samples"

#: case -> (shipped model, input builder, compress keyword arguments per container)
NEC_MODEL = "nec-eurosat-l30000"
RVQ_MODEL = "rvq-s2"
#: The EuroSAT RGB sample images of the NEC case (one tile each).
NEC_IMAGES = (
    "eurosat_rgb/AnnualCrop/AnnualCrop_1001.jpg",
    "eurosat_rgb/AnnualCrop/AnnualCrop_1005.jpg",
)
#: 1-based indices of the ten bands in an SSL4EO-S12 GeoTIFF (B01-B12 without B10).
SSL4EO_BANDS = [2, 3, 4, 5, 6, 7, 8, 9, 11, 12]


class RecordingEngine:
    """The in-process engine, keeping every encoder batch's input hash and output."""

    def __init__(self, engine):
        self.engine = engine
        self.batches: list[tuple[str, np.ndarray, np.ndarray]] = []

    def encode(self, images: np.ndarray):
        symbols, latent = self.engine.encode(images)
        digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
        self.batches.append((digest, symbols, latent))
        return symbols, latent

    def decode(self, role, symbols):
        return self.engine.decode(role, symbols)


def _export(name: str, out: Path):
    import torch

    from nec_export import export_model
    from nec_models.shipped import load_trained, materialize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        export_model(load_trained(materialize(name)), out)


def _keep_export(export: Path, case: Path) -> None:
    from nec_serve.contract import Manifest

    manifest = Manifest.load(export)
    shutil.copy(export / "manifest.json", case / "manifest.json")
    shutil.copy(export / manifest.entropy.tables_file, case / manifest.entropy.tables_file)


def _save_engine(case: Path, batches, latent_dtype=np.float32) -> None:
    arrays = {}
    for i, (digest, symbols, latent) in enumerate(batches):
        arrays[f"symbols_{i}"] = symbols
        arrays[f"latent_{i}"] = latent.astype(latent_dtype)
        arrays[f"input_sha256_{i}"] = np.array(digest)
    np.savez_compressed(case / "engine.npz", **arrays)


def _crop_scene(src: Path, dest: Path, rows: slice, cols: slice) -> None:
    """A window of a GeoTIFF, georeferenced, all bands, as its own GeoTIFF."""
    import rasterio
    from rasterio.windows import Window, transform

    with rasterio.open(src) as ds:
        window = Window(cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start)
        data = ds.read(window=window)
        profile = ds.profile | {
            "height": data.shape[1],
            "width": data.shape[2],
            "transform": transform(window, ds.transform),
            "tiled": False,
            "compress": "deflate",
        }
        profile.pop("blockxsize", None)
        profile.pop("blockysize", None)
    with rasterio.open(dest, "w", **profile) as out:
        out.write(data)


def _compress(bundle, engine, inputs, **kwargs) -> bytes:
    from nec_serve.pipeline import compress

    buf = io.BytesIO()
    compress(inputs, bundle, engine, buf, batch_size=2, **kwargs)
    return buf.getvalue()


def make_nec(work: Path) -> None:
    from nec_serve.bundle import ModelBundle
    from nec_serve.engines import LocalEngine
    from nec_serve.imagery import iter_inputs

    case = HERE / "nec"
    case.mkdir(exist_ok=True)
    export = work / "nec"
    _export(NEC_MODEL, export)
    _keep_export(export, case)
    # A 150 x 100 crop of the NAIP sample's RGB bands: 3 x 2 tiles of 64 px, padded.
    naip = next((SAMPLES / "naip").glob("*.tif"))
    (image,) = [a for _, a in iter_inputs(naip, [1, 2, 3])]
    np.save(case / "naip_crop.npy", np.ascontiguousarray(image[:, 300:450, 400:500]))
    bundle = ModelBundle.load(export)
    engine = RecordingEngine(LocalEngine(bundle, threads=1))
    data = _compress(bundle, engine, nec_inputs(case))
    (case / "nec.nec").write_bytes(data)
    _save_engine(case, engine.batches)


def nec_inputs(case: Path):
    """The NEC case's inputs, read as the CLI reads them."""
    from nec_serve.imagery import iter_inputs

    for rel in NEC_IMAGES:
        yield from iter_inputs(SAMPLES / rel)
    yield from iter_inputs(case / "naip_crop.npy")


def make_rvq(work: Path) -> None:
    from nec_serve.bundle import ModelBundle
    from nec_serve.engines import LocalEngine

    case = HERE / "rvq"
    case.mkdir(exist_ok=True)
    export = work / "rvq"
    _export(RVQ_MODEL, export)
    _keep_export(export, case)
    scene = sorted((SAMPLES / "ssl4eo_s12").glob("*.tif"))[0]
    _crop_scene(scene, case / "scene_crop.tif", slice(40, 140), slice(60, 130))
    bundle = ModelBundle.load(export)
    for codebooks in (1, 8):
        engine = RecordingEngine(LocalEngine(bundle, threads=1))
        data = _compress(bundle, engine, rvq_inputs(case), bands=SSL4EO_BANDS, rate=codebooks)
        (case / f"rvq.c{codebooks}.nec").write_bytes(data)
    # The encoder output does not depend on the rate: the last run's batches serve both.
    # The RVQ family reads no latent (it reports no rounding error): kept in float16 to
    # keep the folder small.
    _save_engine(case, engine.batches, np.float16)


def rvq_inputs(case: Path):
    """The RVQ case's input, read as the CLI reads it (ten bands of the cropped scene)."""
    from nec_serve.imagery import iter_inputs

    yield from iter_inputs(case / "scene_crop.tif", SSL4EO_BANDS)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        make_nec(Path(tmp))
        make_rvq(Path(tmp))
    sizes = {p.name: p.stat().st_size for p in sorted(HERE.rglob("*")) if p.is_file()}
    print(json.dumps(sizes, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
