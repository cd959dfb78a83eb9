"""Dispatch of one input (a raster, a tar archive, a BigEarthNet patch or a folder).

:func:`iter_inputs` walks whatever one message names, hands each file to its reader
(:mod:`~nec_serve.imagery.readers`, :mod:`~nec_serve.imagery.archives`), charges all
images to one :class:`~nec_serve.imagery.limits.Budget` and passes each through
:func:`~nec_serve.imagery.tiling.check_pixels` before yielding it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from nec_serve.errors import InvalidInput
from nec_serve.imagery.archives import ARCHIVE_SUFFIXES, iter_tar_budgeted
from nec_serve.imagery.formats import check_name
from nec_serve.imagery.limits import Budget, InputLimits
from nec_serve.imagery.readers import (
    BIGEARTHNET_RGB,
    RASTER_SUFFIXES,
    is_bigearthnet_patch,
    read_bigearthnet_budgeted,
    read_raster_budgeted,
)
from nec_serve.imagery.tiling import check_pixels

__all__ = ["iter_inputs"]


def _is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _iter_folder(
    root: Path,
    folder: Path,
    bands: Sequence[int] | None,
    bigearthnet_bands: Sequence[str],
    budget: Budget,
    label: str,
) -> Iterator[tuple[str, np.ndarray]]:
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        check_name(entry.name, label if folder == root else f"{label}/{folder.relative_to(root)}")
        rel = entry.relative_to(root).as_posix()
        what = f"{label}/{rel}"
        if entry.is_dir():
            if entry.is_symlink():
                continue
            if is_bigearthnet_patch(entry):
                yield rel, read_bigearthnet_budgeted(entry, bigearthnet_bands, budget, what)
            else:
                yield from _iter_folder(root, entry, bands, bigearthnet_bands, budget, label)
        elif _is_archive_name(entry.name):
            for member, arr in iter_tar_budgeted(entry, bands, budget, what):
                yield f"{rel}/{member}", arr
        elif entry.suffix.lower() in RASTER_SUFFIXES:
            yield rel, read_raster_budgeted(entry, bands, budget, what)


def iter_inputs(
    path: str | os.PathLike[str],
    bands: Sequence[int] | None = None,
    *,
    bigearthnet_bands: Sequence[str] = BIGEARTHNET_RGB,
    limits: InputLimits | None = None,
    label: str | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield every image under ``path`` as ``(name, (bands, H, W) array)``, checked.

    ``path`` may be a GeoTIFF or ``.npy`` file (one item, named by the file name), a tar
    archive (``.tar``, ``.tar.gz``, ``.tgz``, ...; its image members, named by member
    path), a BigEarthNet patch folder (one item: ``bigearthnet_bands`` as 120x120, named by
    the folder name), or a folder of any of these, walked recursively in sorted order and
    named by their path relative to ``path`` (archive members as ``archive/member``).
    Hidden entries, symlinked folders and files of other types in folders are skipped.
    Each image's declared geometry is checked against ``limits`` before it is read, all
    images together may decode to at most ``limits.max_decoded_bytes``, and every array
    passes :func:`check_pixels` before it is yielded.

    Args:
        path: file or folder.
        bands: 1-based band indices for GeoTIFF/``.npy`` inputs; ``None`` reads all.
        bigearthnet_bands: band names read from BigEarthNet patch folders.
        limits: what the input may declare; ``None`` uses the :class:`InputLimits`
            defaults.
        label: what to call ``path`` in errors (e.g. ``s3://bucket/key`` for a downloaded
            temporary file); the local path then appears in no error message. Item names
            are not affected.

    Yields:
        ``(name, array)`` in a stable order.

    Raises:
        InvalidInput: for a missing path, an unsupported file type, a folder without any
            input, a declared geometry over ``limits`` (naming the limit), or any error of
            the readers.
    """
    p = Path(path)
    label = check_name(str(p) if label is None else label)
    budget = Budget(limits)
    if not p.exists():
        raise InvalidInput(f"{label}: no such file or directory")
    single = False
    if p.is_dir():
        if is_bigearthnet_patch(p):
            single = True
            items: Iterator[tuple[str, np.ndarray]] = iter(
                [(p.name, read_bigearthnet_budgeted(p, bigearthnet_bands, budget, label))]
            )
        else:
            items = _iter_folder(p, p, bands, bigearthnet_bands, budget, label)
    elif _is_archive_name(p.name):
        items = iter_tar_budgeted(p, bands, budget, label)
    elif p.suffix.lower() in RASTER_SUFFIXES:
        single = True
        items = iter([(p.name, read_raster_budgeted(p, bands, budget, label))])
    else:
        raise InvalidInput(
            f"{label}: unsupported input {p.suffix or '(no suffix)'!r}; expected a "
            f"{'/'.join(RASTER_SUFFIXES)} file, a tar archive "
            f"({'/'.join(ARCHIVE_SUFFIXES)}), a BigEarthNet patch folder or a folder of these"
        )
    count = 0
    for name, arr in items:
        check_pixels(arr, label if single else f"{label}/{name}")
        count += 1
        yield name, arr
    if count == 0:
        raise InvalidInput(
            f"{label}: contains no .tif/.tiff/.npy files, tar archives or BigEarthNet patches"
        )
