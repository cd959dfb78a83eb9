"""Deploy NEC on KServe + NVIDIA Triton: upload a model repository, apply the InferenceServices.

Three steps, each usable on its own:

1. :func:`upload_repository` copies ``<export>/model_repository_<variant>/`` to
   ``s3://<bucket>/<prefix>/model_repository_<variant>/`` with boto3 (explicit timeouts and
   retries), so that the ``storageUri`` prefix holds ``<model>/config.pbtxt`` and
   ``<model>/<version>/...`` exactly as KServe's storage initializer downloads them to
   ``/mnt/models`` and Triton reads them (``--model-store=/mnt/models``). Objects under that
   prefix which are not in the directory are deleted, so the prefix mirrors the directory.
2. :func:`build_inference_services` builds typed ``kserve`` SDK objects for the two services,
   ``nec-encoder`` (loads ``nec_encoder``) and ``nec-decoder`` (``nec_decoder`` and
   ``nec_decoder_block1``), the same objects ``kubectl apply -k k8s/overlays/<variant>``
   creates (tests/test_deploy.py compares them field by field).
3. :func:`apply_inference_services` creates or replaces them with ``KServeClient`` and
   :func:`wait_ready` waits until KServe reports them Ready, or fails naming the service and
   its last condition.

The namespace, the ServiceAccount ``nec-models`` and the S3 Secret are not created here: they
come from ``kubectl apply -k k8s/overlays/<variant>`` (see k8s/README.md), which also holds
the credentials the pods download with. This module uses whatever credentials boto3 and the
kubeconfig provide and never logs or prints them.

``kserve`` is imported only inside functions: it and ``tritonclient.grpc`` register the same
protobuf symbols and cannot live in one process (kserve issue #3099).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from nec_serve.contract import NEC, GraphRole
from nec_serve.errors import InvalidInput, NecError

__all__ = [
    "DeployError",
    "DeployTimeout",
    "Service",
    "SERVICES",
    "VARIANTS",
    "NAMESPACE",
    "SERVICE_ACCOUNT",
    "RUNTIME",
    "RUNTIME_VERSION",
    "TRITON_HTTP_PORT",
    "repository_dir",
    "check_repository",
    "storage_uri",
    "make_s3_client",
    "upload_repository",
    "build_inference_services",
    "to_manifest",
    "make_kserve_client",
    "apply_inference_services",
    "wait_ready",
    "add_parser",
    "cmd_deploy",
    "main",
]

log = logging.getLogger("nec_serve.deploy")

VARIANTS = ("gpu", "cpu")
NAMESPACE = "nec"
SERVICE_ACCOUNT = "nec-models"  # k8s/base/serviceaccount.yaml; lists the S3 Secret nec-s3
# KServe's ClusterServingRuntime for Triton (config/runtimes/kserve-tritonserver.yaml, v0.20.0):
# tritonserver --model-store=/mnt/models --grpc-port=9000 --http-port=8080 --allow-grpc=true
# --allow-http=true, image nvcr.io/nvidia/tritonserver, user 1000. Our args are appended.
RUNTIME = "kserve-tritonserver"
RUNTIME_VERSION = "26.07-py3"  # tag of nvcr.io/nvidia/tritonserver
TRITON_HTTP_PORT = 8080
DEPLOYMENT_MODE = "Serverless"
TRT_CACHE_PATH = "/tmp/trt_cache"  # trt_engine_cache_path of the GPU configs (export/triton.py)
COMMON_LABELS = {"app.kubernetes.io/name": "nec", "app.kubernetes.io/part-of": "nec-serve"}
VARIANT_LABEL = "nec-serve/variant"

_GROUP, _VERSION, _PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_MODEL_NAME = re.compile(r'^\s*name:\s*"([^"]*)"', re.MULTILINE)


class DeployError(NecError):
    """Uploading the repository or applying the InferenceServices failed."""


class DeployTimeout(DeployError, TimeoutError):
    """An InferenceService did not become Ready in time."""


@dataclass(frozen=True)
class Sizing:
    """Resources and autoscaling of one service in one variant."""

    requests: dict[str, str]
    limits: dict[str, str]
    min_replicas: int
    max_replicas: int
    scale_target: int  # in-flight requests per replica (Knative concurrency)


@dataclass(frozen=True)
class Service:
    """One InferenceService: a Triton server loading some models of the repository."""

    name: str
    component: str
    models: tuple[str, ...]
    sizing: dict[str, Sizing]  # by variant

    def args(self) -> list[str]:
        """Triton arguments appended to the runtime's: load only this service's models."""
        return [
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.models),
            "--strict-readiness=true",
        ]


_GPU = Sizing(
    requests={"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"},
    limits={"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"},
    min_replicas=1,
    max_replicas=4,
    scale_target=4,
)
SERVICES = (
    Service(
        "nec-encoder",
        "encoder",
        (NEC.graph_name(GraphRole.ENCODER),),
        {
            "gpu": _GPU,
            "cpu": Sizing(
                requests={"cpu": "4", "memory": "4Gi"},
                limits={"cpu": "4", "memory": "8Gi"},
                min_replicas=1,
                max_replicas=8,
                scale_target=2,
            ),
        },
    ),
    Service(
        "nec-decoder",
        "decoder",
        (NEC.graph_name(GraphRole.DECODER), NEC.graph_name(GraphRole.FEATURES)),
        {
            "gpu": _GPU,
            "cpu": Sizing(
                requests={"cpu": "2", "memory": "2Gi"},
                limits={"cpu": "2", "memory": "4Gi"},
                min_replicas=1,
                max_replicas=8,
                scale_target=2,
            ),
        },
    ),
)


# ------------------------------------------------------------------------------ layout


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise InvalidInput(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    return variant


def repository_dir(model_dir: str | Path, variant: str) -> Path:
    """``<model_dir>/model_repository_<variant>``, the directory ``nec-serve export`` wrote."""
    path = Path(model_dir) / f"model_repository_{_check_variant(variant)}"
    if not path.is_dir():
        raise InvalidInput(
            f"no Triton repository at {path}: --model-dir must be a directory written by "
            f"`nec-serve export --out DIR` (it holds model_repository_gpu/ and "
            f"model_repository_cpu/)"
        )
    return path


def check_repository(repo: str | Path, required: Iterable[str] = ()) -> list[Path]:
    """Check a Triton model repository; return its files (sorted, relative to ``repo``).

    Each model is ``<model>/config.pbtxt`` (whose ``name``, if given, is the directory name)
    plus at least one numeric version directory with files in it. Empty files are refused:
    KServe's storage initializer skips zero-byte objects, so they would silently go missing.
    """
    repo = Path(repo)
    if not repo.is_dir():
        raise InvalidInput(f"{repo} is not a directory")
    models = sorted(p for p in repo.iterdir() if p.is_dir())
    if not models:
        raise InvalidInput(f"{repo} holds no model directories")
    for model in models:
        config = model / "config.pbtxt"
        if not config.is_file():
            raise InvalidInput(f"{model} has no config.pbtxt: not a Triton model directory")
        named = _MODEL_NAME.search(config.read_text(errors="replace"))
        if named and named.group(1) != model.name:
            raise InvalidInput(
                f"{config} names the model {named.group(1)!r} but sits in {model.name}/; "
                "Triton requires the two to match"
            )
        versions = [p for p in model.iterdir() if p.is_dir() and p.name.isdigit()]
        if not any(f.is_file() for v in versions for f in v.rglob("*")):
            raise InvalidInput(f"{model} has no numeric version directory with files (e.g. 1/)")
    missing = sorted(set(required) - {m.name for m in models})
    if missing:
        raise InvalidInput(f"{repo} lacks the model(s) {', '.join(missing)}")
    files = sorted(p.relative_to(repo) for p in repo.rglob("*") if p.is_file())
    empty = [str(f) for f in files if (repo / f).stat().st_size == 0]
    if empty:
        raise InvalidInput(
            f"empty file(s) in {repo}: {', '.join(empty)}; KServe's storage initializer "
            "skips zero-byte objects, so they would be missing on the server"
        )
    return files


def _clean_prefix(prefix: str) -> str:
    cleaned = prefix.strip("/")
    if cleaned.startswith("s3:"):
        raise InvalidInput(f"--prefix {prefix!r}: give the key prefix only, not an s3:// URI")
    parts = cleaned.split("/") if cleaned else []
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidInput(f"--prefix {prefix!r}: empty, '.' or '..' path components")
    return cleaned


def _check_bucket(bucket: str) -> str:
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise InvalidInput(
            f"invalid bucket name {bucket!r}: 3-63 characters, lower-case letters, digits, "
            "'.' and '-'"
        )
    return bucket


def _repo_key_prefix(prefix: str, variant: str) -> str:
    return "/".join(p for p in (_clean_prefix(prefix), f"model_repository_{variant}") if p)


def storage_uri(bucket: str, prefix: str, variant: str) -> str:
    """``s3://<bucket>/<prefix>/model_repository_<variant>``: the InferenceServices' storageUri."""
    return f"s3://{_check_bucket(bucket)}/{_repo_key_prefix(prefix, _check_variant(variant))}"


