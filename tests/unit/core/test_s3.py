"""One S3 error mapping for the wrapper and deploy: the request's fault or worth a retry."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from nec_serve import s3
from nec_serve.errors import InvalidInput, TransientError, is_transient


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


@pytest.mark.parametrize(
    ("err", "kind", "text"),
    [
        (_client_error("NoSuchKey", 404), InvalidInput, "does not exist"),
        (_client_error("NoSuchBucket", 404), InvalidInput, "the bucket does not exist"),
        (_client_error("AccessDenied", 403), InvalidInput, "access denied"),
        (_client_error("InvalidRequest", 400), InvalidInput, "refused the request"),
        (_client_error("PreconditionFailed", 412), TransientError, "changed while being read"),
        (_client_error("InternalError", 500), TransientError, "HTTP 500"),
        (_client_error("SlowDown", 503), TransientError, "HTTP 503"),
        (_client_error("TooManyRequests", 429), TransientError, "HTTP 429"),
        (_client_error("RequestTimeout", 400), TransientError, "RequestTimeout"),
        (NoCredentialsError(), InvalidInput, ""),
        (
            EndpointConnectionError(endpoint_url="http://user:pw@127.0.0.1:9"),
            TransientError,
            "S3 unreachable",
        ),
    ],
)
def test_errors_are_the_requests_fault_or_worth_a_retry(err, kind, text):
    mapped = s3.translate(err, "s3://b/k")
    assert type(mapped) is kind and mapped.message.startswith("s3://b/k")
    assert text in mapped.message and "pw@" not in mapped.message
    assert is_transient(mapped) == (kind is TransientError)
