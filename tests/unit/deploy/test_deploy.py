"""nec_serve.deploy: repository checks, typed KServe objects, the overlays from the sizing table.

The upload against a real S3 server is tests/integration/s3/test_deploy_upload.py; applying and
waiting on a real API server, tests/integration/kube/test_kube_api.py. Everything that imports
``kserve`` (or the kubernetes client) runs in a subprocess: this test process has imported
``tritonclient.grpc`` (tests/unit/export/test_export.py does at collection), and the two
cannot share a process (duplicate protobuf symbols, kserve issue #3099).
"""

from __future__ import annotations

import argparse
import json

import pytest
from support import ROOT, run_py
from support.deploy import BUCKET, GRAPHS, fake_repo
from support.k8s import copy_k8s, kustomize_build

from nec_serve import deploy
from nec_serve.errors import InvalidInput

# ------------------------------------------------------------------------------ upload


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda r: (r / "nec_decoder" / "config.pbtxt").unlink(), "has no config.pbtxt"),
        (
            lambda r: (r / "nec_decoder" / "config.pbtxt").write_text('name: "other"\n'),
            "names the model 'other' but sits in nec_decoder/",
        ),
        (lambda r: (r / "nec_encoder" / "1" / "empty.bin").write_bytes(b""), "empty file(s)"),
        (
            lambda r: (r / "nec_encoder" / "1" / "model.onnx").unlink(),
            "nec_encoder has no numeric version directory with files",
        ),
        (
            lambda r: __import__("shutil").rmtree(r / "nec_decoder_block1"),
            "lacks the model(s) nec_decoder_block1",
        ),
    ],
    ids=["no-config", "wrong-name", "empty-file", "no-version", "missing-model"],
)
def test_bad_repositories_are_refused_before_any_upload(tmp_path, damage, message):
    repo = fake_repo(tmp_path)
    damage(repo)
    client = object()  # never used: the check comes first
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        deploy.upload_repository(repo, BUCKET, "p", "cpu", client=client, required_models=GRAPHS)


def test_bad_arguments_name_what_is_wrong(tmp_path):
    with pytest.raises(InvalidInput, match="no Triton repository at .*nec-serve export"):
        deploy.repository_dir(tmp_path, "gpu")
    with pytest.raises(InvalidInput, match="unknown variant 'tpu'"):
        deploy.repository_dir(tmp_path, "tpu")
    with pytest.raises(InvalidInput, match="invalid bucket name 'B'"):
        deploy.storage_uri("B", "p", "gpu")
    with pytest.raises(InvalidInput, match=r"'\.\.' path components"):
        deploy.storage_uri(BUCKET, "a/../b", "gpu")
    with pytest.raises(InvalidInput, match="not an s3:// URI"):
        deploy.storage_uri(BUCKET, "s3://nec-models/p", "gpu")
    assert deploy.storage_uri(BUCKET, "", "cpu") == f"s3://{BUCKET}/model_repository_cpu"


def test_add_parser_registers_deploy():
    parser = argparse.ArgumentParser()
    deploy.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["deploy", "--model-dir", "exp", "--variant", "cpu", "--bucket", BUCKET, "--prefix", "p"]
    )
    assert args.func is deploy.cmd_deploy
    assert (args.namespace, args.timeout, args.upload_only) == ("nec", 600.0, False)
    assert args.endpoint_url is None and args.keep_stale is False
    with pytest.raises(SystemExit):
        parser.parse_args(["deploy", "--model-dir", "x", "--variant", "tpu", "--bucket", BUCKET])