# ------------------------------------------------------------------------------ S3


def _redact(url: str | None) -> str:
    """An endpoint URL without any user:password part, for messages."""
    if not url:
        return "the default AWS endpoint"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _redact_text(text: str) -> str:
    """``text`` with the ``user:password@`` part of any URL in it removed."""
    return re.sub(r"([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s\"']+@", r"\1", text)


def make_s3_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    max_attempts: int = 5,
):
    """A boto3 S3 client with explicit timeouts and bounded (standard-mode) retries.

    Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles). With an ``endpoint_url``
    (MinIO, Ceph, moto) path-style addressing is used, which every S3 server understands.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": max_attempts, "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint_url else {},
    )
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def _s3_error(err: Exception, action: str, bucket: str, endpoint: str | None) -> DeployError:
    from botocore.exceptions import ClientError, NoCredentialsError

    where = f"bucket {bucket!r} at {_redact(endpoint)}"
    if isinstance(err, NoCredentialsError):
        return DeployError(
            f"{action} {where}: no S3 credentials; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        )
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        if code in ("NoSuchBucket", "404") or (status == 404 and "Bucket" in str(code)):
            return DeployError(f"{action} {where}: the bucket does not exist")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            return DeployError(f"{action} {where}: access denied ({code}); check the credentials")
        return DeployError(f"{action} {where}: S3 error {code or 'unknown'} (HTTP {status})")
    return DeployError(f"{action} {where}: {type(err).__name__}: {_redact_text(str(err))}")


def _list_keys(client, bucket: str, key_prefix: str) -> dict[str, int]:
    keys: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
        for obj in page.get("Contents", []):
            keys[obj["Key"]] = obj["Size"]
    return keys


def upload_repository(
    repo: str | Path,
    bucket: str,
    prefix: str,
    variant: str,
    *,
    client=None,
    endpoint_url: str | None = None,
    region: str | None = None,
    delete_stale: bool = True,
    required_models: Iterable[str] | None = None,
) -> str:
    """Upload a Triton model repository directory; return its ``storageUri``.

    ``<repo>/<rel>`` goes to ``s3://<bucket>/<prefix>/model_repository_<variant>/<rel>``.
    With ``delete_stale``, objects under that prefix which the directory does not have are
    deleted after the upload, so a model removed from the export does not linger on the
    server. Only keys under ``.../model_repository_<variant>/`` are touched, never a sibling
    prefix. Finally the keys are listed and compared with the directory (names and sizes).
    """
    from boto3.exceptions import Boto3Error
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    repo = Path(repo)
    required = (
        [m for s in SERVICES for m in s.models] if required_models is None else required_models
    )
    files = check_repository(repo, required)
    uri = storage_uri(bucket, prefix, variant)
    key_prefix = _repo_key_prefix(prefix, variant) + "/"
    if client is None:
        client = make_s3_client(endpoint_url, region)
    endpoint = endpoint_url or getattr(getattr(client, "meta", None), "endpoint_url", None)
    wanted = {key_prefix + f.as_posix(): (repo / f) for f in files}
    transfer = TransferConfig(multipart_threshold=64 * 1024 * 1024, max_concurrency=4)
    try:
        client.head_bucket(Bucket=bucket)
        for key, path in wanted.items():
            log.info("uploading %s -> s3://%s/%s", path, bucket, key)
            client.upload_file(str(path), bucket, key, Config=transfer)
        if delete_stale:  # after the upload: a failed run leaves a superset, never a gap
            stale = sorted(set(_list_keys(client, bucket, key_prefix)) - set(wanted))
            for start in range(0, len(stale), 1000):
                batch = [{"Key": k} for k in stale[start : start + 1000]]
                out = client.delete_objects(Bucket=bucket, Delete={"Objects": batch})
                if out.get("Errors"):
                    first = out["Errors"][0]
                    raise DeployError(
                        f"cannot delete stale s3://{bucket}/{first.get('Key')}: "
                        f"{first.get('Code')} {first.get('Message', '')}".strip()
                    )
            for key in stale:
                log.info("deleted stale s3://%s/%s", bucket, key)
        listed = _list_keys(client, bucket, key_prefix)
    except (ClientError, BotoCoreError, Boto3Error) as err:
        cause = err
        if isinstance(err, Boto3Error) and isinstance(err.__context__, ClientError | BotoCoreError):
            cause = err.__context__  # S3UploadFailedError wraps the ClientError
        raise _s3_error(cause, "upload to", bucket, endpoint) from err
    got = {k: listed.get(k) for k in wanted}
    bad = [k for k, p in wanted.items() if got[k] != p.stat().st_size]
    extra = sorted(set(listed) - set(wanted)) if delete_stale else []
    if bad or extra:
        raise DeployError(
            f"after uploading to {uri} the bucket does not match {repo}: "
            f"{len(bad)} missing or wrong-sized object(s) {bad[:3]}, "
            f"{len(extra)} unexpected object(s) {extra[:3]}"
        )
    log.info("uploaded %d files to %s", len(wanted), uri)
    return uri


# ------------------------------------------------------------------------------ KServe objects


def build_inference_services(
    variant: str,
    uri: str,
    namespace: str = NAMESPACE,
    runtime_version: str = RUNTIME_VERSION,
    service_account: str = SERVICE_ACCOUNT,
) -> list:
    """Typed ``V1beta1InferenceService`` objects for the encoder and the decoders.

    They are the objects of ``k8s/overlays/<variant>`` with ``storageUri`` set to ``uri``:
    Triton runtime, protocol v2, only this service's models loaded (explicit model control),
    readiness on Triton's ``/v2/health/ready``, non-root security contexts, the variant's
    resources and Knative concurrency autoscaling.
    """
    import kserve
    from kubernetes import client as k8s

    _check_variant(variant)
    if not uri.startswith("s3://"):
        raise InvalidInput(f"storageUri {uri!r}: expected s3://<bucket>/<prefix>/...")

    def probe(path: str, **timing) -> k8s.V1Probe:
        action = k8s.V1HTTPGetAction(path=path, port=TRITON_HTTP_PORT)
        return k8s.V1Probe(http_get=action, **timing)

    services = []
    for svc in SERVICES:
        size = svc.sizing[variant]
        gpu = variant == "gpu"
        model = kserve.V1beta1ModelSpec(
            name=None,  # the SDK's default "" would be sent; KServe names it kserve-container
            model_format=kserve.V1beta1ModelFormat(name="triton"),
            runtime=RUNTIME,
            runtime_version=runtime_version,
            protocol_version="v2",
            storage_uri=uri,
            args=svc.args(),
            readiness_probe=probe(
                "/v2/health/ready", period_seconds=10, timeout_seconds=5, failure_threshold=3
            ),
            liveness_probe=probe(
                "/v2/health/live",
                initial_delay_seconds=30,
                period_seconds=15,
                timeout_seconds=5,
                failure_threshold=40,
            ),
            resources=k8s.V1ResourceRequirements(
                requests=dict(size.requests), limits=dict(size.limits)
            ),
            security_context=k8s.V1SecurityContext(
                run_as_non_root=True,
                run_as_user=1000,
                allow_privilege_escalation=False,
                privileged=False,
                capabilities=k8s.V1Capabilities(drop=["ALL"]),
                seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
            ),
            volume_mounts=(
                [k8s.V1VolumeMount(name="trt-cache", mount_path=TRT_CACHE_PATH)] if gpu else None
            ),
        )
        predictor = kserve.V1beta1PredictorSpec(
            service_account_name=service_account,
            min_replicas=size.min_replicas,
            max_replicas=size.max_replicas,
            scale_metric="concurrency",
            scale_target=size.scale_target,
            security_context=k8s.V1PodSecurityContext(
                run_as_non_root=True,
                run_as_user=1000,
                run_as_group=1000,
                fs_group=1000,
                seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
            ),
            tolerations=(
                [k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
                if gpu
                else None
            ),
            volumes=(
                [
                    k8s.V1Volume(
                        name="trt-cache", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="8Gi")
                    )
                ]
                if gpu
                else None
            ),
            model=model,
        )
        services.append(
            kserve.V1beta1InferenceService(
                api_version=f"{_GROUP}/{_VERSION}",
                kind="InferenceService",
                metadata=k8s.V1ObjectMeta(
                    name=svc.name,
                    namespace=namespace,
                    labels={
                        **COMMON_LABELS,
                        "app.kubernetes.io/component": svc.component,
                        VARIANT_LABEL: variant,
                    },
                    annotations={"serving.kserve.io/deploymentMode": DEPLOYMENT_MODE},
                ),
                spec=kserve.V1beta1InferenceServiceSpec(predictor=predictor),
            )
        )
    return services


def to_manifest(obj) -> dict:
    """The JSON form the API server receives (camelCase keys, no None fields)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


