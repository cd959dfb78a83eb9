"""Strict validation of Kubernetes objects against pinned, real schemas.

Core kinds (Namespace, ServiceAccount, Secret, Deployment, ...) are checked against the
Kubernetes OpenAPI document (``api/openapi-spec/swagger.json`` of the ``k8s.io/kubernetes``
module), custom resources against the ``openAPIV3Schema`` of their CustomResourceDefinition
(KServe's, from the ``github.com/kserve/kserve`` module; Knative's ``KafkaSource`` from
``knative.dev/eventing-kafka-broker`` and ``Service`` from ``knative.dev/serving``). All come
from ``scripts/fetch_schemas.sh``, which pins them and caches them under ``.cache/``.

"Strict" means what ``kubectl apply --validate=strict`` means, and a little more:

* an unknown field fails. Swagger definitions that list properties get
  ``additionalProperties: false``; in a CRD's structural schema every object without
  ``additionalProperties`` gets it too, unless it carries ``x-kubernetes-preserve-unknown-fields``
  (the API server would prune or reject such fields);
* wrong types fail (a string where an integer is required, and the reverse), with the
  API server's exceptions: ``IntOrString`` accepts both, a ``Quantity`` accepts a number or a
  string in Kubernetes' quantity syntax;
* ``int32`` / ``int64`` ranges, base64 ``byte`` fields (Secret ``data``) and RFC 3339
  ``date-time`` are checked, as are ``x-kubernetes-list-type: set/map`` uniqueness;
* an apiVersion/kind pair that neither schema source defines fails, naming the kinds it knows;
* ``metadata.name`` must be present and a DNS subdomain; a namespaced kind may carry a
  namespace, a cluster-scoped one may not;
* a pod template inside a custom resource whose CRD is labelled
  ``duck.knative.dev/podspecable: "true"`` (Knative's Service) is validated a second time as
  what it is, a core ``PodSpec`` (minus the fields the CRD adds, such as
  ``containerConcurrency``) with ``ObjectMeta``: Knative's CRD schema leaves parts of it open
  (``x-kubernetes-preserve-unknown-fields`` on the pod ``securityContext``, ``affinity``,
  ``tolerations``, some volume sources, ``env[].valueFrom.fieldRef``, the template metadata).

CEL rules (``x-kubernetes-validations``) and admission webhooks are not evaluated (so neither
are Knative's feature-flag field masks, which its webhook applies).

Usage::

    python scripts/k8s_validate.py rendered.yaml [...]      # or - for stdin
    kustomize build k8s/overlays/gpu | python scripts/k8s_validate.py -

Importable: :func:`load_validator` returns a :class:`Validator` whose ``errors(obj)`` lists
every problem of one object as ``"<kind>/<name>: <path>: <message>"`` strings.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / ".cache"
FETCH_SCRIPT = ROOT / "scripts" / "fetch_schemas.sh"

OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
POD_SPEC = "io.k8s.api.core.v1.PodSpec"
PODSPECABLE_LABEL = "duck.knative.dev/podspecable"
INT_OR_STRING = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
# k8s.io/apimachinery/pkg/api/resource: the serialized form of a Quantity.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
QUANTITY = {"anyOf": [{"type": "number"}, {"type": "string", "pattern": QUANTITY_PATTERN}]}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


# ---------------------------------------------------------------------------- fetching


def fetch(cache: Path = DEFAULT_CACHE, timeout: float = 900.0) -> dict:
    """Run ``scripts/fetch_schemas.sh`` (a no-op when the cache is complete); return its manifest.

    The manifest's relative paths are resolved against ``cache``.
    """
    env = None
    if cache != DEFAULT_CACHE:
        import os

        env = dict(os.environ, NEC_CACHE_DIR=str(cache))
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


def kustomize_build(manifest: dict, directory: Path, timeout: float = 120.0) -> list[dict]:
    """Render a kustomization with the pinned kustomize; returns its objects."""
    exe = cache_path(manifest, manifest["kustomize"]["path"])
    proc = subprocess.run(
        [str(exe), "build", str(directory)], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kustomize build {directory} failed: {proc.stderr.strip()}")
    return load_yaml_documents(proc.stdout)


# ---------------------------------------------------------------------------- schemas


def _strict_swagger(node: object) -> object:
    """Close every swagger object that lists its properties (recursively, in place)."""
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for key, value in node.items():
            if key == "properties":
                for prop in value.values():
                    _strict_swagger(prop)
            elif key != "enum":
                _strict_swagger(value)
    elif isinstance(node, list):
        for item in node:
            _strict_swagger(item)
    return node


def _strict_structural(node: object) -> object:
    """Turn a CRD structural schema into a strict JSON schema (recursively, in place)."""
    if isinstance(node, list):
        for item in node:
            _strict_structural(item)
        return node
    if not isinstance(node, dict):
        return node
    for key, value in list(node.items()):
        if key == "properties":
            for prop in value.values():
                _strict_structural(prop)
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            _strict_structural(value)
    _close_structural_node(node)
    return node


def _close_structural_node(node: dict) -> None:
    """Apply the API server's reading of one structural-schema node."""
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        node.pop("type", None)
        node["anyOf"] = copy.deepcopy(INT_OR_STRING["anyOf"])
    is_object = node.get("type") == "object" or "properties" in node
    if (
        is_object
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
        and not node.get("x-kubernetes-embedded-resource")
    ):
        node["additionalProperties"] = False
    if node.get("nullable"):
        inner = {k: v for k, v in node.items() if k != "nullable"}
        node.clear()
        node["anyOf"] = [{"type": "null"}, inner]


