"""Ten-band Sentinel-2 training data from ``../shared/data``: scan, split, load.

Three sources hold the bands the RVQ compressor takes (:data:`nec_models.rvq.S2_BANDS`):

- ``ssl4eo_s12/``: 264x264 L2A scenes, int16, 12 bands (B01-B12 without B10);
- ``eurosat_ms/``: 64x64 L1C patches, uint16, 13 bands (B01-B12 with B8A after B08);
- ``bigearthnet/``: 120x120 L2A patch folders, one uint16 file per band (20 m bands are
  upsampled to 10 m with bilinear resampling by the reader).

Every item is read through the service's own readers (so training sees exactly what the
service reads) as reflectance x 10000 and kept in memory as float32 ``[0, ~1]``.

The split is by *group*, never by crop: an SSL4EO location with its four seasons, a
BigEarthNet patch or a EuroSAT patch goes wholly into train, val or test, so no test
pixel was ever seen in training. It is made once from a seed and written to
``split.csv`` (``part,dataset,group,path``); a resumed run reads it back.
"""

from __future__ import annotations

import csv
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nec_serve.errors import InvalidInput
from nec_serve.imagery import read_raster
from nec_serve.imagery.readers import is_bigearthnet_patch, read_bigearthnet_patch

__all__ = ["S2Item", "scan_s2", "split_s2", "write_s2_split", "read_s2_split", "load_s2"]

#: 1-based band indices of B02, B03, B04, B05, B06, B07, B08, B8A, B11, B12 per source.
_BANDS = {
    "ssl4eo_s12": [2, 3, 4, 5, 6, 7, 8, 9, 11, 12],
    "eurosat_ms": [2, 3, 4, 5, 6, 7, 8, 9, 12, 13],
}
_SSL4EO = re.compile(r"_(\d+)_\d+\.tif$")


@dataclass(frozen=True)
class S2Item:
    """One image: its dataset, the group it is split with, its path."""

    dataset: str
    group: str
    path: str


def _dataset_of(root: Path) -> str:
    if root.name in _BANDS or root.name == "bigearthnet":
        return root.name
    if any(is_bigearthnet_patch(p) for p in root.iterdir() if p.is_dir()):
        return "bigearthnet"
    if any(root.rglob("*.tif")):
        first = next(root.rglob("*.tif"))
        return "ssl4eo_s12" if _SSL4EO.search(first.name) else "eurosat_ms"
    raise InvalidInput(f"{root}: neither SSL4EO-S12, EuroSAT MS nor BigEarthNet data")


def scan_s2(roots: list[str | os.PathLike[str]]) -> list[S2Item]:
    """The images under each root (an ``ssl4eo_s12``, ``eurosat_ms`` or ``bigearthnet`` folder)."""
    items = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise InvalidInput(f"--data {root}: no such directory")
        dataset = _dataset_of(root)
        if dataset == "bigearthnet":
            for p in sorted(q for q in root.iterdir() if is_bigearthnet_patch(q)):
                items.append(S2Item(dataset, p.name, str(p)))
        else:
            for p in sorted(root.rglob("*.tif")):
                m = _SSL4EO.search(p.name)
                group = m.group(1) if dataset == "ssl4eo_s12" and m else p.stem
                items.append(S2Item(dataset, group, str(p)))
    if not items:
        raise InvalidInput(f"--data {[str(r) for r in roots]}: no Sentinel-2 images found")
    return items


def split_s2(
    items: list[S2Item], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, list[S2Item]]:
    """Split by group, per dataset: ``fractions`` of groups to train/val/test.

    A dataset of fewer than ten groups gives one group to test and none to val (it is
    too small to give both), so each dataset is tested on images it never trained on.
    """
    parts: dict[str, list[S2Item]] = {"train": [], "val": [], "test": []}
    for dataset in sorted({i.dataset for i in items}):
        groups = sorted({i.group for i in items if i.dataset == dataset})
        random.Random(f"{seed}:{dataset}").shuffle(groups)
        if len(groups) < 10:
            n_test, n_val = (1 if len(groups) > 1 else 0), 0
        else:
            n_test = max(1, round(fractions[2] * len(groups)))
            n_val = max(1, round(fractions[1] * len(groups)))
        where = {g: "test" for g in groups[:n_test]}
        where.update({g: "val" for g in groups[n_test : n_test + n_val]})
        for item in items:
            if item.dataset == dataset:
                parts[where.get(item.group, "train")].append(item)
    return parts


def write_s2_split(split: dict[str, list[S2Item]], path: Path) -> None:
    """Write ``part,dataset,group,path`` rows."""
    tmp = path.with_name(f".{path.name}.part")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["part", "dataset", "group", "path"])
        for part, items in split.items():
            for i in items:
                w.writerow([part, i.dataset, i.group, i.path])
    os.replace(tmp, path)


def read_s2_split(path: Path) -> dict[str, list[S2Item]]:
    """Read a split written by :func:`write_s2_split`."""
    parts: dict[str, list[S2Item]] = {"train": [], "val": [], "test": []}
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            if row.get("part") not in parts:
                raise InvalidInput(f"{path}: unknown part {row.get('part')!r}")
            parts[row["part"]].append(S2Item(row["dataset"], row["group"], row["path"]))
    return parts


def read_s2_raw(item: S2Item) -> np.ndarray:
    """The item's ten bands as the service reads them: ``(10, H, W)``, the file's dtype."""
    from nec_models.rvq import S2_BANDS

    if item.dataset == "bigearthnet":
        return read_bigearthnet_patch(item.path, S2_BANDS)
    return read_raster(item.path, _BANDS[item.dataset])


def load_s2(items: list[S2Item]) -> list[np.ndarray]:
    """Each item as float32 reflectance ``(10, H, W)`` (x 10000 undone, negatives at 0)."""
    out = []
    for item in items:
        arr = read_s2_raw(item).astype(np.float32)
        np.maximum(arr, 0, out=arr)
        arr /= 10000.0
        out.append(arr)
    return out