# ------------------------------------------------------------------------------ apply and wait


def make_kserve_client(kubeconfig: str | None = None, context: str | None = None):
    """A ``KServeClient`` from a kubeconfig (default ``~/.kube/config``) or in-cluster config."""
    from kserve import KServeClient
    from kubernetes.config.config_exception import ConfigException

    try:
        return KServeClient(config_file=kubeconfig, context=context)
    except (ConfigException, OSError) as err:
        where = kubeconfig or "KUBECONFIG / ~/.kube/config"
        raise DeployError(
            f"no usable Kubernetes configuration in {where} ({err}); pass --kubeconfig / "
            "--context or set KUBECONFIG"
        ) from err


def _api_message(err: Exception) -> str:
    """The API server's own message out of a kubernetes ApiException (or its text)."""
    text = str(err)
    found = re.search(r'"message"\s*:\s*"((?:[^"\\]|\\.)*)"', text)
    if found:
        try:
            return json.loads(f'"{found.group(1)}"')
        except ValueError:
            return found.group(1)
    reason = re.search(r"Reason: ([^\n]*)", text)
    return reason.group(1) if reason else text.strip().splitlines()[0][:300]


def _check_service_account(kclient, namespace: str, service_account: str) -> None:
    from kubernetes.client.rest import ApiException

    try:
        kclient.core_api.read_namespaced_service_account(service_account, namespace)
    except ApiException as err:
        if err.status == 404:
            raise DeployError(
                f"ServiceAccount {namespace}/{service_account} not found: apply "
                "`kubectl apply -k k8s/overlays/<variant>` first (it creates the namespace, "
                "the ServiceAccount and the S3 Secret; see k8s/README.md)"
            ) from err
        raise DeployError(
            f"cannot read ServiceAccount {namespace}/{service_account}: "
            f"HTTP {err.status} {_api_message(err)}"
        ) from err


