"""Deterministic identifiers: the same inputs always give the same ids.

A replayed or redelivered signal therefore produces intents with the ids already recorded, which
is what lets every consumer deduplicate and lets a restarted worker recognise its own work.
"""

from __future__ import annotations

import hashlib
import uuid

NAMESPACE = uuid.UUID("6f0e1d52-4c1b-5a7e-9a51-0c3d0e5b7a11")


def _uuid(*parts: object) -> str:
    return str(uuid.uuid5(NAMESPACE, "\x1f".join(str(p) for p in parts)))


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