def _check_int(bits: int):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def check(value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int):
            return True  # the type keyword reports non-integers
        return lo <= value <= hi

    return check


def _check_byte(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _check_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return "T" in value


FORMATS = jsonschema.FormatChecker(formats=())
FORMATS.checks("int32")(_check_int(32))
FORMATS.checks("int64")(_check_int(64))
FORMATS.checks("byte")(_check_byte)
FORMATS.checks("date-time")(_check_date_time)


def _list_type(validator, list_type, instance, schema):
    """``x-kubernetes-list-type``: ``set`` items and ``map`` keys must be unique."""
    if not isinstance(instance, list):
        return
    if list_type == "set":
        seen = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate entry {item!r} in a set-type list")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                named = ", ".join(f"{k}={item.get(k)!r}" for k in keys)
                yield jsonschema.ValidationError(f"duplicate entry with {named} in a map-type list")
            seen.add(key)


StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type}
)


@dataclass(frozen=True)
class Kind:
    """What is known about one apiVersion/kind."""

    api_version: str
    kind: str
    namespaced: bool
    source: str
    validator: jsonschema.protocols.Validator
    # For podspecable CRDs: the fields of spec.template.spec that are the CRD's own (not PodSpec's).
    pod_template_extra: frozenset[str] | None = None


def _api_version(group: str, version: str) -> str:
    return f"{group}/{version}" if group else version


