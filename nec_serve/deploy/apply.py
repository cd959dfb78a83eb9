"""Apply the InferenceServices with ``KServeClient`` and wait until KServe reports them Ready.

:func:`apply_inference_services` creates each service, or replaces it if it exists;
:func:`wait_ready` waits for KServe's ``Ready`` condition at the applied generation, or
fails naming each service still not ready and its last condition. The namespace, the
ServiceAccount and the S3 Secret come from ``kubectl apply -k k8s/overlays/<variant>``
(see k8s/README.md); :func:`require_service_account` says so when they are missing.

``kserve`` and ``kubernetes`` are imported inside the functions: ``kserve`` and
``tritonclient.grpc`` register the same protobuf symbols and cannot live in one process
(kserve issue #3099).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence

from nec_serve.deploy.errors import DeployError, DeployTimeout
from nec_serve.deploy.services import GROUP, NAMESPACE, PLURAL, VERSION

__all__ = [
    "make_kserve_client",
    "require_service_account",
    "apply_inference_services",
    "wait_ready",
]

log = logging.getLogger(__name__)


def make_kserve_client(kubeconfig: str | None = None, context: str | None = None):
    """A ``KServeClient`` from a kubeconfig (default ``~/.kube/config``) or in-cluster config."""
    from kserve import KServeClient  # here, not at module level: kserve issue #3099
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


def require_service_account(kclient, namespace: str, service_account: str) -> None:
    """Fail unless ``namespace/service_account`` exists, saying how to create it."""
    # kubernetes on use: an optional (extra) and heavy dependency
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
    # kubernetes on use: an optional (extra) and heavy dependency
    from kubernetes.client.rest import ApiException

    if check_service_account:
        names = {i.spec.predictor.service_account_name for i in isvcs}
        for sa in sorted(n for n in names if n):
            require_service_account(kclient, namespace, sa)
    generations = {}
    for isvc in isvcs:
        name = isvc.metadata.name
        isvc.metadata.namespace = namespace
        try:
            current = kclient.api_instance.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name
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
