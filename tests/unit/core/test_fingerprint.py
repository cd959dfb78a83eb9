"""Compatibility by code: exports that share a code fingerprint decode each other's containers."""

from __future__ import annotations

import io
import json
import shutil
import warnings

import numpy as np
import pytest

from nec_serve.bundle import ModelBundle
from nec_serve.engines import LocalEngine
from nec_serve.errors import TableMismatch
from nec_serve.fingerprint import code_fingerprint
from nec_serve.pipeline import compress, decompress


def _compress(export, images) -> bytes:
    bundle = ModelBundle.load(export)
    buf = io.BytesIO()
    compress(images, bundle, LocalEngine(bundle), buf)
    return buf.getvalue()


def test_the_fingerprint_changes_with_every_term():
    base = dict(
        family="nec",
        entropy_kind="factorized",
        tables_sha256="a" * 64,
        channels=4,
        tokens=5,
        extras={},
    )
    fp = code_fingerprint(**base)
    assert fp == code_fingerprint(**base) and len(fp) == 64
    for key, value in [
        ("family", "rvq"),
        ("entropy_kind", "categorical"),
        ("tables_sha256", "b" * 64),
        ("channels", 5),
        ("tokens", 6),
        ("extras", {"codebooks": "c" * 64}),
    ]:
        assert code_fingerprint(**{**base, key: value}) != fp, key


@pytest.fixture(scope="module")
def classifier_export(tmp_path_factory, tiny_model):
    """The tiny NEC weights with a classifier head: another model, the same code."""
    import torch

    from nec_export import export_model
    from nec_models import create_model
    from nec_models.checkpoint import load_checkpoint

    torch.manual_seed(1)
    model = create_model("vit_base_compressed_tiny", num_classes=3, with_decoder=True)
    state = model.state_dict()  # its own head and pooling; the NEC weights from tiny_model
    shared = {f"backbone.{k}": v for k, v in tiny_model.state_dict().items()}
    state.update({k: v for k, v in shared.items() if k in state})
    load_checkpoint(model, state)
    out = tmp_path_factory.mktemp("cls") / "classifier"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(model, out, trained={"class_names": ["a", "b", "c"]})
    return out


def test_a_classifier_export_decodes_the_plain_exports_container(
    tiny_export, classifier_export, data_dir
):
    from nec_serve.imagery import read_raster
    from tests.unit.core.test_pipeline import NAIP

    images = [("naip.tif", read_raster(data_dir / NAIP, [1, 2, 3])[:, :64, :64])]
    data = _compress(tiny_export, images)
    plain, cls = ModelBundle.load(tiny_export), ModelBundle.load(classifier_export)
    assert plain.code_sha256 == cls.code_sha256
    assert plain.tables.sha256 == cls.tables.sha256
    _, _, ref = decompress(io.BytesIO(data), plain, LocalEngine(plain), "embeddings")
    _, _, got = decompress(io.BytesIO(data), cls, LocalEngine(cls), "embeddings")
    np.testing.assert_array_equal(got, ref)
    _, records, scores = decompress(io.BytesIO(data), cls, LocalEngine(cls), "classes")
    assert scores.shape == (len(records), 3)


def test_an_rvq_export_with_other_codebooks_is_refused(tmp_path, rvq_export):
    """Same tables, other codebooks: the indices would decode to other vectors."""
    other = tmp_path / "other"
    shutil.copytree(rvq_export, other)
    manifest = json.loads((other / "manifest.json").read_text())
    assert set(manifest["entropy"]["code_extras"]) == {"codebooks"}
    manifest["entropy"]["code_extras"]["codebooks"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))
    bundle, changed = ModelBundle.load(rvq_export), ModelBundle.load(other)
    assert bundle.tables.sha256 == changed.tables.sha256
    assert bundle.code_sha256 != changed.code_sha256
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (bundle.in_chans, 20, 20), dtype=np.uint16)
    data = _compress(rvq_export, [("x.tif", image)])
    with pytest.raises(TableMismatch, match="code fingerprint"):
        decompress(io.BytesIO(data), changed, None, "symbols")
    _, records, symbols = decompress(io.BytesIO(data), bundle, None, "symbols")
    assert symbols.shape[0] == len(records) > 0
