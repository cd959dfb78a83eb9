"""k8s/: the workflow side. Controller, wrappers, their RBAC, and what the controller creates.

The rendered overlays hold the controller Deployment, the two wrapper Knative Services and the
RBAC of both. The real API server validates all of them strictly, and what the controller, the
config store and the ``nec-model`` command make (tests/integration/kube/test_kube_api.py,
against the pinned CRDs of scripts/fetch_schemas.sh). Here:

* the KafkaSources that controller/sources.py builds from real workflow messages are named
  after their workflow and sink into the rendered wrapper of their step;
* RBAC is namespaced and grants exactly the listed resources and verbs; a ClusterRole, a
  ClusterRole binding or an extra verb fails (tests/integration/kube/test_kube_api.py runs the
  controller and wrapper code against the Roles on a real API server);
* the containers' args are what the real ``nec-serve`` parser accepts, and the wrapper and
  controller start from them (up to the network) with only the image's packages;
* credentials of the config store's ConfigMap and Secret are only in the Secret;
* the ConfigMap ``nec-model``, made from an export as ``kubectl create configmap`` makes it,
  fits, and is a model directory the wrapper loads.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import textwrap
import threading
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml
from support import ROOT
from support.docker import DOCKERFILE, UID, effective, run_with_runtime_packages, stages
from support.k8s import (
    ACCESS_KEY,
    NS,
    SECRET_KEY,
    VARIANTS,
    by_kind,
    copy_k8s,
    kubectl_configmap,
    kustomize_build,
    workflow_message,
)

from nec_serve.config_store import KubernetesConfigStore
from nec_serve.contract import Manifest
from nec_serve.errors import InvalidInput
from nec_serve.messages import config_name, parse_workflow

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
ALL_VERBS = ["get", "list", "watch", "create", "update", "patch", "delete"]
# What the brief of the controller and wrapper allows, as (apiGroup, resource, verb).
CONTROLLER_GRANTS = {
    (group, resource, verb)
    for group, resource in (
        ("sources.knative.dev", "kafkasources"),
        ("", "configmaps"),
        ("", "secrets"),
    )
    for verb in ALL_VERBS
}
WRAPPER_GRANTS = {("", r, v) for r in ("configmaps", "secrets") for v in ("get", "list")}
STEPS = {
    "nec-compress": ("compress", "nec-encoder"),
    "nec-decompress": ("decompress", "nec-decoder"),
}


# ------------------------------------------------------------------------------ fixtures


def one(objects: list[dict], kind: str, name: str) -> dict:
    return copy.deepcopy(by_kind(objects, kind)[name])


def kafka_data(objects: list[dict]) -> dict[str, str]:
    return one(objects, "ConfigMap", "nec-kafka")["data"]


def expand_args(container: dict, obj: dict, objects: list[dict]) -> list[str]:
    """The container's args as the kubelet runs them: ``$(VAR)`` from its env, whose values
    come from literal values, the rendered ConfigMaps and the object's own namespace."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        src = var["valueFrom"]
        if "configMapKeyRef" in src:
            ref = src["configMapKeyRef"]
            env[var["name"]] = one(objects, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif src.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = obj["metadata"]["namespace"]
        else:
            raise AssertionError(f"unexpected env source {src}")
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]


def parse_cli(args: list[str]):
    from nec_cli.main import build_parser

    return build_parser().parse_args(args)


def _deployment(rendered):
    return one(rendered["gpu"], "Deployment", "nec-controller")


def _source(config_topic="wf-42.in"):
    from nec_controller.sources import kafka_source

    config = parse_workflow(workflow_message(config_topic))
    return kafka_source(config, ["my-cluster-kafka-bootstrap.kafka.svc.cluster.local:9092"])


# ------------------------------------------------------------------------------ KafkaSource

TOPICS = ["wf-42.in", "EO4EU.Workflow_07.Input", "a" * 249, "x"]


