"""EuroSAT RGB for training: a deterministic stratified split, recorded, and a decoded cache.

``<root>/<Class>/<Class>_<n>.jpg`` (64x64 RGB JPEG, 10 land-use classes) has no official
split. :func:`make_split` makes one: per class, the file names are sorted, shuffled with a
seeded generator and cut into train / validation / test by the given fractions, so every
class is represented in each part in proportion and the same seed always gives the same
split. The split is written as a CSV (``path,label,split``, paths relative to the root) and
travels with the model card; :func:`read_split` reads one back, checking each row, and
refuses a class name that is not EuroSAT's. Keep the test part for the final numbers only.

:func:`decode` turns a list of images into one ``(N, 64, 64, 3)`` uint8 array, written once
as an ``.npy`` beside the split and memory-mapped afterwards, so training never decodes a
JPEG twice. An image that cannot be decoded, or is not 64x64 RGB, is skipped and counted
(``Decoded.skipped`` names each with the reason): one bad file does not stop a run, and the
count goes into the model card.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from nec_serve.errors import InvalidInput

__all__ = [
    "CLASSES",
    "SPLITS",
    "Item",
    "Decoded",
    "scan",
    "make_split",
    "write_split",
    "read_split",
    "decode",
]

#: EuroSAT's classes, in the order of their label index.
CLASSES = (
    "AnnualCrop",
    "Forest",
    "HerbaceousVegetation",
    "Highway",
    "Industrial",
    "Pasture",
    "PermanentCrop",
    "Residential",
    "River",
    "SeaLake",
)
SPLITS = ("train", "val", "test")
SIZE = 64
_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


@dataclass(frozen=True, order=True)
class Item:
    """One labelled image: its path relative to the dataset root, and its class index."""

    path: str
    label: int

    @property
    def class_name(self) -> str:
        """The class name of :attr:`label`."""
        return CLASSES[self.label]


def scan(root: str | os.PathLike[str]) -> list[Item]:
    """Every image under ``root/<Class>/``, sorted; folders that are not classes are refused.

    Raises:
        InvalidInput: ``root`` missing or not a folder, a sub-folder whose name is not a
            EuroSAT class, or no image at all.
    """
    root = Path(root)
    if not root.is_dir():
        raise InvalidInput(f"{root}: no such data folder")
    items = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name not in CLASSES:
            raise InvalidInput(
                f"{root}: folder {folder.name!r} is not a EuroSAT class; expected "
                f"{', '.join(CLASSES)}"
            )
        label = CLASSES.index(folder.name)
        items.extend(
            Item(f"{folder.name}/{f.name}", label)
            for f in sorted(folder.iterdir())
            if f.is_file() and f.suffix.lower() in _SUFFIXES
        )
    if not items:
        raise InvalidInput(f"{root}: no images under <Class>/ folders")
    return items


def make_split(
    items: Iterable[Item], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, list[Item]]:
    """A stratified split of ``items`` into :data:`SPLITS`, the same for the same seed.

    Per class: the items sorted by path, shuffled by ``numpy.random.default_rng(seed +
    label)``, the first ``round(n * fractions[0])`` to train, the next
    ``round(n * fractions[1])`` to validation, the rest to test.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise InvalidInput(f"split fractions must be three numbers >= 0 summing to 1: {fractions}")
    by_class: dict[int, list[Item]] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    out: dict[str, list[Item]] = {s: [] for s in SPLITS}
    for label, members in sorted(by_class.items()):
        members = sorted(members)
        order = np.random.default_rng(seed + label).permutation(len(members))
        n_train = round(len(members) * fractions[0])
        n_val = round(len(members) * fractions[1])
        cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val]}
        cuts["test"] = order[n_train + n_val :]
        for split, idx in cuts.items():
            out[split].extend(members[i] for i in idx)
    return {s: sorted(v) for s, v in out.items()}


