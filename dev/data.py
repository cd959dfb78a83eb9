"""Where the demo, the tests and the benchmarks find their imagery.

One resolver, in this order:

1. ``--data DIR`` (the caller's argument);
2. ``$NEC_DATA``;
3. ``../shared/data`` beside the checkout, where it exists (the full sample data sets);
4. ``data/samples/`` in the checkout: a small subset of the same folders that travels with
   the repository, taken from the test splits of the shipped models only, every file
   recorded in ``data/samples/SHA256SUMS`` (see its README for sources and licences).

A data folder holds one or more of :data:`FOLDERS` (``eurosat_rgb/<Class>/*.jpg``,
``eurosat_ms/<Class>/*.tif``, ``bigearthnet/<patch>/``, ``ssl4eo_s12/*.tif``, ``naip/*.tif``,
``landsat/*.tif``); a folder with none of them is refused, naming what was looked for. A
folder with a ``SHA256SUMS`` is checked against it before use: a file that is missing, not
listed or whose bytes differ is refused, by name.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nec_serve.errors import InvalidInput

__all__ = [
    "ENV_VAR",
    "FOLDERS",
    "MANIFEST",
    "DataDir",
    "checkout",
    "open_data",
    "resolve_data",
    "samples_dir",
    "shared_dir",
    "verify_manifest",
    "write_manifest",
]

#: The environment variable naming a data folder (after ``--data``, before ``../shared/data``).
ENV_VAR = "NEC_DATA"
#: The sub-folders a data folder may hold, in the layout of ``../shared/data``.
FOLDERS = ("eurosat_rgb", "eurosat_ms", "bigearthnet", "ssl4eo_s12", "naip", "landsat")
#: The checksum file of a sample folder, in ``sha256sum`` format (``sha256sum -c`` reads it).
MANIFEST = "SHA256SUMS"
#: Files of a sample folder that document it and are not data (not checksummed).
_DOCS = frozenset({MANIFEST, "README.md"})


def checkout() -> Path:
    """The repository checkout this module lives in."""
    return Path(__file__).resolve().parents[1]


def samples_dir() -> Path:
    """``data/samples/`` in the checkout: the sample data that travels with the repository."""
    return checkout() / "data" / "samples"


def shared_dir() -> Path:
    """``../shared/data`` beside the checkout (the full sample data sets, where present)."""
    return checkout().parent / "shared" / "data"


@dataclass(frozen=True)
class DataDir:
    """A resolved data folder.

    Attributes:
        root: the folder.
        origin: how it was chosen (``--data``, ``$NEC_DATA``, ``../shared/data``, ``samples``).
        samples: whether it is a checksummed sample folder (a subset: figures are indicative).
        folders: which of :data:`FOLDERS` it holds.
        files: how many files its ``SHA256SUMS`` verified (0 without one).
    """

    root: Path
    origin: str
    samples: bool
    folders: tuple[str, ...]
    files: int = 0

    def describe(self) -> str:
        """One line for the first lines of a report: which data, from where, what kind."""
        if self.samples:
            kind = f"sample data, {self.files} files verified against {MANIFEST}"
        else:
            kind = "full data"
        return f"{self.root} ({self.origin}; {kind}): {', '.join(self.folders)}"


def resolve_data(arg: str | os.PathLike[str] | None = None, environ=None) -> DataDir:
    """The data folder to use: ``arg`` > ``$NEC_DATA`` > ``../shared/data`` > ``data/samples``.

    Raises:
        InvalidInput: the chosen folder is missing, holds none of :data:`FOLDERS`, or a
            file of its ``SHA256SUMS`` is missing, unlisted or changed.
    """
    environ: Mapping[str, str] = os.environ if environ is None else environ
    if arg:
        return open_data(Path(arg), "--data")
    if environ.get(ENV_VAR):
        return open_data(Path(environ[ENV_VAR]), f"${ENV_VAR}")
    if shared_dir().is_dir():
        return open_data(shared_dir(), "../shared/data")
    return open_data(samples_dir(), "samples")


def open_data(root: str | os.PathLike[str], origin: str = "--data") -> DataDir:
    """Check ``root`` as a data folder (``origin`` names where it came from in errors)."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidInput(f"{origin} {root}: no such directory")
    folders = tuple(f for f in FOLDERS if (root / f).is_dir())
    if not folders:
        raise InvalidInput(
            f"{origin} {root}: none of the expected sub-folders {', '.join(FOLDERS)} is there "
            f"(the layout of ../shared/data or of data/samples in the checkout)"
        )
    files = verify_manifest(root) if (root / MANIFEST).is_file() else 0
    return DataDir(root, origin, files > 0, folders, files)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _data_files(root: Path) -> list[Path]:
    """Every file under ``root`` but its documentation (:data:`_DOCS`), sorted."""
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in _DOCS
    )


def _read_manifest(root: Path) -> dict[str, str]:
    """``relative path -> SHA-256`` of ``root/SHA256SUMS``; bad lines are refused."""
    listed: dict[str, str] = {}
    manifest = root / MANIFEST
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        rel = rel.removeprefix("*")
        bad = not sep or len(digest) != 64 or set(digest) - set("0123456789abcdef")
        parts = Path(rel).parts
        if bad or not rel or Path(rel).is_absolute() or ".." in parts or rel in listed:
            raise InvalidInput(f"{manifest}:{n}: not a '<sha256>  <relative path>' line: {line!r}")
        listed[rel] = digest
    if not listed:
        raise InvalidInput(f"{manifest}: lists no files")
    return listed


def verify_manifest(root: str | os.PathLike[str]) -> int:
    """Check every file under ``root`` against ``root/SHA256SUMS``; returns the file count.

    Raises:
        InvalidInput: naming the first file that is missing, not listed, or whose SHA-256
            differs from the one recorded.
    """
    root = Path(root)
    listed = _read_manifest(root)
    present = {p.relative_to(root).as_posix() for p in _data_files(root)}
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise InvalidInput(
            f"{root / unlisted[0]}: not listed in {root / MANIFEST}; sample folders hold only "
            f"recorded files (scripts/make_samples.py writes both)"
        )
    for rel, want in sorted(listed.items()):
        path = root / rel
        if not path.is_file():
            raise InvalidInput(f"{path}: listed in {root / MANIFEST} but missing")
        got = _sha256(path)
        if got != want:
            raise InvalidInput(
                f"{path}: SHA-256 {got} is not the {want} recorded in {root / MANIFEST}; "
                f"the sample file was changed or damaged (`git checkout -- {rel}` in "
                f"{root} restores a committed one)"
            )
    return len(listed)


def write_manifest(root: str | os.PathLike[str]) -> int:
    """Write ``root/SHA256SUMS`` for every data file under ``root``; returns the file count."""
    root = Path(root)
    files = _data_files(root)
    lines = [f"{_sha256(p)}  {p.relative_to(root).as_posix()}\n" for p in files]
    (root / MANIFEST).write_text("".join(lines))
    return len(files)
