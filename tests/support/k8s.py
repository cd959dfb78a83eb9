"""k8s/ as the tests render it, and what the tests send to the real Kubernetes API server.

The pinned kustomize and the CRDs come from ``scripts/fetch_schemas.sh`` (Go module proxy,
pinned, cached in ``.cache/``). Objects are validated by the real API server
(``tests/integration/kube``): applied server-side, or dry-run with ``--validate=strict``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml

from support import ROOT

K8S = ROOT / "k8s"
VARIANTS = ("gpu", "cpu")
DEFAULT_CACHE = ROOT / ".cache"
FETCH_SCRIPT = ROOT / "scripts" / "fetch_schemas.sh"
#: The fetch manifest's CRD sources: what the overlays and the controller's objects use.
CRD_SOURCES = ("kserve", "knative_kafka", "knative_serving", "keda", "prometheus_operator")
NS = "nec"
ACCESS_KEY, SECRET_KEY = "AKIAEXAMPLEEXAMPLE00", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def fetch(cache: Path = DEFAULT_CACHE, timeout: float = 900.0) -> dict:
    """Run ``scripts/fetch_schemas.sh`` (a no-op when the cache is complete); return its manifest.

    The manifest's relative paths are resolved against ``cache``.
    """
    env = None if cache == DEFAULT_CACHE else dict(os.environ, NEC_CACHE_DIR=str(cache))
    proc = subprocess.run(
        ["bash", str(FETCH_SCRIPT)], capture_output=True, text=True, timeout=timeout, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{FETCH_SCRIPT.relative_to(ROOT)} failed (exit {proc.returncode}):\n"
            f"{proc.stderr.strip()[-3000:]}"
        )
    manifest = json.loads((cache / "schemas" / "manifest.json").read_text())
    manifest["cache"] = str(cache)
    return manifest


def cache_path(manifest: dict, relative: str) -> Path:
    """Absolute path of a file named in the fetch manifest."""
    return Path(manifest["cache"]) / relative


def crd_files(manifest: dict) -> list[Path]:
    """The pinned CRD files of every source the overlays use."""
    files = []
    for source in CRD_SOURCES:
        entry = manifest[source]
        files += [cache_path(manifest, entry["dir"]) / name for name in entry["crds"]]
    return files


def load_yaml_documents(text: str) -> list:
    """The non-empty documents of a YAML stream (libyaml's loader where available)."""
    return [d for d in yaml.load_all(text, Loader=_LOADER) if d is not None]


def kustomize_build(manifest: dict, directory: Path, timeout: float = 120.0) -> list[dict]:
    """Render a kustomization with the pinned kustomize; returns its objects."""
    exe = cache_path(manifest, manifest["kustomize"]["path"])
    proc = subprocess.run(
        [str(exe), "build", str(directory)], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kustomize build {directory} failed: {proc.stderr.strip()}")
    return load_yaml_documents(proc.stdout)


def copy_k8s(dst: Path, with_env: bool = True) -> Path:
    """A copy of k8s/ whose credentials env file is the committed example (never a real one)."""
    tree = dst / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("s3-credentials.env"))
    if with_env:
        base = tree / "base"
        shutil.copy(base / "s3-credentials.env.example", base / "s3-credentials.env")
    return tree


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def workflow_message(
    topic: str = "wf-42.in", service: str = "nec-compress", namespace: str = NS
) -> dict:
    """A ``system.ML`` message as the platform publishes it (DESIGN section 5)."""
    return {
        "workflow_status": "published",
        "workflow_name": "EO workflow 42",
        "Topics": {"in": topic, "out": "wf-42.out"},
        "ML": {"ServiceName": service, "Namespace": namespace, "component_name": "compress"},
        "S3_bucket": {
            "aws_access_key_id": ACCESS_KEY,
            "aws_secret_access_key": SECRET_KEY,
            "s3-bucket-name": "eo-bucket",
            "region_name": "eu-central-1",
            "endpoint_url": "https://s3.example.org",
        },
    }


def kubectl_configmap(name: str, files: list[Path], namespace: str) -> dict:
    """What ``kubectl create configmap NAME --from-file=F ... -o yaml`` makes: UTF-8 files in
    ``data``, the others base64 in ``binaryData``, keyed by file name."""
    data, binary = {}, {}
    for path in files:
        raw = path.read_bytes()
        try:
            data[path.name] = raw.decode("utf-8")
        except UnicodeDecodeError:
            binary[path.name] = base64.b64encode(raw).decode()
    obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}
    obj["metadata"]["namespace"] = namespace
    if data:
        obj["data"] = data
    if binary:
        obj["binaryData"] = binary
    return obj


def dry_run(kube, obj: dict, mode: list[str]) -> subprocess.CompletedProcess:
    """``kubectl apply --dry-run=server --validate=strict`` of one object (``mode`` adds
    ``--server-side`` and its field manager, or nothing for a client-side apply)."""
    args = ["apply", *mode, "--dry-run=server", "--validate=strict", "-f", "-"]
    return kube.kubectl(*args, input=json.dumps(obj), check=False)
