"""k8s/: both overlays render with the pinned kustomize, and what they hold.

kustomize and KServe's runtime come from scripts/fetch_schemas.sh (Go module proxy, pinned,
cached in .cache/). The real API server validates every rendered object strictly
(tests/integration/kube/test_kube_api.py applies each overlay server-side and refuses a
misspelt field or a wrong type, by name). The workflow side (controller, wrappers, RBAC, the
objects the controller creates) is tests/unit/deploy/test_k8s_workflow.py.
"""

from __future__ import annotations

import base64
import re
import subprocess
import time

import pytest
import yaml
from support import ROOT
from support.k8s import K8S, VARIANTS, by_kind, cache_path, copy_k8s, fetch, kustomize_build

GRAPHS = {"nec_encoder", "nec_decoder", "nec_decoder_block1"}
PLACEHOLDER = "REPLACE_WITH_"


@pytest.fixture(scope="session")
def triton_runtime(schemas) -> dict:
    path = cache_path(schemas, schemas["kserve"]["dir"]) / schemas["kserve"]["triton_runtime"]
    return yaml.safe_load(path.read_text())


RENDERED_NAMES = [
    ("ConfigMap", "nec-kafka"),
    ("Deployment", "nec-controller"),
    ("InferenceService", "nec-decoder"),
    ("InferenceService", "nec-encoder"),
    ("InferenceService", "rvq-decoder"),
    ("InferenceService", "rvq-encoder"),
    ("Namespace", "nec"),
    ("Role", "nec-controller"),
    ("Role", "nec-wrapper"),
    ("RoleBinding", "nec-controller"),
    ("RoleBinding", "nec-wrapper"),
    ("Secret", "nec-s3"),
    ("Service", "nec-compress"),
    ("Service", "nec-decompress"),
    ("ServiceAccount", "nec-controller"),
    ("ServiceAccount", "nec-models"),
    ("ServiceAccount", "nec-wrapper"),
]


# ------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("variant", VARIANTS)
def test_overlay_renders_every_familys_objects(rendered, variant):
    objs = rendered[variant]
    names = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    assert names == RENDERED_NAMES
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "nec", o["metadata"]
        assert o["metadata"]["labels"]["nec-serve/variant"] == variant


def test_base_renders_what_the_overlays_share(rendered, schemas, k8s_tree):
    objs = kustomize_build(schemas, k8s_tree / "base")
    # The InferenceServices are the overlays' (generated per variant).
    names = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    assert names == [n for n in RENDERED_NAMES if n[0] != "InferenceService"]


def test_render_without_credentials_file_fails_clearly(schemas, tmp_path):
    tree = copy_k8s(tmp_path, with_env=False)
    with pytest.raises(RuntimeError, match="s3-credentials.env"):
        kustomize_build(schemas, tree / "overlays" / "gpu")


# ------------------------------------------------------------------------------ contents


@pytest.mark.parametrize("variant", VARIANTS)
def test_services_follow_the_kserve_triton_runtime(rendered, triton_runtime, variant):
    """Ports, args, format and protocol agree with KServe's own kserve-tritonserver runtime."""
    spec = triton_runtime["spec"]
    container = spec["containers"][0]
    runtime_flags = {a.split("=")[0] for a in container["args"] if a.startswith("--")}
    http_port = int(
        next(a for a in container["args"] if a.startswith("--http-port=")).split("=")[1]
    )
    formats = {f["name"] for f in spec["supportedModelFormats"]}
    loaded = {}
    for name, isvc in by_kind(rendered[variant], "InferenceService").items():
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == triton_runtime["metadata"]["name"]
        assert model["modelFormat"]["name"] in formats
        assert model["protocolVersion"] in spec["protocolVersions"]
        assert model["protocolVersion"] == "v2"
        args = model["args"]
        assert "--model-control-mode=explicit" in args
        # KServe appends these to the runtime's args; none may repeat a runtime flag.
        assert not ({a.split("=")[0] for a in args} & runtime_flags), args
        loaded[name] = {a.split("=", 1)[1] for a in args if a.startswith("--load-model=")}
        assert model["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": http_port}
        assert model["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": http_port}
        # The runtime's own container user (Triton's documented non-root user).
        assert model["securityContext"]["runAsUser"] == container["securityContext"]["runAsUser"]
    assert loaded == {
        "nec-encoder": {"nec_encoder"},
        "nec-decoder": GRAPHS - {"nec_encoder"},
        "rvq-encoder": {"rvq_encoder"},
        "rvq-decoder": {"rvq_decoder"},
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_storage_resources_and_scaling(rendered, variant):
    for isvc in by_kind(rendered[variant], "InferenceService").values():
        pred = isvc["spec"]["predictor"]
        model = pred["model"]
        uri = model["storageUri"]
        assert re.fullmatch(rf"s3://[a-z0-9.\-]+/(.+/)?model_repository_{variant}", uri), uri
        res = model["resources"]
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res[part]), res
        if variant == "gpu":
            assert res["limits"]["nvidia.com/gpu"] == "1"
            assert {"name": "trt-cache", "mountPath": "/tmp/trt_cache"} in model["volumeMounts"]
            assert any(t["key"] == "nvidia.com/gpu" for t in pred["tolerations"])
        else:
            assert not any("gpu" in k for part in res.values() for k in part)
            assert "volumeMounts" not in model and "tolerations" not in pred
        assert 1 <= pred["minReplicas"] <= pred["maxReplicas"]
        assert pred["scaleMetric"] == "concurrency" and pred["scaleTarget"] >= 1
        anns = isvc["metadata"]["annotations"]
        assert anns["serving.kserve.io/deploymentMode"] == "Serverless"


