"""S3 access for the workflow steps: explicit timeouts, bounded retries, clear errors.

A missing object or refused credentials are the message's fault and are reported as
:class:`InvalidInput` (never retried); an unreachable endpoint or a 5xx is
:class:`TransientError` (retried by the caller, then failed). Downloads stream to a file
and stop at a size limit; uploads use multipart above 8 MiB.
"""

from __future__ import annotations

from pathlib import Path

from nec_serve.errors import InvalidInput, TransientError
from nec_serve.messages import S3Credentials

__all__ = [
    "make_client",
    "head",
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


def make_client(creds: S3Credentials, timeout_s: float = 30.0, attempts: int = 3):
    """A boto3 S3 client for ``creds`` with explicit timeouts and retries."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        aws_access_key_id=creds.access_key_id,
        aws_secret_access_key=creds.secret_access_key,
        region_name=creds.region,
        endpoint_url=creds.endpoint_url,
        config=Config(
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"max_attempts": attempts, "mode": "standard"},
            s3={"addressing_style": "path"},
        ),
    )


def _translate(err: Exception, what: str) -> Exception:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _CHANGED or status == 412:
            return TransientError(f"{what}: changed while being read ({code or status})")
        if code in _MISSING or status == 404:
            return InvalidInput(f"{what}: does not exist ({code or status})")
        if code in _DENIED or status == 403:
            return InvalidInput(f"{what}: access denied ({code or status}); check the credentials")
        if status >= 500:
            return TransientError(f"{what}: S3 error {code} ({status})")
        return InvalidInput(f"{what}: S3 refused the request ({code}, {status})")
    if isinstance(err, BotoCoreError):
        return TransientError(f"{what}: S3 unreachable: {err}")
    return err


def head(client, bucket: str, key: str) -> tuple[int, str]:
    """Size and ETag of ``s3://bucket/key``."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        meta = client.head_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as err:
        raise _translate(err, f"s3://{bucket}/{key}") from err
    return int(meta["ContentLength"]), str(meta.get("ETag", "")).strip('"')


def exists(client, bucket: str, key: str) -> bool:
    """Whether ``s3://bucket/key`` exists."""
    try:
        head(client, bucket, key)
    except InvalidInput as err:
        if "does not exist" in err.message:
            return False
        raise
    return True


def put_json(client, bucket: str, key: str, value: dict) -> None:
    """Write a small JSON object (a marker) to ``s3://bucket/key``."""
    import json

    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.put_object(
            Bucket=bucket,
            Key=key,
            Body=json.dumps(value, sort_keys=True).encode(),
            ContentType="application/json",
        )
    except (ClientError, BotoCoreError) as err:
        raise _translate(err, f"s3://{bucket}/{key}") from err


def download(
    client, bucket: str, key: str, dest: Path, max_bytes: int, etag: str | None = None
) -> int:
    """Stream ``s3://bucket/key`` to ``dest``; refuse objects over ``max_bytes``.

    With ``etag``, only that version of the object is read: an object replaced since it
    was looked at is a :class:`TransientError` (read it again), not silently other bytes.
    """
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
        raise _translate(err, what) from err


def upload(client, path: Path, bucket: str, key: str) -> None:
    """Upload ``path`` to ``s3://bucket/key`` (multipart above the threshold)."""
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    config = TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD
    )
    try:
        client.upload_file(str(path), bucket, key, Config=config)
    except (ClientError, BotoCoreError) as err:
        raise _translate(err, f"s3://{bucket}/{key}") from err
    except Exception as err:  # boto3's S3UploadFailedError wraps the ClientError
        cause = err.__cause__ or err.__context__
        if cause is not None:
            raise _translate(cause, f"s3://{bucket}/{key}") from err
        raise
