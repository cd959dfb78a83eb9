"""k8s/ against a real Kubernetes API server (etcd + kube-apiserver + kube-controller-manager).

The server is dev/stack/kube.py's LocalKube (RBAC authorisation, CRD schemas enforced, tokens
from the TokenRequest API), or the cluster of ``NEC_TEST_KUBECONFIG`` (k8s/README.md says how).
Here:

* every overlay (``gpu``, ``cpu``, ``keda``) is applied ``--server-side`` after its CRDs, each
  into a namespace of its own, and what the server stored is what was rendered;
* ``--dry-run=server --validate=strict`` refuses a misspelt field, naming it;
* the controller, authenticated as its own ServiceAccount with a real token, creates and
  deletes the KafkaSource, ConfigMap and Secret of several workflows, and is refused (403)
  what its Role does not grant and anything in another namespace; the wrapper's
  ServiceAccount reads the configs and nothing more;
* ``kubectl auth can-i --as=system:serviceaccount:...`` answers the table in k8s/README.md;
* ``nec-serve deploy`` applies the InferenceServices to the server and, without KServe's
  controller to make them Ready, times out with its message; with a Ready status written
  as KServe would write it, it returns the URL.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from support import ROOT, run_py
from support.k8s import (
    ACCESS_KEY,
    SECRET_KEY,
    copy_k8s,
    crd_files,
    dry_run,
    kubectl_configmap,
    kustomize_build,
    workflow_message,
)

from nec_serve.config_store import KubernetesConfigStore
from nec_serve.messages import config_name, parse_workflow

# What is applied, each into a namespace of its own: the overlays and the monitoring kit.
TREES = {
    "gpu": "overlays/gpu",
    "cpu": "overlays/cpu",
    "keda": "overlays/keda",
    "monitoring": "monitoring",
}
OVERLAYS = tuple(TREES)
SERVER_SIDE = ["--server-side", "--field-manager=nec-tests"]
RUN = secrets.token_hex(2)  # namespaces of this run: nec-<run>-<overlay>
# Topics of several workflows: plain, mixed case, separator-heavy, and one past the 63-character
# limit of a Kubernetes name (config_name keeps them apart and valid).
TOPICS = (
    "wf-42.in",
    "EO4EU.Sentinel2_L2A.Workflow-7.IN",
    "a..b__c--d..e__f..g__h",
    "eo4eu.uc5.sentinel-2.level-2a.tiles.compressed.embeddings.for.workflow.0042.input",
)


def namespace(overlay: str) -> str:
    return f"nec-{RUN}-{overlay}"


def to_yaml(objects: list[dict]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


@pytest.fixture(scope="module")
def crds(kube, schemas) -> list[str]:
    """Every CRD the overlays use, applied server-side (large ones do not fit client-side)."""
    names = []
    for path in crd_files(schemas):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            name = crd["metadata"]["name"]
            names.append(name)
            if not kube.local and kube.kubectl("get", f"crd/{name}", check=False).returncode == 0:
                continue  # a real cluster's own CRDs are never replaced by the tests
            kube.kubectl(
                "apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(crd)
            )
    kube.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names)
    )
    return names


def render(schemas, tmp: Path, overlay: str, ns: str) -> list[dict]:
    """The overlay, moved to ``ns`` by an overlay of its own (as k8s/README.md says to)."""
    tree = copy_k8s(tmp)
    mine = tree / f"test-{overlay}"
    mine.mkdir()
    namespace_obj = "" if overlay != "monitoring" else "  - namespace.yaml\n"
    if namespace_obj:  # the monitoring kit goes into an existing namespace; here its own
        (mine / "namespace.yaml").write_text(
            f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n"
        )
    (mine / "kustomization.yaml").write_text(
        f"apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"namespace: {ns}\nresources:\n  - ../{TREES[overlay]}\n{namespace_obj}"
    )
    return kustomize_build(schemas, mine)


def resource(obj: dict) -> str:
    group = obj["apiVersion"].rpartition("/")[0]
    kind = obj["kind"].lower()
    return (
        f"{kind}.{group}/{obj['metadata']['name']}"
        if group
        else f"{kind}/{obj['metadata']['name']}"
    )


def contains(stored, wanted, path="") -> list[str]:
    """Where ``stored`` differs from ``wanted`` (the server may add defaults, nothing else)."""
    if isinstance(wanted, dict):
        if not isinstance(stored, dict):
            return [f"{path}: {stored!r} is not an object"]
        return [p for k, v in wanted.items() for p in contains(stored.get(k), v, f"{path}.{k}")]
    if isinstance(wanted, list):
        if not isinstance(stored, list) or len(stored) != len(wanted):
            return [f"{path}: {stored!r} != {wanted!r}"]
        return [
            p
            for i, (s, w) in enumerate(zip(stored, wanted, strict=True))
            for p in contains(s, w, f"{path}[{i}]")
        ]
    return [] if stored == wanted else [f"{path}: {stored!r} != {wanted!r}"]


@pytest.fixture(scope="module")
def applied(kube, crds, schemas, tmp_path_factory) -> dict[str, list[dict]]:
    """Every overlay applied server-side into its own namespace; its rendered objects."""
    out = {}
    for overlay in OVERLAYS:
        objects = render(schemas, tmp_path_factory.mktemp(overlay), overlay, namespace(overlay))
        kube.kubectl("apply", *SERVER_SIDE, "--validate=strict", "-f", "-", input=to_yaml(objects))
        out[overlay] = objects
    yield out
    if kube.local:
        return  # the server goes with the session
    for overlay in OVERLAYS:
        kube.kubectl("delete", "namespace", namespace(overlay), "--wait=false", check=False)


# ------------------------------------------------------------------------------ apply


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_applies_server_side_and_is_stored_as_rendered(kube, applied, overlay):
    ns = namespace(overlay)
    kinds = set()
    for obj in applied[overlay]:
        kinds.add(obj["kind"])
        args = ["get", resource(obj), "-o", "json"]
        if obj["kind"] != "Namespace":
            args += ["-n", ns]
        stored = json.loads(kube.kubectl(*args).stdout)
        wanted = {k: v for k, v in obj.items() if k not in ("metadata", "stringData")}
        assert contains(stored, wanted) == [], resource(obj)
        labels = obj["metadata"].get("labels") or {}
        assert (stored["metadata"].get("labels") or {}).items() >= labels.items()
    if overlay == "monitoring":
        assert kinds == {"Namespace", "ConfigMap", "PodMonitor"}
        return
    expected = {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret"}
    expected |= {"Deployment", "InferenceService"}
    expected |= {"ScaledObject"} if overlay == "keda" else {"Service"}  # Knative wrappers
    assert kinds == expected


def test_keda_overlay_replaces_the_knative_wrappers(kube, applied):
    ns = namespace("keda")
    services = json.loads(
        kube.kubectl("get", "services.serving.knative.dev", "-n", ns, "-o", "json").stdout
    )
    assert services["items"] == []
    deployments = {
        o["metadata"]["name"]: o
        for o in json.loads(kube.kubectl("get", "deployments", "-n", ns, "-o", "json").stdout)[
            "items"
        ]
    }
    assert set(deployments) == {"nec-controller", "nec-compress", "nec-decompress"}
    assert (
        "--feed=consumers"
        in deployments["nec-controller"]["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    scaled = json.loads(
        kube.kubectl("get", "scaledobjects.keda.sh", "-n", ns, "-o", "json").stdout
    )["items"]
    for so in scaled:
        target = so["spec"]["scaleTargetRef"]["name"]
        args = deployments[target]["spec"]["template"]["spec"]["containers"][0]["args"]
        group = so["spec"]["triggers"][0]["metadata"]["consumerGroup"]
        assert f"--group={group}" in args  # KEDA measures the group the wrapper consumes in
        assert f"--service={target}" in args


# ------------------------------------------------------------------------------ strict


MISSPELT = [
    ("InferenceService", "nec-encoder", ("spec", "predictor"), "scaleTargte", 4),
    ("Deployment", "nec-controller", ("spec", "template", "spec"), "serviceAcountName", "x"),
    ("ScaledObject", "nec-compress", ("spec",), "maxReplicasCount", 3),
]


@pytest.mark.parametrize(("kind", "name", "path", "field", "value"), MISSPELT)
def test_server_side_strict_validation_names_a_misspelt_field(
    kube, applied, kind, name, path, field, value
):
    overlay = "keda" if kind == "ScaledObject" else "gpu"
    obj = copy.deepcopy(
        next(o for o in applied[overlay] if o["kind"] == kind and o["metadata"]["name"] == name)
    )
    node = obj
    for key in path:
        node = node[key]
    node[field] = value
    dotted = ".".join((*path, field))
    # Server-side apply, and a plain apply validated by the server: both refuse, naming it.
    for mode, says in (
        (
            ["--server-side", "--field-manager=nec-tests"],
            f".{dotted}: field not declared in schema",
        ),
        ([], f'unknown field "{dotted}"'),
    ):
        proc = dry_run(kube, obj, mode)
        assert proc.returncode != 0 and says in proc.stderr, proc.stderr
    # The same object without the typo passes the same checks.
    del node[field]
    for mode in (["--server-side", "--field-manager=nec-tests"], []):
        ok = dry_run(kube, obj, mode)
        assert ok.returncode == 0, ok.stderr


# ----------------------------------------------------------------------- what the product makes

# Topics of the controller's KafkaSources: plain, mixed case, the longest Kafka allows, short.
SOURCE_TOPICS = ("wf-42.in", "EO4EU.Workflow_07.Input", "a" * 249, "x")
MODEL_FILES = ["manifest.json", "entropy_tables.bin", "entropy_tables.bin.sha256"]


def refused(kube, objects: list[dict]) -> list[str]:
    """The objects the server refuses (server-side apply, strict, dry run), with its reason."""
    args = ["apply", *SERVER_SIDE, "--dry-run=server", "--validate=strict", "-f", "-"]
    if kube.kubectl(*args, input=to_yaml(objects), check=False).returncode == 0:
        return []  # one kubectl for all; one each only to say which are refused
    out = []
    for obj in objects:
        proc = dry_run(kube, obj, SERVER_SIDE)
        if proc.returncode != 0:
            out.append(f"{obj['kind']}/{obj['metadata']['name']}: {proc.stderr.strip()}")
    return out


def typed_inference_services(ns: str) -> list[dict]:
    """``nec-serve deploy``'s typed objects (every family, both variants) as the kubernetes
    ApiClient sends them, built in a kserve process of its own (kserve #3099)."""
    out = run_py(
        f"""
        import json
        from nec_serve import deploy
        objs = [
            deploy.to_manifest(o)
            for v in deploy.VARIANTS
            for o in deploy.build_inference_services(
                v, f"s3://nec-models/p/model_repository_{{v}}", {ns!r}
            )
        ]
        print(json.dumps(objs))
        """
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_objects_the_product_makes_pass_strict_server_validation(kube, applied, tiny_export):
    """What the controller, the config store, ``nec-serve deploy`` and the ``nec-model``
    command of k8s/README.md make, each refused by the server if it had a field too many or
    of the wrong type (the overlays themselves are applied above)."""
    from nec_controller.sources import kafka_source

    ns = namespace("gpu")
    kafka = next(o for o in applied["gpu"] if o["metadata"]["name"] == "nec-kafka")
    bootstrap = kafka["data"]["bootstrap.servers"].split(",")
    configs = [
        parse_workflow(workflow_message(topic, service, namespace=ns))
        for topic in SOURCE_TOPICS
        for service in ("nec-compress", "nec-decompress")
    ]
    objects = [kafka_source(c, bootstrap) for c in configs]
    objects += KubernetesConfigStore.objects(configs[0], ns)
    objects.append(kubectl_configmap("nec-model", [tiny_export / f for f in MODEL_FILES], ns))
    isvcs = typed_inference_services(ns)
    assert {o["metadata"]["name"] for o in isvcs} == {
        "nec-encoder",
        "nec-decoder",
        "rvq-encoder",
        "rvq-decoder",
    }
    assert len(isvcs) == 8
    assert refused(kube, objects + isvcs) == []
    # The same objects with one field the schema lacks are refused, naming it.
    source = copy.deepcopy(objects[0])
    source["spec"]["topic"] = source["spec"]["topics"]
    isvc = copy.deepcopy(isvcs[0])
    isvc["spec"]["predictor"]["ephemeralContainers"] = []  # in the SDK model, not in the CRD
    problems = refused(kube, [source, isvc])
    assert len(problems) == 2
    assert ".spec.topic: field not declared in schema" in problems[0], problems
    assert ".spec.predictor.ephemeralContainers: field not declared" in problems[1], problems


# Fields of a Knative Service's pod template that are Knative's own, not a core PodSpec's.
KNATIVE_POD_FIELDS = {
    "containerConcurrency",
    "timeoutSeconds",
    "responseStartTimeoutSeconds",
    "idleTimeoutSeconds",
}


def as_pod(ksvc: dict) -> dict:
    """A Knative Service's pod template as the core Pod it becomes: Knative's CRD leaves parts
    of it open (``x-kubernetes-preserve-unknown-fields`` on the pod ``securityContext``,
    ``affinity``, ``tolerations``, some volume sources, ``env[].valueFrom.fieldRef``), so the
    server checks those only in a Pod."""
    template = copy.deepcopy(ksvc["spec"]["template"])
    spec = {k: v for k, v in template["spec"].items() if k not in KNATIVE_POD_FIELDS}
    for i, container in enumerate(spec["containers"]):
        container.setdefault("name", f"user-container-{i}")  # Knative names unnamed ones
    meta = dict(template.get("metadata") or {}, name=ksvc["metadata"]["name"])
    meta["namespace"] = ksvc["metadata"]["namespace"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_knative_pod_templates_are_valid_pods(kube, applied, overlay):
    services = [o for o in applied[overlay] if o["kind"] == "Service" and "template" in o["spec"]]
    assert {s["metadata"]["name"] for s in services} == {"nec-compress", "nec-decompress"}
    pods = [as_pod(s) for s in services]
    assert refused(kube, pods) == []
    pods[0]["spec"].setdefault("securityContext", {})["runAsUsr"] = 1
    (problem,) = refused(kube, pods[:1])
    assert ".spec.securityContext.runAsUsr: field not declared in schema" in problem


WRONG_TYPES = [
    # (kind, name, path, field, value, what the server says)
    ("InferenceService", "nec-encoder", ("spec", "predictor"), "minReplicas", "1", "minReplicas"),
    ("Deployment", "nec-controller", ("spec",), "replicas", "1", "replicas"),
    ("Secret", "nec-s3", ("data",), "AWS_REGION", "not base64!", "base64"),
]


@pytest.mark.parametrize(("kind", "name", "path", "field", "value", "says"), WRONG_TYPES)
def test_server_side_validation_refuses_a_wrong_type(
    kube, applied, kind, name, path, field, value, says
):
    obj = copy.deepcopy(
        next(o for o in applied["gpu"] if o["kind"] == kind and o["metadata"]["name"] == name)
    )
    node = obj
    for key in path:
        node = node[key]
    node[field] = value
    proc = dry_run(kube, obj, SERVER_SIDE)
    assert proc.returncode != 0 and says in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------ RBAC, for real


def api_client(kubeconfig: Path):
    from kubernetes import config

    return config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture(scope="module")
def controller_api(kube, applied, tmp_path_factory):
    """API clients authenticated as the controller's ServiceAccount (a TokenRequest token)."""
    from kubernetes import client

    ns = namespace("cpu")
    path = kube.kubeconfig_for(ns, "nec-controller", tmp_path_factory.mktemp("sa") / "controller")
    api = api_client(path)
    return client.CoreV1Api(api), client.CustomObjectsApi(api), client.AppsV1Api(api)


@pytest.fixture(scope="module")
def wrapper_api(kube, applied, tmp_path_factory):
    from kubernetes import client

    ns = namespace("cpu")
    path = kube.kubeconfig_for(ns, "nec-wrapper", tmp_path_factory.mktemp("sa") / "wrapper")
    api = api_client(path)
    return client.CoreV1Api(api), client.CustomObjectsApi(api)


def names_in(kube, ns: str, kind: str) -> set[str]:
    listed = json.loads(
        kube.kubectl(
            "get", kind, "-n", ns, "-l", "app.kubernetes.io/managed-by=nec-controller", "-o", "json"
        ).stdout
    )
    return {o["metadata"]["name"] for o in listed["items"]}


def kubernetes_controller(controller_api, ns: str):
    """The controller in Kubernetes mode, its API calls made with the given clients."""
    from nec_controller.app import Controller
    from nec_controller.sources import KubernetesSources

    core, custom, _ = controller_api
    return Controller(
        KubernetesConfigStore(ns, core_api=core),
        KubernetesSources(["kafka:9092"], custom_api=custom, namespace=ns),
        backoff_s=0.05,
    )


def test_controller_as_its_service_account_provisions_and_removes_workflows(
    kube, controller_api, wrapper_api
):
    ns = namespace("cpu")
    controller = kubernetes_controller(controller_api, ns)
    messages = [workflow_message(topic=t, namespace=ns) for t in TOPICS]
    for msg in messages:
        assert controller.handle(json.dumps(msg).encode()) == "published", msg["Topics"]["in"]
    expected = {config_name(t) for t in TOPICS}
    assert all(len(n) <= 63 for n in expected)
    for kind in ("kafkasources.v1beta1.sources.knative.dev", "configmaps", "secrets"):
        assert names_in(kube, ns, kind) == expected, kind
    # Stored as the API server keeps it: credentials in the Secret only.
    name = config_name(TOPICS[1])
    cm = json.loads(kube.kubectl("get", "configmap", name, "-n", ns, "-o", "json").stdout)
    assert ACCESS_KEY not in json.dumps(cm) and SECRET_KEY not in json.dumps(cm)
    source = json.loads(
        kube.kubectl(
            "get", f"kafkasources.v1beta1.sources.knative.dev/{name}", "-n", ns, "-o", "json"
        ).stdout
    )
    assert source["spec"]["topics"] == [TOPICS[1]] and source["spec"]["sink"]["uri"] == f"/{name}"
    # The same message again changes nothing; a changed one replaces (update verb).
    assert controller.handle(json.dumps(messages[0]).encode()) in ("published", "unchanged")
    changed = dict(messages[0], Topics={"in": TOPICS[0], "out": "elsewhere.out"})
    assert controller.handle(json.dumps(changed).encode()) == "published"
    # The wrapper, as its own ServiceAccount, reads every workflow's config back.
    store = KubernetesConfigStore(ns, core_api=wrapper_api[0])
    assert set(store.names()) == expected
    config = store.get(config_name(TOPICS[0]))
    assert config.topic_out == "elsewhere.out" and config.s3.secret_access_key == SECRET_KEY
    # Stopping removes all three objects of each workflow.
    for msg in messages:
        stop = dict(msg, workflow_status="stopping")
        assert controller.handle(json.dumps(stop).encode()) == "stopped"
        assert controller.handle(json.dumps(stop).encode()) == "unchanged"
    for kind in ("kafkasources.v1beta1.sources.knative.dev", "configmaps", "secrets"):
        assert names_in(kube, ns, kind) == set(), kind


def test_controller_refuses_a_workflow_in_another_namespace_and_leaves_nothing(
    kube, controller_api
):
    ns = namespace("cpu")
    controller = kubernetes_controller(controller_api, ns)
    msg = workflow_message(topic="elsewhere.in", namespace=namespace("gpu"))
    assert controller.handle(json.dumps(msg).encode()) == "rejected"
    assert config_name("elsewhere.in") not in names_in(kube, ns, "configmaps")
    assert names_in(kube, namespace("gpu"), "kafkasources.v1beta1.sources.knative.dev") == set()


def _secret_data(kube, ns: str, name: str) -> dict:
    return json.loads(kube.kubectl("get", "secret", name, "-n", ns, "-o", "json").stdout)["data"]


def test_a_rejected_republish_leaves_the_running_workflow_and_its_secret_as_they_were(
    kube, controller_api
):
    ns = namespace("cpu")
    controller = kubernetes_controller(controller_api, ns)
    topic = f"republish-{RUN}.in"
    name = config_name(topic)
    msg = workflow_message(topic=topic, namespace=ns)
    assert controller.handle(json.dumps(msg).encode()) == "published"
    before = _secret_data(kube, ns, name)
    cm_before = kube.kubectl("get", "configmap", name, "-n", ns, "-o", "json").stdout
    # The same workflow again with other credentials, naming a namespace the controller
    # may not write its KafkaSource to: refused (403), and nothing stored may change.
    rejected = copy.deepcopy(msg)
    rejected["ML"]["Namespace"] = namespace("gpu")
    rejected["S3_bucket"]["aws_access_key_id"] = "AKIAREJECTEDREJECTED0"
    rejected["S3_bucket"]["aws_secret_access_key"] = "rejected-secret-never-stored-0001"
    assert controller.handle(json.dumps(rejected).encode()) == "rejected"
    assert _secret_data(kube, ns, name) == before
    cm_after = json.loads(kube.kubectl("get", "configmap", name, "-n", ns, "-o", "json").stdout)
    assert cm_after["data"] == json.loads(cm_before)["data"]
    assert "rejected-secret" not in json.dumps(cm_after)
    # A valid change of credentials is then applied.
    valid = copy.deepcopy(msg)
    valid["S3_bucket"]["aws_secret_access_key"] = "rotated-secret-0002"
    assert controller.handle(json.dumps(valid).encode()) == "published"
    assert _secret_data(kube, ns, name) != before
    stored = KubernetesConfigStore(ns, core_api=controller_api[0]).get(name)
    assert stored.s3.secret_access_key == "rotated-secret-0002"
    stop = dict(valid, workflow_status="stopping")
    assert controller.handle(json.dumps(stop).encode()) == "stopped"


def test_a_restarted_controller_recreates_the_sources_of_stored_workflows(kube, controller_api):
    ns = namespace("cpu")
    topics = [f"resume-{RUN}-{i}.in" for i in range(2)]
    first = kubernetes_controller(controller_api, ns)
    for topic in topics:
        assert first.handle(json.dumps(workflow_message(topic, namespace=ns)).encode()) == (
            "published"
        )
    names = {config_name(t) for t in topics}
    kind = "kafkasources.v1beta1.sources.knative.dev"
    gone = config_name(topics[0])
    kube.kubectl("delete", f"{kind}/{gone}", "-n", ns)
    assert names - names_in(kube, ns, kind) == {gone}
    # A new controller (a restarted pod) resumes every stored workflow before consuming.
    resumed = kubernetes_controller(controller_api, ns).resume()
    assert {n: resumed[n] for n in names} == {gone: "started", config_name(topics[1]): "running"}
    assert names <= names_in(kube, ns, kind)
    for topic in topics:
        stop = dict(workflow_message(topic, namespace=ns), workflow_status="stopping")
        assert first.handle(json.dumps(stop).encode()) == "stopped"


def _status(call) -> int:
    from kubernetes.client.exceptions import ApiException

    try:
        call()
    except ApiException as err:
        return err.status
    return 200


def test_what_the_roles_do_not_grant_is_forbidden(controller_api, wrapper_api):
    core, custom, apps = controller_api
    ns, other = namespace("cpu"), namespace("gpu")
    cm = {"metadata": {"name": "nec-probe"}, "data": {"a": "b"}}
    source = {
        "apiVersion": "sources.knative.dev/v1beta1",
        "kind": "KafkaSource",
        "metadata": {"name": "nec-probe"},
        "spec": {"bootstrapServers": ["k:9092"], "topics": ["t"], "sink": {"uri": "http://x"}},
    }
    w_core, w_custom = wrapper_api
    ks = ("sources.knative.dev", "v1beta1")
    forbidden = {
        "controller lists pods": lambda: core.list_namespaced_pod(ns),
        "controller reads a Deployment": lambda: apps.read_namespaced_deployment(
            "nec-controller", ns
        ),
        "controller lists Knative Services": lambda: custom.list_namespaced_custom_object(
            "serving.knative.dev", "v1", ns, "services"
        ),
        "controller reads a ConfigMap elsewhere": lambda: core.read_namespaced_config_map(
            "nec-kafka", other
        ),
        "controller creates a ConfigMap elsewhere": lambda: core.create_namespaced_config_map(
            other, cm
        ),
        "controller creates a KafkaSource elsewhere": lambda: (
            custom.create_namespaced_custom_object(*ks, other, "kafkasources", source)
        ),
        "controller lists namespaces": lambda: core.list_namespace(),
        "wrapper creates a ConfigMap": lambda: w_core.create_namespaced_config_map(ns, cm),
        "wrapper deletes a Secret": lambda: w_core.delete_namespaced_secret("nec-s3", ns),
        "wrapper lists KafkaSources": lambda: w_custom.list_namespaced_custom_object(
            *ks, ns, "kafkasources"
        ),
        "wrapper reads a Secret elsewhere": lambda: w_core.read_namespaced_secret("nec-s3", other),
    }
    got = {what: _status(call) for what, call in forbidden.items()}
    assert got == dict.fromkeys(forbidden, 403)
    # ... while what they are granted works with the same credentials.
    assert _status(lambda: w_core.read_namespaced_secret("nec-s3", ns)) == 200
    assert _status(lambda: core.create_namespaced_config_map(ns, cm)) == 200
    assert _status(lambda: core.delete_namespaced_config_map("nec-probe", ns)) == 200


# ------------------------------------------------------------------------------ can-i table


def can_i_table() -> list[tuple[str, str, str, str, bool]]:
    """Rows of the ``kubectl auth can-i`` table in k8s/README.md."""
    text = (ROOT / "k8s" / "README.md").read_text()
    section = text.split("<!-- can-i table -->", 2)
    assert len(section) == 3, (
        "k8s/README.md has no <!-- can-i table --> ... <!-- can-i table --> block"
    )
    rows = []
    for line in section[1].splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or cells[0] in ("ServiceAccount", "") or set(cells[0]) <= {"-", ":"}:
            continue
        account, verb, res, where, answer = cells
        assert answer in ("yes", "no"), line
        rows.append((account, verb, res, where, answer == "yes"))
    return rows


def test_can_i_matches_the_table_in_the_readme(kube, applied):
    rows = can_i_table()
    assert {r[0] for r in rows} == {"nec-controller", "nec-wrapper"}
    assert any(r[4] for r in rows) and any(not r[4] for r in rows)
    ns = namespace("cpu")
    wrong = []
    for account, verb, res, where, allowed in rows:
        target = ns if where == "own" else namespace("gpu")
        proc = kube.kubectl(
            "auth",
            "can-i",
            verb,
            res,
            "-n",
            target,
            f"--as=system:serviceaccount:{ns}:{account}",
            check=False,
        )
        answer = proc.stdout.strip()
        if answer not in ("yes", "no"):
            pytest.fail(f"kubectl auth can-i {verb} {res}: {proc.stderr.strip()}")
        if (answer == "yes") != allowed:
            wrong.append(f"{account} {verb} {res} ({where}): server says {answer}")
    assert wrong == []


# ------------------------------------------------------------------------------ nec-serve deploy


def bucket(s3) -> None:
    client = s3.client()
    if "nec-models" not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket="nec-models")


def _deploy(kube, s3, tiny_export, ns: str, timeout: float) -> subprocess.CompletedProcess:
    import os

    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID=s3.access_key,
        AWS_SECRET_ACCESS_KEY=s3.secret_key,
        AWS_DEFAULT_REGION=s3.region,
    )
    args = ["deploy", "--model-dir", str(tiny_export), "--variant", "cpu", "--bucket", "nec-models"]
    args += ["--prefix", f"t{RUN}", "--endpoint-url", s3.endpoint_url, "--namespace", ns]
    args += ["--timeout", str(timeout), "--kubeconfig", str(kube.kubeconfig)]
    return subprocess.run(
        [sys.executable, "-m", "nec_cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_deploy_applies_to_the_server_and_times_out_without_kserve(kube, applied, s3, tiny_export):
    bucket(s3)
    ns = namespace("cpu")
    proc = _deploy(kube, s3, tiny_export, ns, timeout=3)
    assert proc.returncode != 0
    assert re.search(
        r"not ready after 3 s: InferenceService \S+/nec-(en|de)coder: last condition no cond",
        proc.stderr,
    ), proc.stderr
    assert f"kubectl -n {ns} describe inferenceservice" in proc.stderr
    # It did apply: the stored objects point at the repository it uploaded.
    for name in ("nec-encoder", "nec-decoder"):
        isvc = json.loads(
            kube.kubectl("get", f"inferenceservice/{name}", "-n", ns, "-o", "json").stdout
        )
        assert (
            isvc["spec"]["predictor"]["model"]["storageUri"]
            == f"s3://nec-models/t{RUN}/model_repository_cpu"
        )
        assert isvc["metadata"]["generation"] >= 2  # replaced what the overlay applied


def test_deploy_returns_once_the_services_report_ready(kube, applied, s3, tiny_export):
    """KServe's controller is not here: its status write is made as KServe makes it."""
    bucket(s3)
    ns = namespace("cpu")
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(proc=_deploy(kube, s3, tiny_export, ns, 120))
    )
    thread.start()
    deadline = time.monotonic() + 120
    while thread.is_alive() and time.monotonic() < deadline:
        # What KServe's controller would report once the predictors serve: Ready, for the
        # generation it has seen (deploy waits for the generation it applied).
        for name in ("nec-encoder", "nec-decoder"):
            isvc = json.loads(
                kube.kubectl("get", f"inferenceservice/{name}", "-n", ns, "-o", "json").stdout
            )
            status = {
                "observedGeneration": isvc["metadata"]["generation"],
                "url": f"http://{name}.{ns}.example.com",
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "lastTransitionTime": "2026-01-01T00:00:00Z",
                    }
                ],
            }
            patch = ["--subresource=status", "--type=merge", "-p", json.dumps({"status": status})]
            kube.kubectl("patch", f"inferenceservice/{name}", "-n", ns, *patch)
        time.sleep(0.5)
    thread.join(150)
    proc = result["proc"]
    assert proc.returncode == 0, proc.stderr
    assert f"http://nec-encoder.{ns}.example.com" in proc.stdout + proc.stderr


