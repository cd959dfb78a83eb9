"""The model contract: round trip, validation naming the field, schema versions, registries."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field

import pytest

from nec_serve import contract
from nec_serve.bundle import ModelBundle
from nec_serve.contract import (
    MANIFEST_FILENAME,
    SCHEMA_VERSION,
    DataType,
    EntropyModelSpec,
    FamilyParams,
    GraphRole,
    GraphSpec,
    InputSpec,
    Manifest,
    ModelFamily,
    TensorSpec,
    decode_outputs,
    entropy_model,
    register_entropy_model,
    register_family,
    register_graph_role,
)
from nec_serve.errors import InvalidInput, ManifestError, SchemaVersionError
from nec_serve.families.nec import NEC, NecParams
from nec_serve.families.rvq import RVQ

SHA = "ab" * 32
FP32, INT32 = DataType.TYPE_FP32, DataType.TYPE_INT32


def make_manifest(**changes) -> Manifest:
    """A valid NEC manifest of a tiny model (no export behind it)."""
    sym = TensorSpec("symbols", INT32, (8, 5))
    graphs = {
        GraphRole.ENCODER: GraphSpec(
            GraphRole.ENCODER,
            "nec_encoder",
            "onnx/nec_encoder.onnx",
            (TensorSpec("images", FP32, (3, 16, 16)),),
            (sym, TensorSpec("latent", FP32, (8, 5))),
            {"max_abs_err": 0.0},
        ),
        GraphRole.DECODER: GraphSpec(
            GraphRole.DECODER,
            "nec_decoder",
            "onnx/nec_decoder.onnx",
            (sym,),
            (TensorSpec("embeddings", FP32, (5, 8)),),
        ),
    }
    fields = dict(
        family="nec",
        model="tiny",
        model_version="1",
        input=InputSpec(16, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        graphs=graphs,
        entropy=EntropyModelSpec("factorized", "entropy_tables.bin", SHA),
        family_params=NecParams(channels=8, tokens=5, decoder_embed_dim=4),
        checkpoint_sha256=None,
        calibration={"source": "x.tif", "tiles": 3},
        created_by="nec-serve test",
        torch_version=None,
    )
    return Manifest(**{**fields, **changes})


def test_round_trip_through_json():
    man = make_manifest()
    data = json.loads(json.dumps(man.to_dict()))
    assert data["schema_version"] == SCHEMA_VERSION
    assert set(data["graphs"]) == {"encoder", "decoder"}
    again = Manifest.from_dict(data)
    assert again == man and again.to_dict() == data
    assert again.graph(GraphRole.ENCODER).inputs[0] == TensorSpec("images", FP32, (3, 16, 16))
    assert again.family_spec is NEC


def test_save_and_load(tmp_path):
    man = make_manifest()
    path = man.save(tmp_path)
    assert path == tmp_path / MANIFEST_FILENAME
    assert path.read_text().endswith("}\n")
    assert Manifest.load(tmp_path) == man


def test_save_validates_before_writing(tmp_path):
    bad = make_manifest(entropy=EntropyModelSpec("factorized", "entropy_tables.bin", "x"))
    with pytest.raises(ManifestError, match=r"entropy\.sha256 must be 64 lowercase hex digits"):
        bad.save(tmp_path)
    assert not (tmp_path / MANIFEST_FILENAME).exists()


def _set(path: str, value):
    def change(d: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            d = d[int(key)] if isinstance(d, list) else d[key]
        if value is _DELETE:
            del d[last]
        elif isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value

    return change


_DELETE = object()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_set("family", _DELETE), r"^manifest\.json: family is missing$"),
        (_set("family", "ssl"), r"family is not a registered model family \(nec, rvq\)"),
        (_set("model", 3), r": model must be a non-empty string, got int 3"),
        (_set("model_version", ""), r": model_version must be a non-empty string"),
        (_set("input.img_size", 0), r": input\.img_size must be >= 1, got 0"),
        (_set("input.img_size", "16"), r": input\.img_size must be an integer, got str '16'"),
        (_set("input.in_chans", True), r": input\.in_chans must be an integer, got bool"),
        (_set("input.mean", [0.5, 0.5]), r": input\.mean has 2 value\(s\) for 3 band\(s\)"),
        (_set("input.std", [0.2, 0, 0.2]), r": input\.std must all be > 0"),
        (_set("input.std", [0.2, "x", 0.2]), r": input\.std\[1\] must be a finite number"),
        (_set("input.extra", 1), r": input has unknown field\(s\) extra"),
        (_set("graphs", []), r": graphs must be a JSON object, got a list"),
        (_set("graphs.encoder", _DELETE), r": graphs\.encoder is missing"),
        (
            _set("graphs.bogus", {}),
            r": graphs\.bogus is not a registered graph role "
            r"\(classifier, decoder, decoder_block1, encoder, reconstruction\)",
        ),
        (_set("graphs.encoder.name", "nec encoder"), r": graphs\.encoder\.name must be letters"),
        (_set("graphs.encoder.file", "../x.onnx"), r": graphs\.encoder\.file must be a relative"),
        (_set("graphs.encoder.file", "/x.onnx"), r": graphs\.encoder\.file must be a relative"),
        (_set("graphs.decoder.inputs", []), r": graphs\.decoder\.inputs must not be empty"),
        (
            _set("graphs.decoder.inputs.0.data_type", "FLOAT"),
            r": graphs\.decoder\.inputs\[0\]\.data_type must be one of TYPE_FP32, .*'FLOAT'",
        ),
        (
            _set("graphs.decoder.outputs.0.dims", [5, 0]),
            r": graphs\.decoder\.outputs\[0\]\.dims must be a non-empty list of integers >= 1",
        ),
        (_set("graphs.decoder.outputs.0.name", _DELETE), r"outputs\[0\]\.name is missing"),
        (_set("graphs.decoder.extra", 1), r": graphs\.decoder has unknown field\(s\) extra"),
        (_set("graphs.decoder.parity", 1), r": graphs\.decoder\.parity must be a JSON object"),
        (_set("entropy.kind", "gaussian"), r": entropy\.kind is not a registered entropy model"),
        (_set("entropy.sha256", "AB" * 32), r": entropy\.sha256 must be 64 lowercase hex"),
        (_set("entropy.tables_file", "a\\b"), r": entropy\.tables_file must be a relative path"),
        (_set("family_params", _DELETE), r": family_params is missing"),
        (_set("family_params.channels", -1), r": family_params\.channels must be >= 1"),
        (_set("family_params.tokens", 6), r"outputs\[0\] is TYPE_INT32 \[8, 5\], but family_p"),
        (_set("input.img_size", 32), r"graphs\.encoder\.inputs\[0\]\.dims \[3, 16, 16\] disagree"),
        (_set("checkpoint_sha256", "x"), r": checkpoint_sha256 must be 64 lowercase hex digits"),
        (_set("calibration", 5), r": calibration must be a JSON object or null, got int 5"),
        (_set("torch_version", 2), r": torch_version must be a non-empty string"),
        (_set("table_sha256", SHA), r": the manifest has unknown field\(s\) table_sha256"),
    ],
)
def test_every_validation_error_names_its_field(change, match):
    data = make_manifest().to_dict()
    change(data)
    with pytest.raises(ManifestError, match=match):
        Manifest.from_dict(data)


def test_manifest_must_be_an_object():
    with pytest.raises(ManifestError, match=r"the manifest must be a JSON object, got a list"):
        Manifest.from_dict([1, 2])
    assert issubclass(ManifestError, InvalidInput)  # the CLI and the wrapper map it as input


#: What ``nec-serve export`` wrote before the contract (abridged): no schema_version.
OLD_MANIFEST = {
    "model": "mae_vit_compress_adapter_tiny",
    "model_version": "1",
    "img_size": 32,
    "in_chans": 3,
    "channels": 64,
    "tokens": 17,
    "table_sha256": SHA,
    "graphs": {"nec_encoder": {"file": "onnx/nec_encoder.onnx", "inputs": [], "outputs": []}},
}


def test_old_manifest_is_refused_naming_the_schema_version(tmp_path):
    (tmp_path / MANIFEST_FILENAME).write_text(json.dumps(OLD_MANIFEST))
    want = (
        rf"^{tmp_path / MANIFEST_FILENAME} has no schema_version \(written by an older "
        r"nec-serve\): re-export the model with `nec-serve export`$"
    )
    with pytest.raises(SchemaVersionError, match=want):
        Manifest.load(tmp_path)
    with pytest.raises(SchemaVersionError, match="no schema_version"):
        ModelBundle.load(tmp_path)


@pytest.mark.parametrize("version", [1, 3, "2", True])
def test_other_schema_versions_are_refused_naming_both(version):
    data = {**make_manifest().to_dict(), "schema_version": version}
    with pytest.raises(SchemaVersionError) as info:
        Manifest.from_dict(data)
    assert f"has schema_version {version!r}" in str(info.value)
    assert f"reads schema_version {SCHEMA_VERSION}" in str(info.value)


def test_load_names_missing_or_broken_files(tmp_path):
    with pytest.raises(ManifestError, match=r"is not a model export: no manifest\.json"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_FILENAME).write_text("{")
    with pytest.raises(ManifestError, match=r"manifest\.json is not valid JSON"):
        Manifest.load(tmp_path)


def test_unknown_entropy_kind_is_named():
    data = make_manifest().to_dict()
    data["entropy"]["kind"] = "rvq_categorical"
    with pytest.raises(
        ManifestError,
        match=r"entropy\.kind is not a registered entropy model kind \(categorical, factorized\), "
        r"got 'rvq_categorical'",
    ):
        Manifest.from_dict(data)
    with pytest.raises(ManifestError, match=r"unknown entropy model kind 'x', expected one of"):
        entropy_model("x")


def test_missing_graph_is_named():
    man = make_manifest()
    with pytest.raises(ManifestError, match=r"has no decoder_block1 graph \(it has: encoder, dec"):
        man.graph(GraphRole.FEATURES)


def test_builtin_roles_and_outputs():
    assert decode_outputs() == {
        "embeddings": GraphRole.DECODER,
        "features": GraphRole.FEATURES,
        "classes": GraphRole.CLASSIFIER,
        "bands": GraphRole.RECONSTRUCTION,
        "symbols": None,
    }
    assert (
        GraphRole.of("encoder") is GraphRole.ENCODER and str(GraphRole.FEATURES) == "decoder_block1"
    )
    assert NEC.graph_name(GraphRole.ENCODER) == "nec_encoder"
    assert RVQ.graph_name(GraphRole.RECONSTRUCTION) == "rvq_decoder"
    with pytest.raises(ManifestError, match="family 'rvq' has no decoder graph"):
        RVQ.graph_name(GraphRole.DECODER)
    assert DataType.TYPE_INT32.v2 == "INT32"
    with pytest.raises(ManifestError, match=r"unknown graph role 'head', expected one of"):
        GraphRole.of("head")


# ------------------------------------------------------------------------------ extension


@pytest.fixture
def registries(monkeypatch):
    """Registrations made by a test are undone after it."""
    contract.model_families()  # the built-in families are loaded before the copy
    for name in ("_ROLES", "_ENTROPY_MODELS", "_FAMILIES"):
        monkeypatch.setattr(contract, name, dict(getattr(contract, name)))


@dataclass(frozen=True)
class ToyTables:
    """A stand-in for per-codebook categorical tables."""

    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class ToyCodec:
    tables: ToyTables


@dataclass(frozen=True)
class ToyParams(FamilyParams):
    """A second family's own section."""

    codebooks: int = field(metadata={"check": lambda n: None if 1 <= n <= 8 else "must be 1-8"})
    codebook_size: int

    def check(self, manifest: Manifest, source: str) -> None:
        if manifest.input.in_chans != 10:
            raise ManifestError(f"{source}: input.in_chans must be 10 for toy")


