"""Deploy NEC on KServe + NVIDIA Triton: upload a model repository, apply the InferenceServices.

One module per stage, each usable on its own:

1. :mod:`~nec_serve.deploy.repository`: :func:`upload_repository` copies
   ``<export>/model_repository_<variant>/`` to
   ``s3://<bucket>/<prefix>/model_repository_<variant>/`` (client and error mapping from
   :mod:`nec_serve.s3`), in the layout KServe's storage initializer downloads to
   ``/mnt/models`` and Triton reads; the prefix mirrors the directory.
2. :mod:`~nec_serve.deploy.services`: :func:`build_inference_services` builds typed
   ``kserve`` SDK objects for a family's ``<family>-encoder`` and ``<family>-decoder``, sized
   per variant by one table; :mod:`~nec_serve.deploy.render` writes every registered
   family's objects as ``k8s/overlays/<variant>`` YAML (what ``kubectl apply -k`` creates).
3. :mod:`~nec_serve.deploy.apply`: :func:`apply_inference_services` creates or replaces them
   with ``KServeClient`` and :func:`wait_ready` waits until KServe reports them Ready, or
   fails naming the service and its last condition.

:mod:`~nec_serve.deploy.command` is the ``nec-serve deploy`` subcommand over the three.

The namespace, the ServiceAccount ``nec-models`` and the S3 Secret are not created here: they
come from ``kubectl apply -k k8s/overlays/<variant>`` (see k8s/README.md), which also holds
the credentials the pods download with. This package uses whatever credentials boto3 and the
kubeconfig provide and never logs or prints them.

``kserve`` is imported only inside functions: it and ``tritonclient.grpc`` register the same
protobuf symbols and cannot live in one process (kserve issue #3099). Importing this package
imports neither, nor ``kubernetes`` or ``boto3``.
"""

from nec_serve.deploy.apply import apply_inference_services, make_kserve_client, wait_ready
from nec_serve.deploy.command import add_parser, cmd_deploy, main
from nec_serve.deploy.errors import DeployError, DeployTimeout
from nec_serve.deploy.repository import (
    check_repository,
    repository_dir,
    storage_uri,
    upload_repository,
)
from nec_serve.deploy.services import (
    NAMESPACE,
    RUNTIME,
    RUNTIME_VERSION,
    SERVICE_ACCOUNT,
    SIZING,
    TRITON_HTTP_PORT,
    VARIANTS,
    Service,
    Sizing,
    build_inference_services,
    family_services,
    services_for,
    to_manifest,
)

__all__ = [
    "DeployError",
    "DeployTimeout",
    "Sizing",
    "Service",
    "SIZING",
    "VARIANTS",
    "NAMESPACE",
    "SERVICE_ACCOUNT",
    "RUNTIME",
    "RUNTIME_VERSION",
    "TRITON_HTTP_PORT",
    "repository_dir",
    "check_repository",
    "storage_uri",
    "upload_repository",
    "build_inference_services",
    "family_services",
    "services_for",
    "to_manifest",
    "make_kserve_client",
    "apply_inference_services",
    "wait_ready",
    "add_parser",
    "cmd_deploy",
    "main",
]