def test_wait_names_a_failing_service_and_its_condition(kube, applied):
    """The conditions as KServe reports a failed revision, read back through the real API."""
    ns = namespace("gpu")
    failing = {
        "observedGeneration": 1,
        "conditions": [
            {"type": "IngressReady", "status": "True"},
            {
                "type": "PredictorReady",
                "status": "False",
                "reason": "RevisionFailed",
                "message": "Revision nec-encoder-predictor-00002 failed: ImagePullBackOff",
            },
            {"type": "Ready", "status": "False", "reason": "RevisionFailed"},
        ],
    }
    for cond in failing["conditions"]:
        cond["lastTransitionTime"] = "2026-01-01T00:00:00Z"
    patch = ["--subresource=status", "--type=merge", "-p", json.dumps({"status": failing})]
    kube.kubectl("patch", "inferenceservice/nec-encoder", "-n", ns, *patch)
    # kserve's SDK in a process of its own (its protos clash with tritonclient's: kserve #3099).
    out = run_py(
        f"""
        from nec_serve import deploy
        client = deploy.make_kserve_client({str(kube.kubeconfig)!r})
        try:
            deploy.wait_ready(client, ["nec-encoder", "nec-decoder"], {ns!r}, timeout=1, poll=0.2)
        except deploy.DeployTimeout as err:
            print(err)
        """
    )
    assert out.returncode == 0, out.stderr
    msg = out.stdout.strip()
    assert msg.startswith(f"not ready after 1 s: InferenceService {ns}/nec-encoder: last condition")
    assert "Ready=False (RevisionFailed)" in msg
    assert "PredictorReady=False (RevisionFailed: Revision nec-encoder-predictor-00002" in msg
    assert f"InferenceService {ns}/nec-decoder: last condition no conditions reported yet" in msg
    assert f"kubectl -n {ns} describe inferenceservice nec-encoder" in msg