@pytest.mark.parametrize("topic", TOPICS, ids=["plain", "mixed", "longest", "short"])
def test_controller_kafka_sources_are_named_after_their_workflow(topic):
    body = _source(topic)
    assert body["metadata"]["name"] == config_name(topic)
    assert body["spec"]["topics"] == [topic]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("service", sorted(STEPS))
def test_kafka_source_sink_is_a_rendered_wrapper(rendered, variant, service):
    """What the controller creates for a workflow of either step points at that wrapper."""
    from nec_controller.sources import kafka_source

    objs = rendered[variant]
    ksvc = one(objs, "Service", service)
    bootstrap = kafka_data(objs)["bootstrap.servers"].split(",")
    config = parse_workflow(workflow_message(service=service.upper(), namespace=NS))
    body = kafka_source(config, bootstrap)
    ref = body["spec"]["sink"]["ref"]
    assert (ref["apiVersion"], ref["kind"], ref["name"], ref["namespace"]) == (
        ksvc["apiVersion"],
        ksvc["kind"],
        ksvc["metadata"]["name"],
        ksvc["metadata"]["namespace"],
    )
    assert body["metadata"]["namespace"] == ksvc["metadata"]["namespace"]
    assert body["spec"]["sink"]["uri"] == f"/{config.source_name}"
    assert body["spec"]["bootstrapServers"] == bootstrap


# ------------------------------------------------------------------------------ RBAC


def grants(role: dict) -> set[tuple[str, str, str]]:
    """A Role's rules as (apiGroup, resource, verb) triples; wildcards stay '*'."""
    out = set()
    for rule in role.get("rules", []):
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule.get("verbs", []):
                    out.add((group, resource, verb))
    return out


def rbac_problems(objects: list[dict]) -> list[str]:
    """Everything in ``objects`` that breaks the RBAC policy of the workflow side."""
    problems = []
    expected = {"nec-controller": CONTROLLER_GRANTS, "nec-wrapper": WRAPPER_GRANTS}
    for obj in objects:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind in ("ClusterRole", "ClusterRoleBinding"):
            problems.append(f"{kind}/{name}: cluster-wide RBAC is not allowed")
        elif kind == "Role":
            for rule in obj.get("rules", []):
                if set(rule) - {"apiGroups", "resources", "verbs"}:
                    problems.append(f"Role/{name}: resourceNames/nonResourceURLs are not used")
            got = grants(obj)
            if name not in expected:
                problems.append(f"Role/{name}: unexpected Role")
            elif got != expected[name]:
                extra = sorted(got - expected[name])
                missing = sorted(expected[name] - got)
                problems.append(f"Role/{name}: grants {extra} beyond, lacks {missing}")
        elif kind == "RoleBinding":
            ref = obj["roleRef"]
            if ref["kind"] != "Role":
                problems.append(f"RoleBinding/{name}: binds a {ref['kind']}")
            for subject in obj.get("subjects", []):
                if (
                    subject.get("kind") != "ServiceAccount"
                    or subject.get("namespace") != obj["metadata"]["namespace"]
                ):
                    problems.append(f"RoleBinding/{name}: subject {subject} outside the namespace")
    return problems


