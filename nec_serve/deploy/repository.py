"""The model repository on S3: check the export's directory, upload it, return its storageUri.

:func:`upload_repository` copies ``<export>/model_repository_<variant>/`` to
``s3://<bucket>/<prefix>/model_repository_<variant>/``, so that the ``storageUri`` prefix
holds ``<model>/config.pbtxt`` and ``<model>/<version>/...`` exactly as KServe's storage
initializer downloads them to ``/mnt/models`` and Triton reads them
(``--model-store=/mnt/models``). Objects under that prefix which are not in the directory
are deleted, so the prefix mirrors the directory. The client comes from
:func:`nec_serve.s3.make_client` and failures are mapped by :func:`nec_serve.s3.translate`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

from nec_serve import s3
from nec_serve.contract import Manifest
from nec_serve.deploy.errors import DeployError
from nec_serve.deploy.services import check_variant, services_for
from nec_serve.errors import InvalidInput

__all__ = ["repository_dir", "check_repository", "storage_uri", "upload_repository"]

log = logging.getLogger(__name__)

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_MODEL_NAME = re.compile(r'^\s*name:\s*"([^"]*)"', re.MULTILINE)
# Upload settings of the repository: Triton models are large, few files at a time.
_MULTIPART_THRESHOLD = 64 * 1024 * 1024
_CONCURRENCY = 4
_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S, _ATTEMPTS = 10.0, 60.0, 5


def repository_dir(model_dir: str | Path, variant: str) -> Path:
    """``<model_dir>/model_repository_<variant>``, the directory ``nec-serve export`` wrote."""
    path = Path(model_dir) / f"model_repository_{check_variant(variant)}"
    if not path.is_dir():
        raise InvalidInput(
            f"no Triton repository at {path}: --model-dir must be a directory written by "
            f"`nec-serve export --out DIR` (it holds model_repository_gpu/ and "
            f"model_repository_cpu/)"
        )
    return path


def _export_models(repo: Path) -> list[str]:
    """The Triton models the export around ``repo`` serves (its manifest's services)."""
    if not (repo.parent / "manifest.json").is_file():
        return []
    return [m for s in services_for(Manifest.load(repo.parent)) for m in s.models]


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
    return f"s3://{_check_bucket(bucket)}/{_repo_key_prefix(prefix, check_variant(variant))}"


def _list_keys(client, bucket: str, key_prefix: str) -> dict[str, int]:
    """Key -> size of every object under ``key_prefix``."""
    keys: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
        for obj in page.get("Contents", []):
            keys[obj["Key"]] = obj["Size"]
    return keys


def _delete(client, bucket: str, keys: list[str]) -> None:
    """Delete ``keys`` (in batches of 1000, the API's limit); fail on the first refusal."""
    for start in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[start : start + 1000]]
        out = client.delete_objects(Bucket=bucket, Delete={"Objects": batch})
        if out.get("Errors"):
            first = out["Errors"][0]
            raise DeployError(
                f"cannot delete stale s3://{bucket}/{first.get('Key')}: "
                f"{first.get('Code')} {first.get('Message', '')}".strip()
            )
    for key in keys:
        log.info("deleted stale s3://%s/%s", bucket, key)


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
    prefix. The models the deployment loads must be there: ``required_models``, by default
    those of the export's manifest beside the repository (its family's services). Finally the
    keys are listed and compared with the directory (names and sizes).
    Without ``client`` one is made from boto3's credential chain, ``endpoint_url`` and
    ``region``. An S3 failure is a :class:`DeployError` naming the bucket and the endpoint.
    """
    # boto3 is optional and imported where it is used, as in nec_serve.s3.
    from boto3.exceptions import Boto3Error
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    repo = Path(repo)
    required = _export_models(repo) if required_models is None else required_models
    files = check_repository(repo, required)
    uri = storage_uri(bucket, prefix, variant)
    key_prefix = _repo_key_prefix(prefix, variant) + "/"
    if client is None:
        client = s3.make_client(
            endpoint_url=endpoint_url,
            region=region,
            timeout_s=_READ_TIMEOUT_S,
            connect_timeout_s=_CONNECT_TIMEOUT_S,
            attempts=_ATTEMPTS,
        )
    endpoint = endpoint_url or getattr(getattr(client, "meta", None), "endpoint_url", None)
    wanted = {key_prefix + f.as_posix(): (repo / f) for f in files}
    transfer = TransferConfig(
        multipart_threshold=_MULTIPART_THRESHOLD, max_concurrency=_CONCURRENCY
    )
    try:
        client.head_bucket(Bucket=bucket)
        for key, path in wanted.items():
            log.info("uploading %s -> s3://%s/%s", path, bucket, key)
            client.upload_file(str(path), bucket, key, Config=transfer)
        if delete_stale:  # after the upload: a failed run leaves a superset, never a gap
            _delete(
                client, bucket, sorted(set(_list_keys(client, bucket, key_prefix)) - set(wanted))
            )
        listed = _list_keys(client, bucket, key_prefix)
    except (ClientError, BotoCoreError, Boto3Error) as err:
        where = f"bucket {bucket!r} at {s3.redact_url(endpoint)}"
        raise DeployError(f"upload to {s3.translate(err, where)}") from err
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