def apply_inference_services(
    kclient, isvcs: Sequence, namespace: str = NAMESPACE, check_service_account: bool = True
) -> dict[str, int]:
    """Create each InferenceService, or replace it if it exists; return name -> generation."""
    from kubernetes.client.rest import ApiException

    if check_service_account:
        names = {i.spec.predictor.service_account_name for i in isvcs}
        for sa in sorted(n for n in names if n):
            _check_service_account(kclient, namespace, sa)
    generations = {}
    for isvc in isvcs:
        name = isvc.metadata.name
        isvc.metadata.namespace = namespace
        try:
            current = kclient.api_instance.get_namespaced_custom_object(
                _GROUP, _VERSION, namespace, _PLURAL, name
            )
        except ApiException as err:
            if err.status != 404:
                raise DeployError(
                    f"cannot read InferenceService {namespace}/{name}: HTTP {err.status} "
                    f"{_api_message(err)}"
                ) from err
            current = None
        action = "create" if current is None else "replace"
        try:
            if current is None:
                out = kclient.create(isvc, namespace=namespace)
            else:
                isvc.metadata.resource_version = current["metadata"]["resourceVersion"]
                out = kclient.replace(name, isvc, namespace=namespace)
        except (RuntimeError, ApiException) as err:
            raise DeployError(
                f"cannot {action} InferenceService {namespace}/{name}: {_api_message(err)}"
            ) from err
        generations[name] = int((out or {}).get("metadata", {}).get("generation") or 1)
        log.info("%sd InferenceService %s/%s", action, namespace, name)
    return generations


