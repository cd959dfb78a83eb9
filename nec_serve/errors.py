"""One exception tree for the project.

Every error a user can cause derives from :class:`NecError`, so callers (the CLI, the
wrapper) can map it to an exit code, an HTTP status or a ``failed`` status event in one
place. Messages name the bad value and, where there is one, the fix.
"""

__all__ = [
    "NecError",
    "InvalidInput",
    "ManifestError",
    "SchemaVersionError",
    "CorruptBitstream",
    "TableMismatch",
    "CheckpointMismatch",
    "UnknownModel",
    "ExportCheckFailed",
    "TransientError",
    "ServerUnavailable",
    "ModelMismatch",
    "is_transient",
]


class NecError(Exception):
    """Base class of all errors raised on purpose by this project.

    ``failure`` is the class a failed message is counted and reported under (one of
    :data:`nec_serve.metrics.FAILURE_REASONS`): decided here, by the error's class, so the
    same fault gets the same label whichever path raised it.
    """

    failure = "input_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(NecError, ValueError):
    """Input data that cannot be processed: wrong shape, band count, NaN, bad file."""


class ManifestError(InvalidInput):
    """An export's ``manifest.json`` that is missing, unreadable or breaks the model contract."""


class SchemaVersionError(ManifestError):
    """A manifest of another schema version (or none: written before the contract had one)."""


class CorruptBitstream(NecError):
    """A container or payload that is truncated, damaged or not a container at all."""


class TableMismatch(NecError):
    """A container made with other entropy tables than the ones supplied."""


class CheckpointMismatch(NecError):
    """A checkpoint whose keys or shapes do not fit the requested architecture."""


class UnknownModel(NecError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable.
        return self.message


class ExportCheckFailed(NecError):
    """An exported graph disagrees with PyTorch beyond the stated tolerance."""


class TransientError(NecError):
    """A failure that may pass: an unreachable service, a timeout. Worth retrying later."""

    failure = "transient_exhausted"


class ServerUnavailable(TransientError):
    """The inference server cannot be reached, or stayed unavailable through the retries."""


class ModelMismatch(NecError):
    """The served model is missing, not ready, or not the one the export describes."""


# HTTP statuses worth another try: the server's failure, a timeout, a conflict, throttling.
_RETRY_STATUSES = {0, 408, 409, 429}


def is_transient(err: BaseException) -> bool:
    """Whether retrying may fix ``err``: infrastructure, not the message.

    True for :class:`TransientError`, operating-system and connection errors, client
    errors of the Kubernetes/HTTP and Kafka libraries (recognised by their module, so
    neither is imported here), and API errors whose ``status`` is 5xx, 408, 409, 429 or 0
    (no answer). Every other project error is the input's fault and is not retried.
    """
    if isinstance(err, TransientError | OSError):
        return True
    if isinstance(err, NecError):
        return False
    status = getattr(err, "status", None)
    if isinstance(status, int) and not isinstance(status, bool):
        return status >= 500 or status in _RETRY_STATUSES
    return type(err).__module__.split(".", 1)[0] in ("urllib3", "kafka", "botocore")