@pytest.mark.parametrize("variant", VARIANTS)
def test_non_root_security_contexts(rendered, variant):
    for isvc in by_kind(rendered[variant], "InferenceService").values():
        pod = isvc["spec"]["predictor"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        ctr = isvc["spec"]["predictor"]["model"]["securityContext"]
        assert ctr["runAsNonRoot"] is True and ctr["allowPrivilegeEscalation"] is False
        assert ctr["privileged"] is False and ctr["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_s3_credentials_reach_the_storage_initializer(rendered, variant):
    """KServe finds the Secret through the ServiceAccount the predictors run as."""
    objs = rendered[variant]
    (secret,) = by_kind(objs, "Secret").values()
    sa = by_kind(objs, "ServiceAccount")["nec-models"]
    assert {"name": secret["metadata"]["name"]} in sa["secrets"]
    assert sa["automountServiceAccountToken"] is False
    for isvc in by_kind(objs, "InferenceService").values():
        assert isvc["spec"]["predictor"]["serviceAccountName"] == sa["metadata"]["name"]
    anns = secret["metadata"]["annotations"]
    for key in ("s3-endpoint", "s3-usehttps", "s3-region", "s3-verifyssl"):
        assert f"serving.kserve.io/{key}" in anns
    assert "://" not in anns["serving.kserve.io/s3-endpoint"]  # host[:port], no scheme
    assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    # What the test renders is the committed example: placeholders, never credentials.
    for value in secret["data"].values():
        assert base64.b64decode(value).decode().startswith(PLACEHOLDER)


def test_no_credentials_in_the_repository():
    example = (K8S / "base" / "s3-credentials.env.example").read_text()
    values = dict(
        line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#")
    )
    assert set(values) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(v.startswith(PLACEHOLDER) for v in values.values())
    assert "s3-credentials.env" in (K8S / ".gitignore").read_text().split()
    tracked = subprocess.run(["git", "ls-files", "k8s"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    assert not any(p.endswith("/s3-credentials.env") for p in tracked.stdout.split())
    for path in K8S.rglob("*"):
        if path.is_file() and path.name != "s3-credentials.env":
            assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", path.read_text()), path


# ------------------------------------------------------------------------------ the fetch


def test_fetch_is_pinned_cached_and_fast(schemas):
    script = (ROOT / "scripts" / "fetch_schemas.sh").read_text()
    for tool in ("kustomize", "kserve", "knative_kafka", "knative_serving", "keda"):
        pinned = re.search(rf"^{tool.upper()}_VERSION=(\S+)$", script, re.M).group(1)
        assert schemas[tool]["version"] == pinned
    start = time.monotonic()
    again = fetch()
    assert time.monotonic() - start < 5.0  # the cached run does nothing
    assert again["pins"] == schemas["pins"]
    exe = cache_path(schemas, schemas["kustomize"]["path"])
    out = subprocess.run([str(exe), "version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == schemas["kustomize"]["version"]
