"""Deterministic identifiers: the same inputs always give the same ids.

A replayed or redelivered signal therefore produces intents with the ids already recorded, which
is what lets every consumer deduplicate and lets a restarted worker recognise its own work.
"""

from __future__ import annotations

import hashlib
import uuid

NAMESPACE = uuid.UUID("6f0e1d52-4c1b-5a7e-9a51-0c3d0e5b7a11")
_NAMESPACE_BYTES = NAMESPACE.bytes


def _uuid(*parts: object) -> str:
    """`str(uuid.uuid5(NAMESPACE, name))` of the parts joined, computed as RFC 4122 does.

    Without building a `UUID`: a release makes a few of these ids, and the object (validated
    construction, then formatting) cost three times the SHA-1 itself.
    """
    name = "\x1f".join(map(str, parts)).encode("utf-8")
    h = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name, usedforsecurity=False).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50  # version 5
    h[8] = (h[8] & 0x3F) | 0x80  # RFC 4122 variant
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def plan_id(signal_id: str) -> str:
    return _uuid("plan", signal_id)


def intent_id(signal_id: str, account_id: str, attempt: int, kind: str = "initial") -> str:
    return _uuid("intent", signal_id, account_id, attempt, kind)


def audit_event_id(portfolio: str, seq: int) -> str:
    return _uuid("audit", portfolio, seq)


def intervention_id(signal_id: str, intent_id_: str, reason_code: str) -> str:
    return _uuid("intervention", signal_id, intent_id_, reason_code)


def seed_for(signal_id: str) -> int:
    """A 64-bit RNG seed derived from the signal id (stable across processes and versions)."""
    return int.from_bytes(hashlib.sha256(signal_id.encode()).digest()[:8], "big")
