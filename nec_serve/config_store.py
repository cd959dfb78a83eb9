"""Where the controller keeps each workflow's config and the wrapper finds it.

The config is split in two: everything but the credentials (redacted, fine to read and
log), and the credentials alone. Locally the parts are a JSON file and a ``0600`` file
beside it; on Kubernetes a ConfigMap and a Secret named after the workflow's input topic
(the name the KafkaSource's sink URI carries, as EO4EU's controller does). The platform's
message puts credentials in its config; they never reach a ConfigMap or a log here.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Protocol

from nec_serve.errors import InvalidInput
from nec_serve.messages import SECRET_FIELDS, WorkflowConfig, parse_workflow, redacted

__all__ = ["ConfigStore", "LocalConfigStore", "KubernetesConfigStore", "UnknownWorkflow"]


class UnknownWorkflow(InvalidInput):
    """No config is stored under the requested name."""

    failure = "unknown_workflow"


def _split(config: WorkflowConfig) -> tuple[dict, dict]:
    secret = {k: config.raw["S3_bucket"][k] for k in SECRET_FIELDS}
    return redacted(config.raw), secret


def _join(public: dict, secret: dict) -> WorkflowConfig:
    merged = json.loads(json.dumps(public))
    merged.setdefault("S3_bucket", {}).update(secret)
    return parse_workflow(merged)


class ConfigStore(Protocol):
    """Stores workflow configs by name."""

    def put(self, config: WorkflowConfig) -> bool:
        """Store; returns False when the same config was already stored (idempotent)."""

    def get(self, name: str) -> WorkflowConfig:
        """The config stored under ``name``; :class:`UnknownWorkflow` if none."""

    def delete(self, name: str) -> bool:
        """Remove; returns False when nothing was stored."""

    def names(self) -> list[str]:
        """All stored names."""


class LocalConfigStore:
    """A directory: ``<name>.json`` (redacted) and ``<name>.secret.json`` (mode 0600)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _paths(self, name: str) -> tuple[Path, Path]:
        if not name or "/" in name or name.startswith("."):
            raise UnknownWorkflow(f"invalid workflow config name {name!r}")
        return self.root / f"{name}.json", self.root / f"{name}.secret.json"

    def put(self, config: WorkflowConfig) -> bool:
        """Write both parts atomically; unchanged content is not rewritten."""
        public, secret = _split(config)
        pub_path, sec_path = self._paths(config.source_name)
        if pub_path.exists() and sec_path.exists():
            try:
                if (
                    _join(json.loads(pub_path.read_text()), json.loads(sec_path.read_text()))
                    == config
                ):
                    return False
            except (ValueError, InvalidInput):
                pass  # a damaged entry is replaced below
        tmp = sec_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(secret, f)
        os.replace(tmp, sec_path)
        tmp = pub_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(public, indent=1, sort_keys=True))
        os.replace(tmp, pub_path)
        return True

    def get(self, name: str) -> WorkflowConfig:
        """Read both parts back into a validated config."""
        pub_path, sec_path = self._paths(name)
        try:
            return _join(json.loads(pub_path.read_text()), json.loads(sec_path.read_text()))
        except FileNotFoundError as err:
            raise UnknownWorkflow(
                f"no workflow config {name!r} (is the workflow published?)"
            ) from err

    def delete(self, name: str) -> bool:
        """Remove both parts."""
        found = False
        for path in self._paths(name):
            if path.exists():
                path.unlink()
                found = True
        return found

    def names(self) -> list[str]:
        """Names with both parts present."""
        return sorted(
            p.name[: -len(".json")]
            for p in self.root.glob("*.json")
            if not p.name.endswith(".secret.json")
            and (self.root / (p.name[: -len(".json")] + ".secret.json")).exists()
        )


class KubernetesConfigStore:
    """A ConfigMap (redacted config) and a Secret (credentials) per workflow."""

    def __init__(self, namespace: str, core_api=None):
        if core_api is None:
            from kubernetes import client, config  # heavy; Kubernetes mode only

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            core_api = client.CoreV1Api()
        self.api = core_api
        self.namespace = namespace

    @staticmethod
    def objects(config: WorkflowConfig, namespace: str) -> tuple[dict, dict]:
        """The ConfigMap and Secret manifests for ``config`` (pure; also used in tests)."""
        public, secret = _split(config)
        labels = {
            "app.kubernetes.io/managed-by": "nec-controller",
            "nec/workflow": config.source_name,
        }
        meta = {"name": config.source_name, "namespace": namespace, "labels": labels}
        configmap = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta,
            "data": {"workflow.json": json.dumps(public, sort_keys=True)},
        }
        secret_obj = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta,
            "type": "Opaque",
            "stringData": {k.upper(): v for k, v in secret.items()},
        }
        return configmap, secret_obj

    def put(self, config: WorkflowConfig) -> bool:
        """Create or replace both objects."""
        from kubernetes.client.exceptions import ApiException  # heavy; Kubernetes mode only

        cm, sec = self.objects(config, self.namespace)
        for create, replace, body in (
            (self.api.create_namespaced_secret, self.api.replace_namespaced_secret, sec),
            (self.api.create_namespaced_config_map, self.api.replace_namespaced_config_map, cm),
        ):
            try:
                create(self.namespace, body)
            except ApiException as err:
                if err.status != 409:
                    raise
                replace(config.source_name, self.namespace, body)
        return True

    def get(self, name: str) -> WorkflowConfig:
        """Read the ConfigMap and Secret back."""
        from kubernetes.client.exceptions import ApiException  # heavy; Kubernetes mode only

        try:
            cm = self.api.read_namespaced_config_map(name, self.namespace)
            sec = self.api.read_namespaced_secret(name, self.namespace)
        except ApiException as err:
            if err.status == 404:
                raise UnknownWorkflow(f"no workflow config {name!r} in {self.namespace}") from err
            raise
        secret = {k.lower(): base64.b64decode(v).decode() for k, v in (sec.data or {}).items()}
        return _join(json.loads(cm.data["workflow.json"]), secret)

    def delete(self, name: str) -> bool:
        """Delete both objects; missing ones are fine."""
        from kubernetes.client.exceptions import ApiException  # heavy; Kubernetes mode only

        found = False
        for delete in (self.api.delete_namespaced_config_map, self.api.delete_namespaced_secret):
            try:
                delete(name, self.namespace)
                found = True
            except ApiException as err:
                if err.status != 404:
                    raise
        return found

    def names(self) -> list[str]:
        """Names of the ConfigMaps this controller manages."""
        items = self.api.list_namespaced_config_map(
            self.namespace, label_selector="app.kubernetes.io/managed-by=nec-controller"
        ).items
        return sorted(i.metadata.name for i in items)
