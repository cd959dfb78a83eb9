"""The errors of ``nec-serve deploy``: each names what failed and how to fix it."""

from nec_serve.errors import NecError

__all__ = ["DeployError", "DeployTimeout"]


class DeployError(NecError):
    """Uploading the repository or applying the InferenceServices failed."""


class DeployTimeout(DeployError, TimeoutError):
    """An InferenceService did not become Ready in time."""