def _describe(status: dict | None) -> str:
    conditions = (status or {}).get("conditions") or []
    if not conditions:
        return "no conditions reported yet (is the KServe controller running?)"
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    parts = []
    for cond in [ready] + [c for c in conditions if c is not ready and c.get("status") != "True"]:
        if cond is None:
            continue
        text = f"{cond.get('type')}={cond.get('status')}"
        detail = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
        parts.append(f"{text} ({detail})" if detail else text)
    return "; ".join(parts)


def wait_ready(
    kclient,
    names: Sequence[str],
    namespace: str = NAMESPACE,
    timeout: float = 600.0,
    poll: float = 5.0,
    generations: dict[str, int] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, str | None]:
    """Wait until every named InferenceService is Ready; return name -> URL.

    Ready means KServe's ``Ready`` condition is True and, when ``generations`` is given,
    ``status.observedGeneration`` has reached the applied generation (so an old Ready from
    before a replace does not count). On timeout raises :class:`DeployTimeout` naming each
    service still not ready and its last conditions.
    """
    deadline = clock() + timeout
    pending = list(names)
    last: dict[str, dict | None] = {}
    urls: dict[str, str | None] = {}
    while True:
        for name in list(pending):
            try:
                obj = kclient.get(name, namespace=namespace)
            except RuntimeError as err:
                raise DeployError(
                    f"cannot read InferenceService {namespace}/{name}: {_api_message(err)}"
                ) from err
            status = obj.get("status") or {}
            last[name] = status
            ready = any(
                c.get("type") == "Ready" and str(c.get("status")).lower() == "true"
                for c in status.get("conditions") or []
            )
            wanted = (generations or {}).get(name)
            current = wanted is None or int(status.get("observedGeneration") or 0) >= wanted
            if ready and current:
                urls[name] = status.get("url")
                pending.remove(name)
                log.info("InferenceService %s/%s is ready at %s", namespace, name, urls[name])
        if not pending:
            return urls
        now = clock()
        if now >= deadline:
            detail = " | ".join(
                f"InferenceService {namespace}/{n}: last condition {_describe(last.get(n))}"
                for n in pending
            )
            raise DeployTimeout(
                f"not ready after {timeout:g} s: {detail} (inspect with `kubectl -n "
                f"{namespace} describe inferenceservice {pending[0]}`)"
            )
        sleep(max(0.0, min(poll, deadline - now)))


