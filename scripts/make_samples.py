"""Make data/samples/ (the sample data that travels with the repository) from the full data.

    .venv/bin/python scripts/make_samples.py [--data ../shared/data] [--out data/samples]

Copies files as they are (bytes unchanged), then writes ``SHA256SUMS``. What is taken, and
why it keeps the shipped numbers honest:

- ``eurosat_rgb/``: the first :data:`EUROSAT_PER_CLASS` images of each class in the test
  split of ``weights/eurosat/split.csv`` (the NEC models never trained on them);
- ``eurosat_ms/``, ``bigearthnet/``, ``ssl4eo_s12/``: the test split of
  ``weights/sentinel2/split.csv`` (the RVQ models never trained on them): every EuroSAT MS
  patch and BigEarthNet patch of it, the first :data:`SSL4EO_SCENES` scenes of its SSL4EO
  location; the NEC models never saw Sentinel-2 L2A or multispectral data at all;
- ``naip/``, ``landsat/``: :data:`NAIP` and :data:`LANDSAT` (no model trained on them; the
  first NAIP scene is the one the untrained ViT-B demo calibrates on, the demo leaves it out).

No file of any training or validation split is taken; the script refuses to.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from nec_dev.data import checkout, shared_dir, write_manifest
from nec_models.eurosat import CLASSES, read_split
from nec_models.sentinel2 import read_s2_split

EUROSAT_PER_CLASS = 30
SSL4EO_SCENES = 2
NAIP = ("m_4709963_se_14_1_20090818.tif", "m_4709963_se_14_1_20180716.tif")
LANDSAT = ("1985.tif", "2015.tif")


def _rel(item) -> Path:
    """A Sentinel-2 split item's path under the data folder (splits record training's path)."""
    parts = Path(item.path).parts
    return Path(*parts[parts.index(item.dataset) :])


def selection(data: Path) -> list[tuple[Path, str]]:
    """``(source, path under the sample folder)`` of every file to copy."""
    root = checkout()
    out: list[tuple[Path, str]] = []
    eurosat = read_split(root / "weights/eurosat/split.csv")
    taken: dict[int, int] = defaultdict(int)
    for item in eurosat["test"]:
        if taken[item.label] < EUROSAT_PER_CLASS:
            taken[item.label] += 1
            out.append((data / "eurosat_rgb" / item.path, f"eurosat_rgb/{item.path}"))
    if sorted(taken) != list(range(len(CLASSES))):
        sys.exit("make_samples: a EuroSAT class has no test image")
    s2 = read_s2_split(root / "weights/sentinel2/split.csv")
    scenes = 0
    for item in sorted(s2["test"], key=lambda i: (i.dataset, i.path)):
        if item.dataset == "ssl4eo_s12":
            scenes += 1
            if scenes > SSL4EO_SCENES:
                continue
        src = data / _rel(item)
        files = sorted(src.iterdir()) if src.is_dir() else [src]
        out += [(f, f.relative_to(data).as_posix()) for f in files]
    out += [(data / "naip" / n, f"naip/{n}") for n in NAIP]
    out += [(data / "landsat" / n, f"landsat/{n}") for n in LANDSAT]
    # A guard on the rules above: nothing a shipped model trained or was validated on.
    seen = {f"eurosat_rgb/{i.path}" for part in ("train", "val") for i in eurosat[part]}
    seen |= {_rel(i).as_posix() for part in ("train", "val") for i in s2[part]}
    for _, rel in out:
        if rel in seen or str(Path(rel).parent) in seen:
            sys.exit(f"make_samples: {rel} is in a training or validation split")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=shared_dir(), help="the full data folder")
    p.add_argument("--out", type=Path, default=checkout() / "data" / "samples")
    args = p.parse_args(argv)
    files = selection(args.data)
    for sub in ("eurosat_rgb", "eurosat_ms", "bigearthnet", "ssl4eo_s12", "naip", "landsat"):
        shutil.rmtree(args.out / sub, ignore_errors=True)
    for src, rel in files:
        dst = args.out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    n = write_manifest(args.out)
    size = sum((args.out / rel).stat().st_size for _, rel in files)
    print(f"make_samples: {n} files, {size / 1e6:.1f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