def write_split(split: dict[str, list[Item]], path: str | os.PathLike[str]) -> str:
    """Write ``split`` as ``path,label,split`` rows; returns the file's SHA-256."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "split"])
    for name in SPLITS:
        for item in split.get(name, []):
            writer.writerow([item.path, item.class_name, name])
    data = buf.getvalue().encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def read_split(path: str | os.PathLike[str]) -> dict[str, list[Item]]:
    """Read a split file written by :func:`write_split`, checking every row.

    Raises:
        InvalidInput: naming the file and line, for a missing file, a wrong header, an
            unknown class or split name, a path outside the dataset, or a path listed twice.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInput(f"{path}: cannot read the split file: {err}") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or rows[0] != ["path", "label", "split"]:
        raise InvalidInput(f"{path}: not a split file (expected the header path,label,split)")
    out: dict[str, list[Item]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 3:
            raise InvalidInput(f"{path}:{line}: expected 3 fields, got {len(row)}")
        rel, label, split = row
        if label not in CLASSES:
            raise InvalidInput(f"{path}:{line}: unknown class {label!r}")
        if split not in SPLITS:
            raise InvalidInput(f"{path}:{line}: unknown split {split!r}, expected one of {SPLITS}")
        if rel.startswith("/") or ".." in rel.split("/") or not rel:
            raise InvalidInput(f"{path}:{line}: path {rel!r} is not inside the dataset")
        if rel in seen:
            raise InvalidInput(f"{path}:{line}: {rel!r} is listed twice")
        seen.add(rel)
        out[split].append(Item(rel, CLASSES.index(label)))
    return out


@dataclass
class Decoded:
    """Images decoded into one array, with their labels and what was skipped."""

    images: np.ndarray  # (N, 64, 64, 3) uint8
    labels: np.ndarray  # (N,) int64
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _decode_one(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        if im.size != (SIZE, SIZE):
            raise ValueError(f"is {im.size[0]}x{im.size[1]}, expected {SIZE}x{SIZE}")
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def decode(
    root: str | os.PathLike[str], items: Sequence[Item], cache: str | os.PathLike[str] | None = None
) -> Decoded:
    """Decode ``items`` (paths under ``root``) once; with ``cache``, reuse it when it matches.

    The cache is ``<cache>.images.npy``, ``<cache>.labels.npy`` and ``<cache>.skipped.csv``,
    written under temporary names and renamed when complete, then ``<cache>.key`` (a digest
    of the item list) last: a changed list, or a cache cut short, decodes again. Images from
    the cache come memory-mapped.
    """
    root = Path(root)
    key = hashlib.sha256("\n".join(f"{i.path},{i.label}" for i in items).encode()).hexdigest()
    if cache is not None:
        base = Path(cache)
        paths = {
            s: base.with_name(f"{base.name}.{s}")
            for s in ("images.npy", "labels.npy", "skipped.csv", "key")
        }
        if paths["key"].exists() and paths["key"].read_text() == key:
            skipped = [tuple(r) for r in csv.reader(io.StringIO(paths["skipped.csv"].read_text()))]
            return Decoded(
                np.load(paths["images.npy"], mmap_mode="r"),
                np.load(paths["labels.npy"]),
                skipped,
            )
    images = np.empty((len(items), SIZE, SIZE, 3), np.uint8)
    labels = np.empty(len(items), np.int64)
    skipped: list[tuple[str, str]] = []
    n = 0
    for item in items:
        try:
            images[n] = _decode_one(root / item.path)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            skipped.append((item.path, str(err) or type(err).__name__))
            continue
        labels[n] = item.label
        n += 1
    if n == 0:
        raise InvalidInput(f"{root}: none of {len(items)} images could be decoded")
    out = Decoded(images[:n], labels[:n], skipped)
    if cache is not None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(skipped)
        _atomic(paths["images.npy"], lambda f: np.save(f, out.images))
        _atomic(paths["labels.npy"], lambda f: np.save(f, out.labels))
        _atomic(paths["skipped.csv"], lambda f: f.write(buf.getvalue().encode()))
        _atomic(paths["key"], lambda f: f.write(key.encode()))  # last: marks it complete
    return out


def _atomic(path: Path, write) -> None:
    """``write(file)`` to a temporary name beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