class Validator:
    """Validates objects against swagger definitions and CRD schemas."""

    def __init__(self, swagger: dict, crds: Iterable[dict], sources: tuple[str, str]):
        defs = copy.deepcopy(swagger["definitions"])
        for name, schema in defs.items():
            if schema.get("format") == "int-or-string":
                defs[name] = copy.deepcopy(INT_OR_STRING)
            elif name == "io.k8s.apimachinery.pkg.api.resource.Quantity":
                defs[name] = copy.deepcopy(QUANTITY)
        _strict_swagger(defs)
        self._defs = defs
        self._pod_spec = StrictValidator(
            {"definitions": defs, "$ref": f"#/definitions/{POD_SPEC}"}, format_checker=FORMATS
        )
        self._object_meta = StrictValidator(
            {"definitions": defs, "$ref": f"#/definitions/{OBJECT_META}"}, format_checker=FORMATS
        )
        self.kinds: dict[tuple[str, str], Kind] = {}
        scopes = _swagger_scopes(swagger)
        swagger_source, crd_source = sources
        for name, schema in defs.items():
            gvks = schema.get("x-kubernetes-group-version-kind") or []
            if len(gvks) != 1 or "properties" not in schema or "kind" not in schema["properties"]:
                continue  # shared types (DeleteOptions, WatchEvent) and lists of kinds
            gvk = gvks[0]
            if gvk["kind"].endswith("List"):
                continue
            key = (_api_version(gvk["group"], gvk["version"]), gvk["kind"])
            root = {"definitions": defs, "$ref": f"#/definitions/{name}"}
            self.kinds[key] = Kind(
                key[0],
                key[1],
                scopes.get(key, True),
                f"{swagger_source} {name}",
                StrictValidator(root, format_checker=FORMATS),
            )
        for crd in crds:
            self.add_crd(crd, crd_source)

    def add_crd(self, crd: dict, source: str) -> None:
        """Register the served versions of a CustomResourceDefinition."""
        spec = crd["spec"]
        kind = spec["names"]["kind"]
        podspecable = (crd["metadata"].get("labels") or {}).get(PODSPECABLE_LABEL) == "true"
        pod_fields = set(self._defs[POD_SPEC]["properties"])
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            extra = None
            if podspecable:
                template = _schema_at(version["schema"]["openAPIV3Schema"], "spec.template.spec")
                extra = frozenset(set(template.get("properties") or {}) - pod_fields)
            schema = _strict_structural(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
            # The API server validates metadata as ObjectMeta whatever the CRD says.
            schema.setdefault("properties", {})["metadata"] = {
                "$ref": f"#/definitions/{OBJECT_META}"
            }
            schema["definitions"] = self._defs
            key = (_api_version(spec["group"], version["name"]), kind)
            self.kinds[key] = Kind(
                key[0],
                kind,
                spec.get("scope", "Namespaced") == "Namespaced",
                f"{source} {crd['metadata']['name']} {version['name']}",
                StrictValidator(schema, format_checker=FORMATS),
                extra,
            )

    def errors(self, obj: object) -> list[str]:
        """Every problem of one object, as ``"<kind>/<name>: <path>: <message>"``."""
        if not isinstance(obj, dict):
            return [f"not a Kubernetes object: {type(obj).__name__}"]
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        label = f"{kind}/{meta.get('name', '?')}"
        known = self.kinds.get((api_version, kind))
        if known is None:
            return [f"{label}: {self._unknown(api_version, kind)}"]
        problems = []
        seen_paths = set()
        for err in sorted(known.validator.iter_errors(obj), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in err.absolute_path) or "(root)"
            seen_paths.add(path)
            problems.append(f"{label}: {path}: {_message(err)}")
        if known.pod_template_extra is not None:
            for path, message in self._pod_template_errors(obj, known.pod_template_extra):
                if path not in seen_paths:  # the CRD schema already said it
                    problems.append(f"{label}: {path}: {message}")
        name = meta.get("name")
        if not name:
            problems.append(f"{label}: metadata.name: required")
        elif isinstance(name, str) and (len(name) > 253 or not DNS_SUBDOMAIN.match(name)):
            problems.append(f"{label}: metadata.name: {name!r} is not a DNS subdomain")
        if not known.namespaced and meta.get("namespace"):
            problems.append(f"{label}: metadata.namespace: {kind} is cluster-scoped")
        return problems

    def _pod_template_errors(self, obj: dict, extra: frozenset[str]) -> Iterator[tuple[str, str]]:
        """``spec.template`` as a core pod template: ObjectMeta + PodSpec (less ``extra``)."""
        spec = obj.get("spec")
        template = spec.get("template") if isinstance(spec, dict) else None
        if not isinstance(template, dict):
            return
        checks = []
        if isinstance(template.get("metadata"), dict):
            checks.append(("spec.template.metadata", self._object_meta, template["metadata"]))
        pod = template.get("spec")
        if isinstance(pod, dict):
            pod = {k: v for k, v in pod.items() if k not in extra}
            containers = pod.get("containers")
            if isinstance(containers, list):
                # Knative names an unnamed container itself ("user-container"); PodSpec needs one.
                pod["containers"] = [
                    dict(c, name=c.get("name") or f"container-{i}") if isinstance(c, dict) else c
                    for i, c in enumerate(containers)
                ]
            checks.append(("spec.template.spec", self._pod_spec, pod))
        for prefix, validator, instance in checks:
            for err in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
                path = ".".join([prefix] + [str(p) for p in err.absolute_path])
                yield path, _message(err)

    def _unknown(self, api_version: object, kind: object) -> str:
        same_kind = sorted(v for v, k in self.kinds if k == kind)
        if same_kind:
            return (
                f"unknown apiVersion {api_version!r} for kind {kind!r} "
                f"(known: {', '.join(same_kind)})"
            )
        same_version = sorted(k for v, k in self.kinds if v == api_version)
        if same_version:
            close = _close(str(kind), same_version)
            hint = f"; did you mean {close}?" if close else ""
            return f"unknown kind {kind!r} in apiVersion {api_version!r}{hint}"
        return f"unknown apiVersion/kind {api_version!r}/{kind!r}: no schema defines it"


def _schema_at(schema: dict, path: str) -> dict:
    """The sub-schema of an object schema at a dotted property path ({} if absent)."""
    for key in path.split("."):
        schema = (schema.get("properties") or {}).get(key) or {}
    return schema


def _close(word: str, candidates: list[str]) -> str:
    import difflib

    lowered = {c.lower(): c for c in candidates}
    if word.lower() in lowered:
        return repr(lowered[word.lower()])
    match = difflib.get_close_matches(word.lower(), list(lowered), n=1)
    return repr(lowered[match[0]]) if match else ""


def _message(err: jsonschema.ValidationError) -> str:
    if err.validator == "additionalProperties" and err.validator_value is False:
        allowed = sorted((err.schema.get("properties") or {}).keys())
        extra = sorted(set(err.instance) - set(allowed)) if isinstance(err.instance, dict) else []
        names = ", ".join(repr(x) for x in extra)
        hints = [_close(x, allowed) for x in extra]
        hint = "; did you mean " + ", ".join(h for h in hints if h) + "?" if any(hints) else ""
        return f"unknown field(s) {names}{hint}"
    if err.validator == "anyOf" and err.context:
        # A form of the right type that failed for a deeper reason says more than a type error.
        best = next((e for e in err.context if e.validator != "type"), err.context[0])
        return best.message + " (and no other allowed form matched)"
    return err.message


def _swagger_scopes(swagger: dict) -> dict[tuple[str, str], bool]:
    """(apiVersion, kind) -> namespaced, from the paths that create each kind."""
    scopes: dict[tuple[str, str], bool] = {}
    for path, ops in swagger.get("paths", {}).items():
        post = ops.get("post") if isinstance(ops, dict) else None
        if not post or "x-kubernetes-group-version-kind" not in post:
            continue
        gvk = post["x-kubernetes-group-version-kind"]
        key = (_api_version(gvk["group"], gvk["version"]), gvk["kind"])
        namespaced = "{namespace}" in path
        scopes[key] = scopes.get(key, False) or namespaced
    return scopes


CRD_SOURCES = ("kserve", "knative_kafka", "knative_serving", "keda", "prometheus_operator")


def load_validator(manifest: dict, extra_crds: Iterable[Path] = ()) -> Validator:
    """A :class:`Validator` over the fetched Kubernetes swagger and the KServe and Knative CRDs
    (+ extra CRD files)."""
    swagger = json.loads(cache_path(manifest, manifest["kubernetes"]["swagger"]).read_text())
    validator = Validator(
        swagger, [], (f"{manifest['kubernetes']['module']}@{manifest['kubernetes']['version']}", "")
    )
    for key in CRD_SOURCES:
        if key not in manifest:
            continue
        entry = manifest[key]
        directory = cache_path(manifest, entry["dir"])
        for name in entry["crds"]:
            for crd in _load_yaml_cached(directory / name):
                validator.add_crd(crd, f"{entry['module']}@{entry['version']}")
    for path in extra_crds:
        for crd in _load_yaml_cached(Path(path)):
            validator.add_crd(crd, str(path))
    return validator


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml_documents(text: str) -> list:
    """The non-empty documents of a YAML stream (libyaml's loader where available)."""
    return [d for d in yaml.load_all(text, Loader=_LOADER) if d is not None]


def _load_yaml_cached(path: Path) -> list:
    """YAML documents of ``path``, through a JSON copy beside it (a 2 MB CRD parses in ~1 s;
    its JSON copy in ~0.05 s). The copy is rewritten whenever the YAML changes."""
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    cached = path.with_name(path.name + ".json")
    try:
        data = json.loads(cached.read_text())
        if data.get("stamp") == stamp:
            return data["documents"]
    except (OSError, ValueError):
        pass
    docs = load_yaml_documents(path.read_text())
    try:
        tmp = cached.with_name(cached.name + ".tmp")
        tmp.write_text(json.dumps({"stamp": stamp, "documents": docs}))
        tmp.replace(cached)
    except OSError:
        pass  # a read-only location: parse again next time
    return docs


def iter_documents(paths: Iterable[str]) -> Iterator[tuple[str, object]]:
    """(source, object) for every YAML document of the given files (``-`` is stdin)."""
    for path in paths:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        for i, doc in enumerate(load_yaml_documents(text)):
            yield f"{path}#{i}", doc


def main(argv: list[str] | None = None) -> int:
    """Validate the objects of YAML files; print problems; exit 1 if there are any."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="YAML files, - for stdin")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--crd", type=Path, action="append", default=[], help="extra CRD files")
    args = parser.parse_args(argv)
    validator = load_validator(fetch(args.cache), args.crd)
    bad = 0
    count = 0
    for source, doc in iter_documents(args.files):
        count += 1
        for problem in validator.errors(doc):
            bad += 1
            print(f"{source}: {problem}")
    print(f"{count} objects, {bad} problems", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