def test_importing_deploy_imports_neither_kserve_nor_tritonclient():
    out = run_py(
        """
        import sys
        import nec_serve.deploy
        loaded = [m for m in ("kserve", "kubernetes", "tritonclient", "boto3") if m in sys.modules]
        print(",".join(loaded))
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


# ------------------------------------------------------------------------------ KServe objects


@pytest.fixture(scope="module")
def overlay_isvcs(schemas, tmp_path_factory) -> dict[str, dict[str, dict]]:
    tree = copy_k8s(tmp_path_factory.mktemp("k8s"))
    out = {}
    for variant in deploy.VARIANTS:
        objs = kustomize_build(schemas, tree / "overlays" / variant)
        out[variant] = {o["metadata"]["name"]: o for o in objs if o["kind"] == "InferenceService"}
    return out


@pytest.fixture(scope="module")
def typed_isvcs(overlay_isvcs) -> dict[str, list[dict]]:
    """The SDK objects, serialised by the kubernetes ApiClient, built in a kserve process."""
    uris = {
        v: {name: o["spec"]["predictor"]["model"]["storageUri"] for name, o in i.items()}
        for v, i in overlay_isvcs.items()
    }
    out = run_py(
        f"""
        import json
        import kserve
        from nec_serve import deploy
        result = {{}}
        for variant, by_name in {uris!r}.items():
            result[variant] = []
            for name, uri in by_name.items():
                objs = deploy.build_inference_services(variant, uri)
                assert all(isinstance(o, kserve.V1beta1InferenceService) for o in objs)
                assert all(isinstance(o.spec.predictor, kserve.V1beta1PredictorSpec) for o in objs)
                models = [o.spec.predictor.model for o in objs]
                assert all(isinstance(m, kserve.V1beta1ModelSpec) for m in models)
                result[variant] += [deploy.to_manifest(o) for o in objs if o.metadata.name == name]
        print(json.dumps(result))
        """
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("variant", deploy.VARIANTS)
def test_typed_objects_are_every_familys_services(typed_isvcs, variant):
    """The real API server validates them (tests/integration/kube/test_kube_api.py)."""
    objs = typed_isvcs[variant]
    assert {o["metadata"]["name"] for o in objs} == {s.name for s in deploy.services_for(None)}
    for obj in objs:
        assert obj["apiVersion"] == "serving.kserve.io/v1beta1"  # camelCase wire form


@pytest.mark.parametrize("variant", deploy.VARIANTS)
def test_typed_objects_are_the_k8s_manifests(typed_isvcs, overlay_isvcs, variant):
    typed = {o["metadata"]["name"]: o for o in typed_isvcs[variant]}
    assert typed == overlay_isvcs[variant]


def test_services_follow_the_export_family_and_graphs(rvq_export, tiny_export):
    from nec_serve.contract import Manifest

    rvq = deploy.services_for(Manifest.load(rvq_export))
    assert [(s.name, s.models) for s in rvq] == [
        ("rvq-encoder", ("rvq_encoder",)),
        ("rvq-decoder", ("rvq_decoder",)),
    ]
    nec = deploy.services_for(Manifest.load(tiny_export))
    assert [s.name for s in nec] == ["nec-encoder", "nec-decoder"]
    assert set(nec[1].models) == {"nec_decoder", "nec_decoder_block1"}
    from nec_serve.contract import model_families

    assert deploy.services_for(None) == tuple(
        s for f in model_families() for s in deploy.family_services(f)
    )
    out = run_py(
        f"""
        import json
        from nec_serve import deploy
        from nec_serve.contract import Manifest
        objs = deploy.build_inference_services(
            "gpu", "s3://b/p/model_repository_gpu", manifest=Manifest.load({str(rvq_export)!r})
        )
        print(json.dumps([deploy.to_manifest(o) for o in objs]))
        """
    )
    assert out.returncode == 0, out.stderr
    objs = json.loads(out.stdout)
    assert [o["metadata"]["name"] for o in objs] == ["rvq-encoder", "rvq-decoder"]
    assert "--load-model=rvq_decoder" in objs[1]["spec"]["predictor"]["model"]["args"]


def test_k8s_overlays_are_generated_from_the_sizing_table():
    """k8s/overlays/{gpu,cpu} are what scripts/render_k8s.py writes: the two cannot drift."""
    out = run_py(
        """
        import json
        from nec_serve.deploy import VARIANTS
        from nec_serve.deploy.render import render_overlay
        print(json.dumps({v: render_overlay(v) for v in VARIANTS}))
        """
    )
    assert out.returncode == 0, out.stderr
    for variant, files in json.loads(out.stdout).items():
        for name, text in files.items():
            path = ROOT / "k8s" / "overlays" / variant / name
            assert path.read_text() == text, f"{path} is stale: run scripts/render_k8s.py"


def test_every_registered_family_is_in_the_overlays():
    from nec_serve.contract import GraphRole, model_families

    services = deploy.services_for(None)
    for family in model_families():
        mine = [s for s in services if s.name.startswith(f"{family.name}-")]
        assert mine[0].models == (family.graph_name(GraphRole.ENCODER),)
        assert {m for s in mine for m in s.models} <= set(family.graph_names.values())
    rvq = [s for s in services if s.name == "rvq-decoder"]
    assert rvq and rvq[0].models == ("rvq_decoder",)