# ------------------------------------------------------------------------------ CLI


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``deploy`` subcommand on an ``add_subparsers()`` object."""
    s = subparsers.add_parser(
        "deploy",
        help="upload a Triton repository to S3 and deploy it on KServe",
        description=__doc__.splitlines()[0],
    )
    s.add_argument("--model-dir", required=True, help="directory written by `nec-serve export`")
    s.add_argument("--variant", choices=VARIANTS, required=True, help="which repository")
    s.add_argument("--bucket", required=True, help="S3 bucket (must exist)")
    s.add_argument("--prefix", default="", help="key prefix inside the bucket, e.g. nec/v1")
    s.add_argument("--endpoint-url", help="S3 endpoint (MinIO, Ceph, ...); default AWS")
    s.add_argument("--region", help="S3 region (default: boto3's, e.g. AWS_DEFAULT_REGION)")
    s.add_argument("--namespace", default=NAMESPACE, help="namespace of the InferenceServices")
    s.add_argument("--upload-only", action="store_true", help="upload, print storageUri, stop")
    s.add_argument(
        "--keep-stale",
        action="store_true",
        help="keep objects under the prefix that the repository does not have",
    )
    s.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for Ready")
    s.add_argument("--runtime-version", default=RUNTIME_VERSION, help="Triton image tag")
    s.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG / ~/.kube/config)")
    s.add_argument("--context", help="kubeconfig context")
    s.set_defaults(func=cmd_deploy)
    return s


def cmd_deploy(args: argparse.Namespace) -> int:
    """Run ``nec-serve deploy``: upload, then (unless --upload-only) apply and wait."""
    try:
        repo = repository_dir(args.model_dir, args.variant)
        uri = storage_uri(args.bucket, args.prefix, args.variant)
        kclient = isvcs = None
        if not args.upload_only:
            # Fail on a missing kubeconfig or ServiceAccount before a long upload, not after.
            isvcs = build_inference_services(
                args.variant, uri, args.namespace, runtime_version=args.runtime_version
            )
            kclient = make_kserve_client(args.kubeconfig, args.context)
            _check_service_account(kclient, args.namespace, SERVICE_ACCOUNT)
        upload_repository(
            repo,
            args.bucket,
            args.prefix,
            args.variant,
            endpoint_url=args.endpoint_url,
            region=args.region,
            delete_stale=not args.keep_stale,
        )
        print(f"uploaded {repo} -> {uri}")
        if args.upload_only:
            return 0
        generations = apply_inference_services(
            kclient, isvcs, args.namespace, check_service_account=False
        )
        urls = wait_ready(
            kclient, list(generations), args.namespace, args.timeout, generations=generations
        )
    except NecError as err:
        print(f"nec-serve deploy: error: {err}", file=sys.stderr)
        return 2
    for name, url in urls.items():
        print(f"ready: {args.namespace}/{name} {url or ''}".rstrip())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nec_serve.deploy``: the ``deploy`` subcommand on its own."""
    parser = argparse.ArgumentParser(prog="nec-serve")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("botocore").setLevel(logging.WARNING)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
