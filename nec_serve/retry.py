"""Bounded retries of infrastructure failures, shared by the controller and the wrapper.

:func:`retrying` runs a call, retries it with exponential backoff while it fails with an
error that retrying may fix (:func:`~nec_serve.errors.is_transient`), and ends any failure
as :class:`GaveUp`, whose ``reason`` is fit for a ``failed`` status and a dead letter
(:func:`~nec_serve.messages.public_reason`: no local path, no credential).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from nec_serve.errors import is_transient
from nec_serve.messages import public_reason

__all__ = ["GaveUp", "retrying"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class GaveUp(Exception):
    """What the retries ended with: a public reason and how many attempts were made."""

    def __init__(self, reason: str, attempts: int):
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts


def retrying(
    fn: Callable[[], T],
    attempts: int,
    backoff_s: float,
    what: str,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """``fn()``, tried up to ``attempts`` times while it fails transiently.

    The first retry waits ``backoff_s``, each next one twice as long. A failure that is
    not transient ends at once; a transient one after the last attempt, its reason then
    starting ``gave up after N attempts``. ``on_retry(err)`` is called before each retry
    (to count them).

    Raises:
        GaveUp: naming the failure, with the attempts made.
    """
    delay = backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            if not is_transient(err):
                raise GaveUp(public_reason(err), attempt) from err
            if attempt == attempts:
                reason = f"gave up after {attempt} attempts: {public_reason(err)}"
                raise GaveUp(reason, attempt) from err
            log.warning("%s: attempt %d failed (%s); retry in %.1f s", what, attempt, err, delay)
            if on_retry is not None:
                on_retry(err)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover
