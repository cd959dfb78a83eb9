"""nec_serve.deploy: S3 upload against a real local S3 server, typed KServe objects, apply/wait.

The S3 server is moto's (``python -m moto.server``) on a free port. Everything that imports
``kserve`` (or the kubernetes client) runs in a subprocess: this test process has imported
``tritonclient.grpc`` (tests/test_export.py does at collection), and the two cannot share a
process (duplicate protobuf symbols, kserve issue #3099).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from support import ROOT, run_py
from support.k8s import copy_k8s, kustomize_build

from nec_dev.triton import free_port
from nec_serve import deploy
from nec_serve.deploy.repository import _list_keys
from nec_serve.errors import InvalidInput
from nec_serve.s3 import make_client

GRAPHS = ("nec_decoder", "nec_decoder_block1", "nec_encoder")
SECRET = "s3cr3t-never-printed-7f3a9"  # the fake secret key; must never show up in output
BUCKET = "nec-models"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """A real S3 server (moto's) on a free local port, stopped at the end."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    for _ in range(3):
        port = free_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        if proc.poll() is None:
            break
    else:
        pytest.fail(f"moto server did not start: {log.read_text()[-2000:]}")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Fake credentials for boto3, and no real AWS configuration anywhere near."""
    env = {
        "AWS_ACCESS_KEY_ID": "AKIDNECTESTING",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env


@pytest.fixture
def s3(s3_endpoint, aws_env):
    client = make_client(endpoint_url=s3_endpoint, region="us-east-1")
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if BUCKET not in existing:
        client.create_bucket(Bucket=BUCKET)
    yield client
    for key in _list_keys(client, BUCKET, ""):
        client.delete_object(Bucket=BUCKET, Key=key)


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def storage_initializer_download(client, uri: str, dest: Path) -> None:
    """What KServe's storage initializer does with an s3:// storageUri (kserve_storage,
    Storage._download_s3, v0.20.0): list by the URI's key prefix (no trailing slash), skip
    directory markers and zero-byte objects, strip the prefix, write under /mnt/models."""
    bucket, _, path = uri.removeprefix("s3://").partition("/")
    for key, size in _list_keys(client, bucket, path).items():
        if key.endswith("/") or size == 0:
            continue
        target = key[len(path) :].lstrip("/") if key != path else key.rsplit("/", 1)[-1]
        out = dest / target
        out.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, key, str(out))


# ------------------------------------------------------------------------------ upload


@pytest.mark.parametrize("variant", deploy.VARIANTS)
def test_upload_layout_is_the_export_byte_for_byte(s3, s3_endpoint, tiny_export, tmp_path, variant):
    repo = deploy.repository_dir(tiny_export, variant)
    uri = deploy.upload_repository(repo, BUCKET, "nec/run-1", variant, endpoint_url=s3_endpoint)
    assert uri == f"s3://{BUCKET}/nec/run-1/model_repository_{variant}"

    local = files_of(repo)
    assert {k.split("/")[0] for k in local} == set(GRAPHS)
    for graph in GRAPHS:
        assert f"{graph}/config.pbtxt" in local and f"{graph}/1/model.onnx" in local
    keys = _list_keys(s3, BUCKET, "")
    prefix = f"nec/run-1/model_repository_{variant}/"
    assert set(keys) == {prefix + rel for rel in local}
    for rel, data in local.items():
        body = s3.get_object(Bucket=BUCKET, Key=prefix + rel)["Body"].read()
        assert body == data, rel

    # What the Triton container finds in /mnt/models is the export's repository, exactly.
    mnt = tmp_path / "mnt" / "models"
    storage_initializer_download(s3, uri, mnt)
    assert files_of(mnt) == local
    cmp = filecmp.dircmp(repo, mnt)
    assert not cmp.left_only and not cmp.right_only and not cmp.diff_files


def test_upload_mirrors_the_directory_without_touching_siblings(s3, s3_endpoint, tiny_export):
    repo = deploy.repository_dir(tiny_export, "cpu")
    base = "nec/run-2/model_repository_cpu"
    stale = f"{base}/old_model/1/model.onnx"
    sibling = "nec/run-2/model_repository_cpu_old/nec_encoder/config.pbtxt"
    other = "nec/run-2/model_repository_gpu/nec_encoder/config.pbtxt"
    for key in (stale, sibling, other):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    deploy.upload_repository(repo, BUCKET, "/nec/run-2/", "cpu", endpoint_url=s3_endpoint)
    keys = set(_list_keys(s3, BUCKET, ""))
    assert stale not in keys
    assert {sibling, other} <= keys
    assert {k for k in keys if k.startswith(base + "/")} == {
        f"{base}/{rel}" for rel in files_of(repo)
    }
    # --keep-stale keeps what is there.
    s3.put_object(Bucket=BUCKET, Key=stale, Body=b"x")
    deploy.upload_repository(
        repo, BUCKET, "nec/run-2", "cpu", endpoint_url=s3_endpoint, delete_stale=False
    )
    assert stale in _list_keys(s3, BUCKET, base + "/")


def _fake_repo(root: Path, models=GRAPHS) -> Path:
    repo = root / "model_repository_cpu"
    for m in models:
        (repo / m / "1").mkdir(parents=True)
        (repo / m / "config.pbtxt").write_text(f'name: "{m}"\nbackend: "onnxruntime"\n')
        (repo / m / "1" / "model.onnx").write_bytes(b"onnx")
    return repo


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
    repo = _fake_repo(tmp_path)
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


def test_s3_failures_name_bucket_and_endpoint(s3, s3_endpoint, tmp_path):
    repo = _fake_repo(tmp_path)
    with pytest.raises(deploy.DeployError, match="bucket 'nec-no-such-bucket' .* does not exist"):
        deploy.upload_repository(repo, "nec-no-such-bucket", "p", "cpu", endpoint_url=s3_endpoint)
    dead = f"http://nec-user:hunter2pass@127.0.0.1:{free_port()}"
    client = make_client(endpoint_url=dead, region="us-east-1", connect_timeout_s=1, attempts=1)
    start = time.monotonic()
    with pytest.raises(deploy.DeployError) as err:
        deploy.upload_repository(repo, BUCKET, "p", "cpu", client=client, endpoint_url=dead)
    assert time.monotonic() - start < 20
    text = str(err.value)
    assert "127.0.0.1" in text and "EndpointConnectionError" in text
    assert "hunter2pass" not in text and "nec-user" not in text  # userinfo is redacted


def test_cli_upload_only_prints_the_storage_uri_and_never_credentials(
    s3, s3_endpoint, aws_env, tiny_export
):
    env = dict(os.environ, **aws_env)
    cmd = """
        import sys
        from nec_serve.deploy import main
        sys.exit(main({argv!r}))
    """
    argv = ["-v", "deploy", "--model-dir", str(tiny_export), "--variant", "gpu"]
    argv += ["--bucket", BUCKET, "--prefix", "cli", "--endpoint-url", s3_endpoint, "--upload-only"]
    ok = run_py(cmd.replace("{argv!r}", repr(argv)), env=env)
    assert ok.returncode == 0, ok.stderr
    assert f"-> s3://{BUCKET}/cli/model_repository_gpu" in ok.stdout
    assert "uploading" in ok.stderr  # -v logs every file ...
    bad = argv[:]
    bad[bad.index(BUCKET)] = "nec-missing"
    failed = run_py(cmd.replace("{argv!r}", repr(bad)), env=env)
    assert failed.returncode == 2
    assert "nec-serve deploy: error: upload to bucket 'nec-missing'" in failed.stderr
    for out in (ok, failed):  # ... but never a credential
        assert SECRET not in out.stdout + out.stderr


def test_cli_without_kubeconfig_fails_before_uploading(
    s3, s3_endpoint, aws_env, tmp_path, tiny_export
):
    env = dict(os.environ, **aws_env, HOME=str(tmp_path), KUBECONFIG=str(tmp_path / "none"))
    argv = ["deploy", "--model-dir", str(tiny_export), "--variant", "cpu", "--bucket", BUCKET]
    argv += ["--prefix", "nokube", "--endpoint-url", s3_endpoint, "--timeout", "5"]
    out = run_py(f"import sys; from nec_serve.deploy import main; sys.exit(main({argv!r}))", env)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "nec-serve deploy: error: no usable Kubernetes configuration" in out.stderr
    assert _list_keys(s3, BUCKET, "nokube/") == {}


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
def test_typed_objects_validate_against_the_kserve_crd(typed_isvcs, validator, variant):
    objs = typed_isvcs[variant]
    assert {o["metadata"]["name"] for o in objs} == {s.name for s in deploy.services_for(None)}
    for obj in objs:
        assert obj["apiVersion"] == "serving.kserve.io/v1beta1"  # camelCase wire form
        assert validator.errors(obj) == []


@pytest.mark.parametrize("variant", deploy.VARIANTS)
def test_typed_objects_are_the_k8s_manifests(typed_isvcs, overlay_isvcs, variant):
    typed = {o["metadata"]["name"]: o for o in typed_isvcs[variant]}
    assert typed == overlay_isvcs[variant]


def test_typed_object_with_an_unknown_field_fails_validation(typed_isvcs, validator):
    obj = json.loads(json.dumps(typed_isvcs["gpu"][0]))
    obj["spec"]["predictor"]["ephemeralContainers"] = []  # in the SDK model, not in the CRD
    assert any("unknown field(s) 'ephemeralContainers'" in p for p in validator.errors(obj))


def test_services_follow_the_export_family_and_graphs(rvq_export, tiny_export, validator):
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
    for obj in objs:
        assert validator.errors(obj) == []


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
