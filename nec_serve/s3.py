"""S3 access: one client factory, one error mapping, and the helpers built on them.

:func:`make_client` is the only place a boto3 S3 client is made (explicit timeouts, bounded
retries); :func:`translate` is the only place botocore's errors become the project's. A
missing object or bucket, refused or absent credentials are the request's fault and are
reported as :class:`InvalidInput` (never retried); an unreachable endpoint, a 5xx or an
object replaced while being read is :class:`TransientError` (retried by the caller, then
failed). Messages name the object and never hold a credential. Downloads stream to a file
and stop at a size limit; uploads use multipart above 8 MiB.

boto3 is imported inside the functions: importing this module must stay cheap for the
parts of the project that never touch S3.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from nec_serve.errors import InvalidInput, NecError, TransientError
from nec_serve.messages import S3Credentials

__all__ = [
    "make_client",
    "translate",
    "redact_url",
    "head",
    "describe",
    "download",
    "upload",
    "exists",
    "put_json",
    "MULTIPART_THRESHOLD",
]

MULTIPART_THRESHOLD = 8 * 1024 * 1024
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
_CHANGED = {"PreconditionFailed", "412"}
_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_NOT_FOUND = "does not exist"  # in every "missing" message; exists() relies on it
_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s\"']+@")


def make_client(
    creds: S3Credentials | None = None,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    timeout_s: float = 30.0,
    connect_timeout_s: float | None = None,
    attempts: int = 3,
):
    """A boto3 S3 client with explicit timeouts and bounded (standard-mode) retries.

    Args:
        creds: a workflow's credentials, endpoint and region. Without them the credentials
            come from boto3's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
            ``AWS_PROFILE``, instance roles).
        endpoint_url: the S3 server (MinIO, Ceph, moto); overrides ``creds.endpoint_url``.
            Default: AWS.
        region: overrides ``creds.region``; default boto3's (e.g. ``AWS_DEFAULT_REGION``).
        timeout_s: read timeout, and the connect timeout unless ``connect_timeout_s``.
        connect_timeout_s: connect timeout, when it should differ from the read timeout.
        attempts: total attempts per request, the first included.

    Addressing is path-style, which every S3 server understands, whenever an endpoint or
    ``creds`` are given; with neither (plain AWS) boto3 chooses.
    """
    import boto3  # optional dependency, imported only where S3 is used
    from botocore.config import Config

    if creds is not None:
        endpoint_url = endpoint_url or creds.endpoint_url
        region = region or creds.region
        keys = {
            "aws_access_key_id": creds.access_key_id,
            "aws_secret_access_key": creds.secret_access_key,
        }
    else:
        keys = {}
    config = Config(
        connect_timeout=timeout_s if connect_timeout_s is None else connect_timeout_s,
        read_timeout=timeout_s,
        retries={"max_attempts": attempts, "mode": "standard"},
        s3={"addressing_style": "path"} if endpoint_url or creds is not None else {},
    )
    return boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config, **keys)


def redact_url(url: str | None) -> str:
    """An endpoint URL without any ``user:password@`` part, for messages."""
    if not url:
        return "the default AWS endpoint"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _redact_text(text: str) -> str:
    """``text`` with the ``user:password@`` part of any URL in it removed."""
    return _USERINFO.sub(r"\1", text)


def translate(err: BaseException, what: str) -> NecError:
    """The project error for an S3 failure on ``what`` (e.g. ``s3://bucket/key``).

    ``err`` is a botocore ``ClientError`` or ``BotoCoreError``, or a boto3 error wrapping
    one (``S3UploadFailedError``). The message starts with ``what`` and says what went
    wrong; it holds no credential (``user:password@`` in URLs is removed).
    """
    # boto3 on use: an optional (extra) and heavy dependency
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(err, Boto3Error):  # S3UploadFailedError wraps the ClientError
        inner = err.__cause__ or err.__context__
        if isinstance(inner, ClientError | BotoCoreError):
            err = inner
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _CHANGED or status == 412:
            return TransientError(f"{what}: changed while being read ({code or status})")
        if code == "NoSuchBucket":
            return InvalidInput(f"{what}: the bucket {_NOT_FOUND} ({code})")
        if code in _MISSING or status == 404:
            return InvalidInput(f"{what}: {_NOT_FOUND} ({code or status})")
        if code in _DENIED or status == 403:
            return InvalidInput(f"{what}: access denied ({code or status}); check the credentials")
        if status >= 500 or status in (408, 429) or code in ("SlowDown", "RequestTimeout"):
            return TransientError(f"{what}: S3 error {code or 'unknown'} (HTTP {status})")
        return InvalidInput(f"{what}: S3 refused the request ({code or 'unknown'}, HTTP {status})")
    if isinstance(err, NoCredentialsError | PartialCredentialsError):
        return InvalidInput(
            f"{what}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE)"
        )
    detail = f"{type(err).__name__}: {_redact_text(str(err))}"
    if isinstance(err, BotoCoreError):
        return TransientError(f"{what}: S3 unreachable: {detail}")
    return TransientError(f"{what}: S3 failed: {detail}")


def head(client, bucket: str, key: str) -> tuple[int, str]:
    """Size and ETag of ``s3://bucket/key``."""
    size, etag, _ = describe(client, bucket, key)
    return size, etag


def describe(client, bucket: str, key: str) -> tuple[int, str, str | None]:
    """Size, ETag and version id (None where the bucket keeps no versions) of an object."""
    # botocore on use: an optional (extra) and heavy dependency
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        meta = client.head_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as err:
        raise translate(err, f"s3://{bucket}/{key}") from err
    version = meta.get("VersionId")
    version = None if version in (None, "", "null") else str(version)
    return int(meta["ContentLength"]), str(meta.get("ETag", "")).strip('"'), version


def exists(client, bucket: str, key: str) -> bool:
    """Whether ``s3://bucket/key`` exists."""
    try:
        head(client, bucket, key)
    except InvalidInput as err:
        if _NOT_FOUND in err.message:
            return False
        raise
    return True


def put_json(client, bucket: str, key: str, value: dict) -> None:
    """Write a small JSON object (a marker) to ``s3://bucket/key``."""
    # botocore on use: an optional (extra) and heavy dependency
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.put_object(
            Bucket=bucket,
            Key=key,
            Body=json.dumps(value, sort_keys=True).encode(),
            ContentType="application/json",
        )
    except (ClientError, BotoCoreError) as err:
        raise translate(err, f"s3://{bucket}/{key}") from err


def get_json(client, bucket: str, key: str, max_bytes: int = 1 << 16) -> dict | None:
    """A small JSON object (a marker) from ``s3://bucket/key``; None if there is none.

    An object over ``max_bytes``, not JSON, or not a JSON object gives ``{}``: it exists,
    but says nothing (a marker is only ever read as a hint).
    """
    from botocore.exceptions import BotoCoreError, ClientError  # see put_json

    try:
        body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{max_bytes}")["Body"]
        data = body.read(max_bytes + 1)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise translate(err, f"s3://{bucket}/{key}") from err
    except BotoCoreError as err:
        raise translate(err, f"s3://{bucket}/{key}") from err
    if len(data) > max_bytes:
        return {}
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def download(
    client, bucket: str, key: str, dest: Path, max_bytes: int, etag: str | None = None
) -> int:
    """Stream ``s3://bucket/key`` to ``dest``; refuse objects over ``max_bytes``.

    With ``etag``, only that version of the object is read: an object replaced since it
    was looked at is a :class:`TransientError` (read it again), not silently other bytes.
    """
    # botocore on use: an optional (extra) and heavy dependency
    from botocore.exceptions import BotoCoreError, ClientError

    what = f"s3://{bucket}/{key}"
    try:
        size, _ = head(client, bucket, key)
        if size > max_bytes:
            raise InvalidInput(f"{what} is {size} bytes, over the limit of {max_bytes} bytes")
        if size == 0:
            raise InvalidInput(f"{what} is empty")
        extra = {"IfMatch": f'"{etag}"'} if etag else {}
        body = client.get_object(Bucket=bucket, Key=key, **extra)["Body"]
        written = 0
        with dest.open("wb") as f:
            for chunk in iter(lambda: body.read(1 << 20), b""):
                written += len(chunk)
                if written > max_bytes:
                    raise InvalidInput(f"{what} grew over the limit of {max_bytes} bytes")
                f.write(chunk)
        return written
    except (ClientError, BotoCoreError) as err:
        raise translate(err, what) from err


def upload(client, path: Path, bucket: str, key: str) -> None:
    """Upload ``path`` to ``s3://bucket/key`` (multipart above the threshold)."""
    # boto3 on use: an optional (extra) and heavy dependency
    from boto3.exceptions import Boto3Error
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    config = TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD
    )
    try:
        client.upload_file(str(path), bucket, key, Config=config)
    except (ClientError, BotoCoreError, Boto3Error) as err:
        raise translate(err, f"s3://{bucket}/{key}") from err