def test_deploy_refuses_a_namespace_without_its_service_account(kube, applied):
    ns = f"nec-{RUN}-bare"
    kube.kubectl("create", "namespace", ns)
    out = run_py(
        f"""
        from nec_serve import deploy
        uri = "s3://nec-models/p/model_repository_cpu"
        objs = deploy.build_inference_services("cpu", uri, {ns!r})
        client = deploy.make_kserve_client({str(kube.kubeconfig)!r})
        try:
            deploy.apply_inference_services(client, objs, {ns!r})
        except deploy.DeployError as err:
            print(err)
        """
    )
    assert out.returncode == 0, out.stderr
    assert f"ServiceAccount {ns}/nec-models not found" in out.stdout
    assert "kubectl apply -k k8s/overlays/<variant>" in out.stdout
    listed = json.loads(kube.kubectl("get", "inferenceservices", "-n", ns, "-o", "json").stdout)
    assert listed["items"] == []  # nothing applied


def test_controller_feeding_consumers_stores_configs_and_creates_no_source(kube, applied, tmp_path):
    """The KEDA overlay's controller (--feed=consumers), as its ServiceAccount there."""
    from kubernetes import client

    from nec_controller.app import Controller
    from nec_controller.sources import ConsumerFeed

    ns = namespace("keda")
    api = api_client(kube.kubeconfig_for(ns, "nec-controller", tmp_path / "kubeconfig"))
    controller = Controller(
        KubernetesConfigStore(ns, core_api=client.CoreV1Api(api)), ConsumerFeed()
    )
    msg = workflow_message(topic="keda.in", namespace=ns)
    assert controller.handle(json.dumps(msg).encode()) == "published"
    name = config_name("keda.in")
    assert names_in(kube, ns, "configmaps") == names_in(kube, ns, "secrets") == {name}
    assert names_in(kube, ns, "kafkasources.v1beta1.sources.knative.dev") == set()
    assert (
        controller.handle(json.dumps(dict(msg, workflow_status="stopping")).encode()) == "stopped"
    )
    assert names_in(kube, ns, "configmaps") == set()