@pytest.mark.parametrize("variant", VARIANTS)
def test_rbac_is_namespaced_and_exact(rendered, variant):
    objs = rendered[variant]
    assert rbac_problems(objs) == []
    roles = by_kind(objs, "Role")
    assert set(roles) == {"nec-controller", "nec-wrapper"}
    assert grants(roles["nec-controller"]) == CONTROLLER_GRANTS
    assert grants(roles["nec-wrapper"]) == WRAPPER_GRANTS
    for name, binding in by_kind(objs, "RoleBinding").items():
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": name,
        }
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": NS}]
    assert set(by_kind(objs, "ServiceAccount")) >= {"nec-controller", "nec-wrapper"}
    assert _deployment(rendered)["spec"]["template"]["spec"]["serviceAccountName"] == (
        "nec-controller"
    )
    for service in STEPS:
        spec = one(objs, "Service", service)["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == "nec-wrapper"


def _add_resource(tree: Path, text: str) -> None:
    (tree / "base" / "extra.yaml").write_text(textwrap.dedent(text))
    kust = tree / "base" / "kustomization.yaml"
    doc = yaml.safe_load(kust.read_text())
    doc["resources"].append("extra.yaml")
    kust.write_text(yaml.safe_dump(doc))


SNEAKS = {
    "clusterrole": (
        """
        apiVersion: rbac.authorization.k8s.io/v1
        kind: ClusterRole
        metadata:
          name: nec-controller-extra
        rules:
          - apiGroups: [""]
            resources: ["secrets"]
            verbs: ["get"]
        """,
        "ClusterRole/nec-controller-extra: cluster-wide RBAC is not allowed",
    ),
    "clusterrolebinding": (
        """
        apiVersion: rbac.authorization.k8s.io/v1
        kind: ClusterRoleBinding
        metadata:
          name: nec-controller-view
        roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
        subjects: [{kind: ServiceAccount, name: nec-controller, namespace: nec}]
        """,
        "ClusterRoleBinding/nec-controller-view: cluster-wide RBAC is not allowed",
    ),
    "rolebinding-to-clusterrole": (
        """
        apiVersion: rbac.authorization.k8s.io/v1
        kind: RoleBinding
        metadata:
          name: nec-wrapper-edit
        roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: edit}
        subjects: [{kind: ServiceAccount, name: nec-wrapper}]
        """,
        "RoleBinding/nec-wrapper-edit: binds a ClusterRole",
    ),
}


@pytest.mark.parametrize("sneak", sorted(SNEAKS))
def test_cluster_wide_rbac_sneaking_in_fails(schemas, tmp_path, sneak):
    """Valid Kubernetes objects, but against the policy: the check names them."""
    text, expected = SNEAKS[sneak]
    tree = copy_k8s(tmp_path)
    _add_resource(tree, text)
    objs = kustomize_build(schemas, tree / "overlays" / "cpu")  # it renders ...
    assert expected in rbac_problems(objs)  # ... and is still refused


@pytest.mark.parametrize(
    "role,rule,value",
    [
        ("nec-controller", 0, {"verbs": ALL_VERBS + ["deletecollection"]}),
        ("nec-controller", 1, {"verbs": ["*"]}),
        ("nec-controller", 1, {"resources": ["configmaps", "secrets", "pods"]}),
        ("nec-controller", 0, {"apiGroups": ["*"]}),
        ("nec-wrapper", 0, {"verbs": ["get", "list", "watch"]}),
        ("nec-wrapper", 0, {"resourceNames": ["nec-s3"]}),
    ],
)
def test_role_beyond_the_list_fails(rendered, role, rule, value):
    objs = copy.deepcopy(rendered["cpu"])
    target = next(o for o in objs if o["kind"] == "Role" and o["metadata"]["name"] == role)
    target["rules"][rule].update(value)
    problems = rbac_problems(objs)
    assert any(p.startswith(f"Role/{role}:") for p in problems), problems


def test_rbac_follows_an_overlay_namespace(schemas, tmp_path):
    tree = copy_k8s(tmp_path)
    mine = tree / "overlays" / "mine"
    mine.mkdir()
    (mine / "kustomization.yaml").write_text("resources: [../cpu]\nnamespace: eo-prod\n")
    objs = kustomize_build(schemas, mine)
    for binding in by_kind(objs, "RoleBinding").values():
        assert {s["namespace"] for s in binding["subjects"]} == {"eo-prod"}
    assert rbac_problems(objs) == []


# ------------------------------------------------------------------------------ config store


def test_config_store_objects_keep_credentials_in_the_secret():
    config = parse_workflow(workflow_message())
    configmap, secret = KubernetesConfigStore.objects(config, NS)
    for obj in (configmap, secret):
        assert obj["metadata"]["name"] == config.source_name == config_name("wf-42.in")
        assert obj["metadata"]["namespace"] == NS
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "nec-controller"
    dumped = json.dumps(configmap)
    assert ACCESS_KEY not in dumped and SECRET_KEY not in dumped
    stored = json.loads(configmap["data"]["workflow.json"])
    assert stored["S3_bucket"]["aws_secret_access_key"] == "***"
    assert stored["S3_bucket"]["s3-bucket-name"] == "eo-bucket"
    assert secret["type"] == "Opaque"
    assert secret["stringData"] == {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    }
    assert "data" not in secret  # nothing else in the Secret, and nothing but the keys


# ------------------------------------------------------------------------------ controller


@pytest.mark.parametrize("variant", VARIANTS)
def test_controller_deployment(rendered, variant):
    objs = rendered[variant]
    dep = one(objs, "Deployment", "nec-controller")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    (ctr,) = pod["containers"]
    assert ctr["image"] == f"registry.example.com/nec/nec-serve-controller:{VERSION}"
    args = parse_cli(expand_args(ctr, dep, objs))
    data = kafka_data(objs)
    assert args.command == "controller" and args.kubernetes is True
    assert args.namespace == dep["metadata"]["namespace"] == NS
    assert args.bootstrap == data["bootstrap.servers"]
    assert args.topic == data["workflow.topic"] == "system.ML"
    assert args.dead_letter_topic == data["deadletter.topic"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(ctr["resources"][part])
    _assert_non_root(ctr["securityContext"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def _assert_non_root(sc: dict) -> None:
    dockerfile = stages(DOCKERFILE.read_text())
    assert effective(dockerfile, "wrapper", "USER") == f"{sc['runAsUser']}:{sc['runAsGroup']}"
    assert sc["runAsUser"] == UID and sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


# ------------------------------------------------------------------------------ wrappers


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("service", sorted(STEPS))
def test_wrapper_services(rendered, variant, service):
    from nec_serve.serving.client import parse_server_url

    objs = rendered[variant]
    mode, isvc = STEPS[service]
    ksvc = one(objs, "Service", service)
    ns = ksvc["metadata"]["namespace"]
    assert ksvc["metadata"]["labels"]["networking.knative.dev/visibility"] == "cluster-local"
    template = ksvc["spec"]["template"]
    anns = template["metadata"]["annotations"]
    lo, hi = (
        int(anns["autoscaling.knative.dev/min-scale"]),
        int(anns["autoscaling.knative.dev/max-scale"]),
    )
    assert 1 <= lo <= hi
    pod = template["spec"]
    assert pod["containerConcurrency"] == 1
    assert pod["timeoutSeconds"] >= 3600 and pod["responseStartTimeoutSeconds"] >= 3600
    (ctr,) = pod["containers"]
    assert ctr["image"] == f"registry.example.com/nec/nec-serve-wrapper:{VERSION}"
    args = parse_cli(expand_args(ctr, ksvc, objs))
    assert args.command == "wrapper" and args.mode == mode and args.trigger == "http"
    (port,) = ctr["ports"]
    assert args.port == port["containerPort"] == 8080 and args.host == "0.0.0.0"
    for probe in ("readinessProbe", "livenessProbe"):
        assert ctr[probe]["httpGet"] == {"path": "/healthz", "port": port["containerPort"]}
    assert args.namespace == ns
    assert args.bootstrap == kafka_data(objs)["bootstrap.servers"]
    assert args.status_topic == kafka_data(objs)["status.topic"] == "monitoring.notify"
    # --server is the cluster-local HTTP route of the step's rendered InferenceService.
    assert one(objs, "InferenceService", isvc)["spec"]["predictor"]["model"]["protocolVersion"] == (
        "v2"
    )
    assert parse_server_url(args.server) == ("http", f"{isvc}-predictor.{ns}.svc.cluster.local:80")
    mounts = {m["name"]: m for m in ctr["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model"] == {"name": "model", "configMap": {"name": "nec-model"}}
    assert mounts["model"]["mountPath"] == args.model_dir and mounts["model"]["readOnly"] is True
    assert "emptyDir" in volumes["scratch"] and mounts["scratch"]["mountPath"] == args.work_dir
    assert {"name": "TMPDIR", "value": args.work_dir} in ctr["env"]
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(ctr["resources"][part])
    _assert_non_root(ctr["securityContext"])
    # nec-model is made from an export (k8s/README.md), never rendered.
    assert "nec-model" not in by_kind(objs, "ConfigMap")


def test_the_two_wrappers_differ_only_in_their_step(rendered):
    a = one(rendered["gpu"], "Service", "nec-compress")
    b = one(rendered["gpu"], "Service", "nec-decompress")
    text = json.dumps(b).replace("decompress", "compress").replace("nec-decoder", "nec-encoder")
    assert json.loads(text) == a


# Knative Serving v0.49's webhook with its default features (config-features), from
# pkg/apis/serving/fieldmask.go and k8s_validation.go of the pinned module: what a Service may
# use without enabling a feature flag. The CRD schema cannot say this (the flags decide).
RESERVED_ENV = {"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"}
RESERVED_PORTS = {8012, 8013, 8022, 9090, 9091, 8008}
RESERVED_PATHS = {"/", "/dev", "/dev/log", "/tmp", "/var", "/var/log"}


@pytest.mark.parametrize("service", sorted(STEPS))
def test_wrappers_need_no_knative_feature_flags(rendered, service):
    pod = one(rendered["gpu"], "Service", service)["spec"]["template"]["spec"]
    assert "securityContext" not in pod  # kubernetes.podspec-securitycontext is off
    for key in ("affinity", "tolerations", "nodeSelector", "runtimeClassName", "hostAliases"):
        assert key not in pod, key  # kubernetes.podspec-* flags
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= {"configMap", "secret", "projected", "emptyDir"}
    (ctr,) = pod["containers"]
    for var in ctr["env"]:
        assert var["name"] not in RESERVED_ENV
        assert set(var.get("valueFrom", {})) <= {"configMapKeyRef", "secretKeyRef"}  # no fieldRef
    (port,) = ctr["ports"]
    assert port["name"] in ("http1", "h2c") and port["containerPort"] not in RESERVED_PORTS
    assert not {m["mountPath"].rstrip("/") or "/" for m in ctr["volumeMounts"]} & RESERVED_PATHS


def test_wrapper_serves_its_probe_path():
    """The probes' /healthz is what the wrapper's HTTP trigger answers, without a step."""
    from nec_wrapper.triggers import make_http_server

    server = make_http_server(None, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/healthz"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------ nec-model


def mount_configmap(obj: dict, directory: Path) -> Path:
    """The files the kubelet projects from a ConfigMap volume."""
    directory.mkdir(parents=True)
    for key, text in obj.get("data", {}).items():
        (directory / key).write_text(text)
    for key, b64 in obj.get("binaryData", {}).items():
        (directory / key).write_bytes(base64.b64decode(b64))
    return directory


MODEL_FILES = ["manifest.json", "entropy_tables.bin", "entropy_tables.bin.sha256"]


def test_nec_model_configmap_from_an_export(tiny_export, tmp_path):
    from nec_serve.bundle import ModelBundle

    cm = kubectl_configmap("nec-model", [tiny_export / f for f in MODEL_FILES], NS)
    assert set(cm["data"]) == {"manifest.json", "entropy_tables.bin.sha256"}
    assert set(cm["binaryData"]) == {"entropy_tables.bin"}
    assert len(json.dumps(cm)) < 1024 * 1024  # a ConfigMap holds at most 1 MiB
    model = mount_configmap(cm, tmp_path / "model")
    bundle = ModelBundle.load(model)  # verifies the tables against the manifest and .sha256
    assert bundle.tables.sha256 == ModelBundle.load(tiny_export).tables.sha256
    # A damaged copy is refused at start, not used.
    broken = copy.deepcopy(cm)
    raw = bytearray(base64.b64decode(broken["binaryData"]["entropy_tables.bin"]))
    raw[-1] ^= 1
    broken["binaryData"]["entropy_tables.bin"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(InvalidInput):
        ModelBundle.load(mount_configmap(broken, tmp_path / "broken"))


def test_readme_documents_the_nec_model_command():
    text = (ROOT / "k8s" / "README.md").read_text()
    command = (
        "kubectl create configmap nec-model --from-file=exp/manifest.json "
        "--from-file=exp/entropy_tables.bin --from-file=exp/entropy_tables.bin.sha256"
    )
    assert command in " ".join(text.replace("\\\n", " ").split())


# ------------------------------------------------------------------------------ start-up

STARTUP = """
import json, sys
import nec_cli.main as cli
import nec_controller.main as controller_main
import nec_wrapper.main as wrapper_main
args_list = json.loads(sys.argv[3])

class Started(Exception):
    pass

class FakeStore:
    def __init__(self, namespace, core_api=None):
        FakeStore.namespace = namespace

class FakeProducer:
    def close(self, timeout=None):
        pass

seen = {}
for main in (controller_main, wrapper_main):  # the names as each service's main uses them
    main.KubernetesConfigStore = FakeStore
    main.json_producer = lambda bootstrap: FakeProducer()
if args_list[0] == "wrapper":

    def fake_server(handler, host, port):
        seen.update(host=host, port=port, mode=handler.settings.mode,
                    server=handler.engine.url, tables=handler.bundle.tables.sha256,
                    work_dir=str(handler.settings.work_dir))
        raise Started

    wrapper_main.make_http_server = fake_server
else:

    class FakeSources:
        def __init__(self, bootstrap, namespace):
            seen["bootstrap"] = bootstrap
            seen["sources_namespace"] = namespace
        def close(self):
            pass

    def fake_run(controller, bootstrap, topic, stop):
        seen.update(
            topic=topic,
            dead_letter=controller.dead_letter_topic,
            status=controller.status_topic,
        )
        raise Started

    controller_main.KubernetesSources = FakeSources
    controller_main.run_controller = fake_run
args = cli.build_parser().parse_args(args_list)
try:
    args.func(args)
except Started:
    seen["namespace"] = FakeStore.namespace
    print(json.dumps(seen))
"""


@pytest.mark.parametrize("service", sorted(STEPS))
def test_wrapper_starts_from_its_manifest_with_the_image_packages(
    rendered, tiny_export, tmp_path, service
):
    """The wrapper's args, its model directory as mounted from nec-model, and nothing but the
    image's packages: it loads the tables and builds its Triton client (then stops, before
    listening: no cluster here)."""
    objs = rendered["cpu"]
    ksvc = one(objs, "Service", service)
    (ctr,) = ksvc["spec"]["template"]["spec"]["containers"]
    cm = kubectl_configmap("nec-model", [tiny_export / f for f in MODEL_FILES], NS)
    model = mount_configmap(cm, tmp_path / "model")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args = [
        a.replace("/model", str(model)).replace("/scratch", str(scratch))
        for a in expand_args(ctr, ksvc, objs)
    ]
    out = run_with_runtime_packages(STARTUP, json.dumps(args))
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    mode, isvc = STEPS[service]
    assert seen == {
        "host": "0.0.0.0",
        "port": 8080,
        "mode": mode,
        "server": f"http://{isvc}-predictor.{NS}.svc.cluster.local:80",
        "tables": Manifest.load(tiny_export).entropy.sha256,
        "work_dir": str(scratch),
        "namespace": NS,
    }


def test_controller_starts_from_its_manifest_with_the_image_packages(rendered):
    objs = rendered["cpu"]
    dep = one(objs, "Deployment", "nec-controller")
    (ctr,) = dep["spec"]["template"]["spec"]["containers"]
    out = run_with_runtime_packages(STARTUP, json.dumps(expand_args(ctr, dep, objs)))
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    data = kafka_data(objs)
    assert seen == {
        "bootstrap": data["bootstrap.servers"].split(","),
        "topic": data["workflow.topic"],
        "dead_letter": data["deadletter.topic"],
        "status": data["status.topic"],
        "namespace": NS,
        "sources_namespace": NS,
    }


# ------------------------------------------------------------------------------ the KEDA overlay


@pytest.fixture(scope="module")
def keda_objects(schemas, k8s_tree) -> list[dict]:
    return kustomize_build(schemas, k8s_tree / "overlays" / "keda")


@pytest.mark.parametrize("service", sorted(STEPS))
def test_keda_consumers_parse_to_kafka_wrappers_of_their_step(keda_objects, service):
    from nec_wrapper.main import settings_from_args

    dep = one(keda_objects, "Deployment", service)
    (ctr,) = dep["spec"]["template"]["spec"]["containers"]
    settings = settings_from_args(parse_cli(expand_args(ctr, dep, keda_objects)))
    mode, isvc = STEPS[service]
    scaled = one(keda_objects, "ScaledObject", service)
    (trigger,) = scaled["spec"]["triggers"]
    assert (settings.mode, settings.trigger, settings.service) == (mode, "kafka", service)
    assert settings.group == trigger["metadata"]["consumerGroup"]  # what KEDA measures
    assert scaled["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert trigger["type"] == "kafka" and trigger["metadata"]["bootstrapServersFromEnv"] in {
        e["name"] for e in ctr["env"]
    }
    assert settings.namespace == NS and settings.server.startswith(f"http://{isvc}-predictor.{NS}.")
    assert (settings.host, settings.metrics_port) == ("0.0.0.0", 9090)
    assert {"name": "metrics", "containerPort": 9090} in ctr["ports"]
    assert by_kind(keda_objects, "Service") == {}  # no Knative wrapper feeds the same topics


def test_keda_controller_creates_no_kafka_sources(keda_objects):
    from nec_controller.main import ControllerSettings

    dep = one(keda_objects, "Deployment", "nec-controller")
    (ctr,) = dep["spec"]["template"]["spec"]["containers"]
    settings = ControllerSettings.from_args(parse_cli(expand_args(ctr, dep, keda_objects)))
    assert settings.feed == "consumers" and settings.kubernetes


def test_kafka_wrappers_consume_only_their_steps_workflows(tmp_path):
    from nec_serve.config_store import LocalConfigStore
    from nec_wrapper.main import workflow_topics

    store = LocalConfigStore(tmp_path)
    for topic, service in (
        ("a.in", "nec-compress"),
        ("b.in", "nec-decompress"),
        ("c.in", "nec-compress"),
    ):
        store.put(parse_workflow(workflow_message(topic=topic, service=service)))
    (tmp_path / f"{config_name('broken.in')}.json").write_text("{")  # skipped, not fatal
    (tmp_path / f"{config_name('broken.in')}.secret.json").write_text("{}")
    assert sorted(workflow_topics(store, "nec-compress")) == ["a.in", "c.in"]
    assert workflow_topics(store, "nec-decompress") == ["b.in"]
    assert sorted(workflow_topics(store)) == ["a.in", "b.in", "c.in"]


def test_keda_overlay_objects_are_in_the_namespace(keda_objects):
    """Objects a component adds get no namespace from base/: the overlay must set it."""
    kinds = {(o["kind"], o["metadata"]["name"]) for o in keda_objects}
    assert {("ScaledObject", "nec-compress"), ("ScaledObject", "nec-decompress")} <= kinds
    for obj in keda_objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NS, (obj["kind"], obj["metadata"]["name"])
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "nec-serve"
