"""The audit hash chain: each event commits to its predecessor, per portfolio.

The core emits `AuditDraft`s (what happened and why); `chain` turns them into `AuditEvent`s by
assigning sequence numbers and hashes. Keeping the chain head in the worker's changelog is what
makes the chain continue across restarts instead of forking.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from pydantic import JsonValue

from orch_worker.domain.canonical import canonical_json, sha256_hex
from orch_worker.domain.ids import audit_event_id
from orch_worker.domain.models import AuditEvent

GENESIS_HASH = "0" * 64


@dataclass(frozen=True, slots=True)
class AuditDraft:
    type: str
    rationale: str
    data: dict[str, JsonValue] = field(default_factory=dict)
    signal_id: str | None = None
    intent_id: str | None = None
    account_id: str | None = None


@dataclass(frozen=True, slots=True)
class ChainHead:
    seq: int = 0
    hash: str = GENESIS_HASH


def event_hash(event: AuditEvent) -> str:
    """SHA-256 over the canonical JSON of the event without its own `hash`."""
    return _digest(event.model_dump(mode="json", exclude={"hash"}))


def _digest(doc: dict[str, Any]) -> str:
    """The hash of an event's JSON form without its `hash` field."""
    return sha256_hex(canonical_json(doc))


def chain(
    portfolio: str, head: ChainHead, drafts: Iterable[AuditDraft], ts: datetime
) -> tuple[ChainHead, tuple[AuditEvent, ...]]:
    new_head, events, _ = chain_json(portfolio, head, drafts, ts)
    return new_head, events


def chain_json(
    portfolio: str, head: ChainHead, drafts: Iterable[AuditDraft], ts: datetime
) -> tuple[ChainHead, tuple[AuditEvent, ...], tuple[bytes, ...]]:
    """`chain`, with each event's JSON as published: the dump that is hashed is the one
    written, so an event is serialised once, not once to hash and again to publish."""
    events: list[AuditEvent] = []
    written: list[bytes] = []
    seq, prev = head.seq, head.hash
    for d in drafts:
        seq += 1
        unsigned = AuditEvent(
            event_id=audit_event_id(portfolio, seq),
            seq=seq,
            ts=ts,
            type=d.type,
            portfolio=portfolio,
            signal_id=d.signal_id,
            intent_id=d.intent_id,
            account_id=d.account_id,
            rationale=d.rationale,
            data=d.data,
            prev_hash=prev,
            hash=GENESIS_HASH,
        )
        doc = unsigned.model_dump(mode="json")
        del doc["hash"]  # what `event_hash` covers
        digest = _digest(doc)
        doc["hash"] = digest  # back in its place, the last field
        events.append(unsigned.model_copy(update={"hash": digest}))
        written.append(orjson.dumps(doc))
        prev = digest
    return ChainHead(seq, prev), tuple(events), tuple(written)


def verify_chain(events: Iterable[AuditEvent]) -> str | None:
    """None when the events (in seq order, one portfolio) form an intact chain, else the break."""
    prev, expected_seq = GENESIS_HASH, 1
    for e in events:
        if e.seq != expected_seq:
            return f"seq {e.seq}: expected seq {expected_seq} (missing or duplicated event)"
        if e.prev_hash != prev:
            return f"seq {e.seq} ({e.event_id}): prev_hash does not match the previous event's hash"
        if event_hash(e) != e.hash:
            return f"seq {e.seq} ({e.event_id}): hash does not match its content (altered)"
        prev, expected_seq = e.hash, e.seq + 1
    return None
