"""The code fingerprint: one SHA-256 for everything that decides what a container's bits mean.

Two exports that share it decode each other's containers; two that differ must not. It
covers the entropy model kind and its frozen tables (for NEC the tables also hold the
medians the encoder graph subtracts before rounding, so the encoder's quantisation is in
them), the symbol geometry, and what a family adds beside the tables (for RVQ the
codebooks, which turn an index back into a vector). It does not cover the model's name, its
version, or the graphs that consume decoded symbols: a classifier export of the same NEC
weights shares the code of the plain export and decodes its containers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

__all__ = ["code_fingerprint", "extras_digests", "SCHEME"]

#: Versions the recipe below; a change to it is a new scheme, never a silent edit.
SCHEME = "nec-code/1"


def code_fingerprint(
    *,
    family: str,
    entropy_kind: str,
    tables_sha256: str,
    channels: int,
    tokens: int,
    extras: Mapping[str, str] | None = None,
) -> str:
    """The fingerprint, as 64 lowercase hex digits.

    It is the SHA-256 of a canonical JSON object (sorted keys, no whitespace) holding
    :data:`SCHEME`, ``family``, ``entropy_kind``, ``tables_sha256``, ``channels``,
    ``tokens`` and ``extras`` (name -> SHA-256 hex digest of that part, see
    :func:`extras_digests`).
    """
    terms = {
        "scheme": SCHEME,
        "family": family,
        "entropy_kind": entropy_kind,
        "tables_sha256": tables_sha256,
        "channels": int(channels),
        "tokens": int(tokens),
        "extras": dict(extras or {}),
    }
    text = json.dumps(terms, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def extras_digests(parts: Mapping[str, bytes]) -> dict[str, str]:
    """The SHA-256 hex digest of each part, by name: what an export's manifest records."""
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(parts.items())}
