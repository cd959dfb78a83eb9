"""Golden containers: the bytes of a container for fixed inputs do not change.

tests/golden/make_golden.py made each case once from a shipped model (see its docstring):
the entropy tables and the encoder graph's output are frozen there, so these tests pin
everything on the CPU side of the engine — reading, tiling, normalisation (the floats the
graph is given are checked by hash), entropy coding and the container format — on any
machine. A refactor that changes one byte of a container fails here.
"""

from __future__ import annotations

import hashlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest

from nec_serve.bundle import ModelBundle
from nec_serve.container import ContainerReader
from nec_serve.pipeline import compress, decompress

GOLDEN = Path(__file__).resolve().parents[2] / "golden"
sys.path.insert(0, str(GOLDEN))
import make_golden  # noqa: E402


class ReplayEngine:
    """The encoder graph's recorded output, batch by batch, for the floats it was given."""

    def __init__(self, case: Path):
        with np.load(case / "engine.npz") as z:
            self.batches = [
                (str(z[f"input_sha256_{i}"]), z[f"symbols_{i}"], z[f"latent_{i}"])
                for i in range(sum(k.startswith("symbols_") for k in z.files))
            ]
        self.calls = 0

    def encode(self, images: np.ndarray):
        digest, symbols, latent = self.batches[self.calls]
        got = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
        assert got == digest, f"batch {self.calls}: the graph would be given other floats"
        self.calls += 1
        return symbols, latent.astype(np.float32)

    def decode(self, role, symbols):
        raise AssertionError(f"the golden tests decode symbols only, not {role}")

    @property
    def symbols(self) -> np.ndarray:
        return np.concatenate([s for _, s, _ in self.batches])


def _compress(case: Path, inputs, **kwargs) -> tuple[bytes, ReplayEngine]:
    engine = ReplayEngine(case)
    buf = io.BytesIO()
    compress(inputs, ModelBundle.load(case), engine, buf, batch_size=2, **kwargs)
    assert engine.calls == len(engine.batches)
    return buf.getvalue(), engine


def _decoded_symbols(container: bytes, case: Path) -> np.ndarray:
    _, _, symbols = decompress(io.BytesIO(container), ModelBundle.load(case), None, "symbols")
    return symbols


def test_nec_container_is_byte_identical():
    case = GOLDEN / "nec"
    data, engine = _compress(case, make_golden.nec_inputs(case))
    golden = (case / "nec.nec").read_bytes()
    assert data == golden
    records = list(ContainerReader(io.BytesIO(golden)))
    assert [r.source for r in records] == ["AnnualCrop_1001.jpg", "AnnualCrop_1005.jpg"] + [
        "naip_crop.npy"
    ] * 6
    np.testing.assert_array_equal(_decoded_symbols(golden, case), engine.symbols)


@pytest.mark.parametrize("codebooks", [1, 8])
def test_rvq_container_is_byte_identical(codebooks):
    case = GOLDEN / "rvq"
    data, engine = _compress(
        case, make_golden.rvq_inputs(case), bands=make_golden.SSL4EO_BANDS, rate=codebooks
    )
    golden = (case / f"rvq.c{codebooks}.nec").read_bytes()
    assert data == golden
    reader = ContainerReader(io.BytesIO(golden))
    assert reader.header.meta["codebooks"] == codebooks
    assert len(list(reader)) == 4  # 100 x 70 px in tiles of 64
    assert list(reader.sources) == ["scene_crop.tif"]  # the source's georeferencing
    decoded = _decoded_symbols(golden, case)
    np.testing.assert_array_equal(decoded[:, :codebooks], engine.symbols[:, :codebooks])


@pytest.mark.parametrize(
    ("case", "new", "old"),
    [
        ("nec", "nec.nec", "nec.v2.nec"),
        ("rvq", "rvq.c1.nec", "rvq.c1.v2.nec"),
        ("rvq", "rvq.c8.nec", "rvq.c8.v2.nec"),
    ],
)
def test_format_2_goldens_still_decode_to_what_format_3_holds(case, new, old):
    """The format 2 containers (frozen, never regenerated) read as their format 3 twins."""
    folder = GOLDEN / case
    v3, v2 = (folder / new).read_bytes(), (folder / old).read_bytes()
    assert ContainerReader(io.BytesIO(v2)).header.version == 2
    new_records, old_records = (list(ContainerReader(io.BytesIO(d))) for d in (v3, v2))

    def place(r):
        return r.index, r.source, r.row, r.col, r.source_height, r.source_width

    assert list(map(place, new_records)) == list(map(place, old_records))
    if case == "nec":  # one CompressAI stream per tile, in both formats
        assert [r.payload for r in new_records] == [r.payload for r in old_records]
    else:  # RVQ codes each batch (of 2 here) as one stream
        assert [(r.part, r.parts) for r in new_records] == [(0, 2), (1, 2)] * 2
    assert len(v3) < len(v2)
    np.testing.assert_array_equal(_decoded_symbols(v3, folder), _decoded_symbols(v2, folder))
