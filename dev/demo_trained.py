"""The demo on a shipped, trained NEC model: Sentinel-2 RGB it fits, bits and accuracy.

The shipped EuroSAT models take 64 px Sentinel-2 RGB as EuroSAT's RGB product renders it:
8-bit B04, B03, B02. Four sources of the data folder (:mod:`nec_dev.data`) fit that:

* ``eurosat_test``: the EuroSAT RGB test split the model never saw (its ``split.csv``
  ships beside the weights), labelled: top-1 of the model's own classifier graph;
* ``eurosat_ms``: the EuroSAT multispectral GeoTIFFs (uint16 L1C), rendered to 8-bit RGB as
  EuroSAT did (``DN / 10.71``, measured here: the median ratio over the 219 patches present
  in both products, 10th-90th percentile 10.64-10.75); labelled, but top-1 is counted only
  on patches whose RGB twin is in the test split or absent from ``eurosat_rgb``;
* ``bigearthnet`` and ``ssl4eo``: Sentinel-2 L2A patches and scenes rendered the same way
  (L2A is surface, not top-of-atmosphere, reflectance: a shift the model was not trained
  on), unlabelled for these classes: bits per image and the predicted classes.

Every source is compressed into one container with the export's graphs and rANS coder,
then decoded twice: to embeddings (their error against the encoder's latent) and to class
scores (``decompress --output classes``).
"""

from __future__ import annotations

import json
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nec_export import export_model
from nec_models.eurosat import CLASSES, read_split
from nec_models.shipped import load_trained, materialize, shipped_models
from nec_serve.bundle import ModelBundle
from nec_serve.contract import MANIFEST_FILENAME, Manifest
from nec_serve.errors import SchemaVersionError
from nec_serve.imagery import iter_inputs, read_raster
from nec_serve.pipeline import class_report, compress, decompress, tile_index

__all__ = [
    "export_shipped",
    "trained_sources",
    "run_trained_sources",
    "eurosat_workflow_inputs",
    "EUROSAT_DN_PER_LEVEL",
    "RecordingEngine",
]

#: Sentinel-2 DN (reflectance x 10000) per 8-bit level of EuroSAT's RGB product.
EUROSAT_DN_PER_LEVEL = 10.71


def export_shipped(name: str, out: Path) -> ModelBundle:
    """Export the shipped model ``name`` to ``out`` (reused when it is already there)."""
    entry = shipped_models()[name]
    if (out / MANIFEST_FILENAME).exists():
        try:
            if Manifest.load(out).checkpoint_sha256 == entry["sha256"]:
                print(f"[export] reusing {out}")
                return ModelBundle.load(out)
        except SchemaVersionError as err:
            print(f"[export] not reusing {out}: {err}")
    t0 = time.perf_counter()
    ckpt = materialize(name)
    model = load_trained(ckpt)
    man = export_model(model, out, checkpoint_sha256=entry["sha256"], trained=ckpt["args"])
    print(
        f"[export] shipped {name} ({entry['model']}): graphs "
        f"{', '.join(str(r) for r in man.graphs)} in {time.perf_counter() - t0:.1f} s"
    )
    return ModelBundle.load(out)


class RecordingEngine:
    """Keeps the continuous latents so a demo can measure the decoded embeddings' error."""

    def __init__(self, inner):
        self.inner = inner
        self.latents: list[np.ndarray] = []

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The inner engine's encode, keeping the latent."""
        symbols, latent = self.inner.encode(images)
        self.latents.append(latent)
        return symbols, latent

    def decode(self, role, symbols: np.ndarray) -> np.ndarray:
        """The inner engine's decode."""
        return self.inner.decode(role, symbols)


def _to_8bit(dn: np.ndarray) -> np.ndarray:
    return np.clip(np.round(dn.astype(np.float32) / EUROSAT_DN_PER_LEVEL), 0, 255).astype(np.uint8)


def _split(weights_dir: Path) -> dict[str, list[tuple[str, int]]]:
    return {
        part: [(i.path, i.label) for i in items]
        for part, items in read_split(weights_dir / "split.csv").items()
    }


def _present(items: list[tuple[str, int]], root: Path) -> list[tuple[str, int]]:
    """The split's items found under ``root`` (sample data holds a subset)."""
    return [(p, label) for p, label in items if (root / p).is_file()]


