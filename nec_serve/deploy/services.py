"""Each family's InferenceServices, their sizing per variant, and their typed ``kserve`` objects.

Every registered family gets ``<family>-encoder``, loading its encoder graph, and
``<family>-decoder``, loading its decoding graphs (:func:`family_services`), sized by
:data:`SIZING`. :func:`build_inference_services` builds the objects; ``k8s/overlays/<variant>``
holds them as generated YAML (``nec_serve.deploy.render``, ``scripts/render_k8s.py``; a test
fails when the committed files differ from what the table generates).

``kserve`` and ``kubernetes`` are imported inside the functions: ``kserve`` and
``tritonclient.grpc`` register the same protobuf symbols and cannot live in one process
(kserve issue #3099).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from nec_serve.contract import GraphRole, Manifest, ModelFamily, model_families
from nec_serve.errors import InvalidInput

__all__ = [
    "Sizing",
    "Service",
    "SIZING",
    "VARIANTS",
    "NAMESPACE",
    "SERVICE_ACCOUNT",
    "RUNTIME",
    "RUNTIME_VERSION",
    "TRITON_HTTP_PORT",
    "GROUP",
    "VERSION",
    "PLURAL",
    "check_variant",
    "build_inference_services",
    "family_services",
    "services_for",
    "to_manifest",
]

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
GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"


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
# The sizing table, by component and variant: every family's encoder and decoder get these.
# k8s/overlays/<variant>/inferenceservices.yaml is generated from it (scripts/render_k8s.py).
SIZING: dict[str, dict[str, Sizing]] = {
    "encoder": {
        "gpu": _GPU,
        "cpu": Sizing(
            requests={"cpu": "4", "memory": "4Gi"},
            limits={"cpu": "4", "memory": "8Gi"},
            min_replicas=1,
            max_replicas=8,
            scale_target=2,
        ),
    },
    "decoder": {
        "gpu": _GPU,
        "cpu": Sizing(
            requests={"cpu": "2", "memory": "2Gi"},
            limits={"cpu": "2", "memory": "4Gi"},
            min_replicas=1,
            max_replicas=8,
            # perf_analyzer on 2 cores: the decoder's throughput still grew up to 4 in flight.
            scale_target=4,
        ),
    },
}


def family_services(
    family: ModelFamily, roles: Iterable[GraphRole] | None = None
) -> tuple[Service, ...]:
    """A family's InferenceServices: ``<family>-encoder`` and ``<family>-decoder``.

    The decoder loads the Triton models of the decoding ``roles`` (default: the family's
    ``default_roles``, else all its roles); without any, there is no decoder service.
    """
    roles = tuple(roles if roles is not None else family.default_roles or family.graph_names)
    decoding = tuple(family.graph_name(r) for r in roles if r != GraphRole.ENCODER)
    out = [
        Service(
            f"{family.name}-encoder",
            "encoder",
            (family.graph_name(GraphRole.ENCODER),),
            SIZING["encoder"],
        )
    ]
    if decoding:
        out.append(Service(f"{family.name}-decoder", "decoder", decoding, SIZING["decoder"]))
    return tuple(out)


def services_for(manifest: Manifest | None) -> tuple[Service, ...]:
    """The InferenceServices an export needs, or without one those ``k8s/`` applies.

    With a manifest, its family's (:func:`family_services`), the decoder loading exactly the
    decoding graphs the export has (a NEC classifier export: ``nec_decoder`` and
    ``nec_classifier``). Without one, every registered family's default services, in
    registration order.
    """
    if manifest is None:
        return tuple(s for f in model_families() for s in family_services(f))
    return family_services(manifest.family_spec, manifest.graphs)


def check_variant(variant: str) -> str:
    """``variant`` if it is one of :data:`VARIANTS`, else :class:`InvalidInput` naming it."""
    if variant not in VARIANTS:
        raise InvalidInput(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    return variant


def build_inference_services(
    variant: str,
    uri: str,
    namespace: str = NAMESPACE,
    runtime_version: str = RUNTIME_VERSION,
    service_account: str = SERVICE_ACCOUNT,
    manifest: Manifest | None = None,
) -> list:
    """Typed ``V1beta1InferenceService`` objects for the encoder and the decoders.

    ``manifest`` (the export's) picks the services and the models they load
    (:func:`services_for`); without it, every registered family's default services.

    They are the objects of ``k8s/overlays/<variant>`` with ``storageUri`` set to ``uri``:
    Triton runtime, protocol v2, only this service's models loaded (explicit model control),
    readiness on Triton's ``/v2/health/ready``, non-root security contexts, the variant's
    resources and Knative concurrency autoscaling.
    """
    import kserve  # here, not at module level: kserve issue #3099 (see the docstring)
    from kubernetes import client as k8s

    check_variant(variant)
    if not uri.startswith("s3://"):
        raise InvalidInput(f"storageUri {uri!r}: expected s3://<bucket>/<prefix>/...")
    services = []
    for svc in services_for(manifest):
        model = _model_spec(svc, variant, uri, runtime_version)
        predictor = _predictor_spec(svc, variant, service_account, model)
        services.append(
            kserve.V1beta1InferenceService(
                api_version=f"{GROUP}/{VERSION}",
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


def _probe(path: str, **timing):
    from kubernetes import client as k8s

    return k8s.V1Probe(http_get=k8s.V1HTTPGetAction(path=path, port=TRITON_HTTP_PORT), **timing)


def _model_spec(svc: Service, variant: str, uri: str, runtime_version: str):
    """The Triton container of one service: its models, probes, resources, security."""
    import kserve
    from kubernetes import client as k8s

    size = svc.sizing[variant]
    return kserve.V1beta1ModelSpec(
        name=None,  # the SDK's default "" would be sent; KServe names it kserve-container
        model_format=kserve.V1beta1ModelFormat(name="triton"),
        runtime=RUNTIME,
        runtime_version=runtime_version,
        protocol_version="v2",
        storage_uri=uri,
        args=svc.args(),
        readiness_probe=_probe(
            "/v2/health/ready", period_seconds=10, timeout_seconds=5, failure_threshold=3
        ),
        liveness_probe=_probe(
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
            [k8s.V1VolumeMount(name="trt-cache", mount_path=TRT_CACHE_PATH)]
            if variant == "gpu"
            else None
        ),
    )


def _predictor_spec(svc: Service, variant: str, service_account: str, model):
    """The predictor around ``model``: scaling, pod security, the GPU's toleration."""
    import kserve
    from kubernetes import client as k8s

    size, gpu = svc.sizing[variant], variant == "gpu"
    cache = k8s.V1Volume(name="trt-cache", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="8Gi"))
    toleration = k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    return kserve.V1beta1PredictorSpec(
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
        tolerations=[toleration] if gpu else None,
        volumes=[cache] if gpu else None,
        model=model,
    )


def to_manifest(obj) -> dict:
    """The JSON form the API server receives (camelCase keys, no None fields)."""
    from kubernetes.client import ApiClient  # optional dependency, as kserve

    return ApiClient().sanitize_for_serialization(obj)