def test_a_new_family_role_and_entropy_model_register_without_core_changes(registries, tmp_path):
    head = register_graph_role("toy_head", output="scores")
    kind = register_entropy_model(
        "toy_categorical", lambda path: ToyTables(path.read_bytes()), ToyCodec
    )
    toy = register_family(
        ModelFamily(
            name="toy",
            graph_names={GraphRole.ENCODER: "toy_encoder", head: "toy_head"},
            entropy_kinds=(kind.kind,),
            params=ToyParams,
        )
    )
    assert decode_outputs()["scores"] is head and GraphRole.of("toy_head") is head
    # A family decodes by default to its first decoding graph's output unless it says.
    assert toy.default_output == "scores"
    assert (NEC.default_output, RVQ.default_output) == (
        "embeddings",
        "bands",
    )
    with pytest.raises(ValueError, match="default output 'bands' is none of"):
        register_family(
            ModelFamily(
                name="toy2",
                graph_names={GraphRole.ENCODER: "toy2_encoder"},
                entropy_kinds=(kind.kind,),
                params=ToyParams,
                default_output="bands",
            )
        )
    tables = ToyTables(b"\x01\x02")
    (tmp_path / "toy.bin").write_bytes(tables.data)
    man = Manifest(
        family=toy.name,
        model="toy_rvq",
        model_version="1",
        input=InputSpec(64, 10, (0.0,) * 10, (1.0,) * 10),
        graphs={
            GraphRole.ENCODER: GraphSpec(
                GraphRole.ENCODER,
                toy.graph_name(GraphRole.ENCODER),
                "onnx/e.onnx",
                (TensorSpec("images", FP32, (10, 64, 64)),),
                (TensorSpec("codes", INT32, (8, 32, 32)),),
            ),
            head: GraphSpec(
                head,
                toy.graph_name(head),
                "onnx/h.onnx",
                (TensorSpec("codes", INT32, (8, 32, 32)),),
                (TensorSpec("scores", FP32, (21,)),),
            ),
        },
        entropy=EntropyModelSpec(kind.kind, "toy.bin", tables.sha256),
        family_params=ToyParams(codebooks=4, codebook_size=10_000),
        checkpoint_sha256=None,
        calibration=None,
        created_by="test",
        torch_version=None,
    )
    man.save(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded == man and loaded.family_params == ToyParams(4, 10_000)
    bundle = ModelBundle.load(tmp_path)  # the registered loader, the hash checked
    assert bundle.codec == ToyCodec(tables) and bundle.tables == tables

    data = man.to_dict()
    data["family_params"]["codebooks"] = 9
    with pytest.raises(ManifestError, match=r"family_params\.codebooks must be 1-8, got 9"):
        Manifest.from_dict(data)
    data = man.to_dict()
    data["entropy"]["kind"] = "factorized"  # registered, but not one of this family's
    with pytest.raises(ManifestError, match=r"entropy\.kind 'factorized' is not an entropy mod"):
        Manifest.from_dict(data)
    data = man.to_dict()
    data["graphs"]["decoder"] = copy.deepcopy(data["graphs"]["toy_head"])
    with pytest.raises(ManifestError, match=r"graphs\.decoder is not a graph role of family 'toy'"):
        Manifest.from_dict(data)
    (tmp_path / "toy.bin").write_bytes(b"\x00")
    with pytest.raises(InvalidInput, match="differs from the manifest's"):
        ModelBundle.load(tmp_path)


def test_registrations_refuse_clashes(registries):
    with pytest.raises(ValueError, match="already registered"):
        register_graph_role("decoder", output="other")
    with pytest.raises(ValueError, match="already produced"):
        register_graph_role("decoder2", output="embeddings")
    with pytest.raises(ValueError, match="already registered"):
        register_entropy_model("factorized", lambda p: None, lambda t: None)
    with pytest.raises(ValueError, match="already registered"):
        register_family(NEC)
    stray = GraphRole("stray")  # never registered
    with pytest.raises(ValueError, match="graph role stray is not registered"):
        register_family(ModelFamily("x", {stray: "x_enc"}, ("factorized",), NecParams))
    with pytest.raises(ValueError, match="not unique"):
        register_family(
            ModelFamily("x", {GraphRole.ENCODER: "nec_encoder"}, ("factorized",), NecParams)
        )
    assert register_graph_role("decoder", output="embeddings") is GraphRole.DECODER


def test_class_names_must_match_the_classifier_graph():
    data = make_manifest().to_dict()
    assert data["family_params"]["class_names"] == []
    del data["family_params"]["class_names"]  # older manifests of schema 2 have none
    assert Manifest.from_dict(data).family_params.class_names == ()
    data["family_params"]["class_names"] = ["forest", "river"]
    with pytest.raises(ManifestError, match=r"holds 2 names but the classifier graph scores no"):
        Manifest.from_dict(data)