def trained_sources(data: Path, weights_dir: Path) -> dict[str, tuple[Iterator, dict]]:
    """Source name -> (``(name, uint8 (3, H, W))`` inputs, ``{name: label}`` to score).

    The EuroSAT test split is read where its files are (all of them in the full data, a
    subset in the sample data); a EuroSAT MS patch is scored only when its RGB twin is in
    the test split or in no split at all, so no score comes from a training image.
    """
    sources: dict[str, tuple[Iterator, dict]] = {}
    split = _split(weights_dir)
    if (data / "eurosat_rgb").exists():
        test = _present(split["test"], data / "eurosat_rgb")
        if len(test) < len(split["test"]):
            print(f"[eurosat_test] {len(test)} of the {len(split['test']):,} test images present")
        sources["eurosat_test"] = (
            ((p, read_raster(data / "eurosat_rgb" / p)) for p, _ in test),
            dict(test),
        )
    if (data / "eurosat_ms").exists():
        twins_in_test = {p for p, _ in split["test"]}
        in_split = {p for items in split.values() for p, _ in items}
        labels = {}
        for tif in sorted((data / "eurosat_ms").glob("*/*.tif")):
            twin = f"{tif.parent.name}/{tif.stem}.jpg"
            if twin in twins_in_test or twin not in in_split:
                labels[f"{tif.parent.name}/{tif.name}"] = CLASSES.index(tif.parent.name)
        sources["eurosat_ms"] = (
            (
                (f"{t.parent.name}/{t.name}", _to_8bit(read_raster(t, [4, 3, 2])))
                for t in sorted((data / "eurosat_ms").glob("*/*.tif"))
            ),
            labels,
        )
    if (data / "bigearthnet").exists():
        sources["bigearthnet"] = (
            ((n, _to_8bit(a)) for n, a in iter_inputs(data / "bigearthnet")),
            {},
        )
    if (data / "ssl4eo_s12").exists():
        sources["ssl4eo"] = (
            (
                (n, _to_8bit(np.maximum(a, 0)))
                for n, a in iter_inputs(data / "ssl4eo_s12", [4, 3, 2])
            ),
            {},
        )
    return sources


def run_trained_sources(
    bundle: ModelBundle, engine, data: Path, weights_dir: Path, work: Path, batch_size: int
) -> list[dict]:
    """Compress and decode every source; one summary row each."""
    rows = []
    for name, (inputs, labels) in trained_sources(data, weights_dir).items():
        container = work / f"{name}.necb"
        rec = RecordingEngine(engine)
        with container.open("wb") as f:
            stats = compress(inputs, bundle, rec, f, batch_size=batch_size)
        t0 = time.perf_counter()
        with container.open("rb") as f:
            _, records, emb = decompress(f, bundle, engine, "embeddings", batch_size)
        with container.open("rb") as f:
            _, _, scores = decompress(f, bundle, engine, "classes", batch_size)
        t_dec = time.perf_counter() - t0
        report = class_report(
            tile_index(records), scores, bundle.manifest.family_params.class_names
        )
        (work / f"{name}.classes.json").write_text(json.dumps(report))
        err = emb - np.concatenate(rec.latents).transpose(0, 2, 1)
        scored = [t for t in report["tiles"] if t["source"] in labels]
        right = sum(CLASSES[labels[t["source"]]] == t["class"] for t in scored)
        top = Counter(t["class"] for t in report["tiles"]).most_common(3)
        rows.append(
            {
                "dataset": name,
                **stats.report().to_wire(),
                "bits_per_image": round(8 * stats.container_bytes / max(stats.images, 1), 1),
                "vs_float32_embeddings": round(emb.size * 4 / stats.container_bytes, 2),
                "top1": round(right / len(scored), 4) if scored else None,
                "scored": len(scored),
                "predicted": ", ".join(f"{c} {n}" for c, n in top),
                "decoded_rmse": round(float(np.sqrt(np.mean(err**2))), 5),
                "decoded_max_abs_err": round(float(np.abs(err).max()), 5),
                "decompress_s": round(t_dec, 3),
            }
        )
        print(f"[{name}] " + json.dumps(rows[-1]))
    return rows


def eurosat_workflow_inputs(data: Path, tmp: Path, weights_dir: Path) -> list[tuple[str, Path]]:
    """What the workflow demo drops in S3 for a trained model.

    A ``.tar.gz`` of 50 EuroSAT test-split JPEGs (5 per class) and one SSL4EO scene
    rendered to 8-bit RGB (``.npy``).
    """
    per_class: dict[int, int] = {}
    members = []
    for path, label in _present(_split(weights_dir)["test"], data / "eurosat_rgb"):
        if per_class.get(label, 0) < 5:
            per_class[label] = per_class.get(label, 0) + 1
            members.append((f"eurosat/{path}", data / "eurosat_rgb" / path))
    tar = tmp / "eurosat_test_50.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        for arcname, path in members:
            tf.add(path, arcname=arcname)
    out = [("eurosat_test_50.tar.gz", tar)]
    scenes = sorted((data / "ssl4eo_s12").glob("*.tif"))
    if scenes:
        npy = tmp / f"{scenes[0].stem}_rgb8.npy"
        np.save(npy, _to_8bit(np.maximum(read_raster(scenes[0], [4, 3, 2]), 0)))
        out.append((npy.name, npy))
    return out
