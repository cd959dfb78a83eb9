"""nec_serve.deploy's upload against a real local S3 server (moto's ``python -m moto.server`` on
a free port), as KServe's storage initializer reads it back, and the CLI around it.

Everything that imports ``kserve`` runs in a subprocess (kserve issue #3099, as
tests/unit/deploy/test_deploy.py says).
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from support import run_py
from support.deploy import BUCKET, GRAPHS, fake_repo

from nec_dev.triton import free_port
from nec_serve import deploy
from nec_serve.deploy.repository import _list_keys
from nec_serve.s3 import make_client

SECRET = "s3cr3t-never-printed-7f3a9"  # the fake secret key; must never show up in output


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


def test_s3_failures_name_bucket_and_endpoint(s3, s3_endpoint, tmp_path):
    repo = fake_repo(tmp_path)
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
