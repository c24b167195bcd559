"""Audit events in the form the store writes them, built once per event.

The sink gets each event as the JSON of a Kafka record and the store needs it as columns: the
values of `EVENT_COLUMNS`, `ts` as RFC 3339 UTC text and `data` as JSON text, plus the four
values of `data` the current-state views follow. Validating into an `AuditEvent` and converting
that costs about 40% more than building the columns straight from the JSON, which is what
`record_from_json` does, leaving to the model only what it cannot settle cheaply:

* the JSON is parsed by pydantic's own parser (`pydantic_core.from_json`), the one
  `AuditEvent.model_validate_json` uses, so the two agree on every document and every value in
  it (arbitrary-size integers, NaN, nesting limits, duplicate keys, invalid UTF-8);
* the top-level fields are checked against the model's constraints exactly as declared (types
  without lax coercion, identifier and hash patterns, lengths, schema version, a `Z` timestamp
  that `datetime.fromisoformat` accepts, no missing or extra field);
* anything outside that narrow, exact form (a field left to its default, a timestamp with an
  offset, a `seq` written as `"5"`) returns None, and the caller validates with the model, which
  accepts or refuses it with its own error.

So the fast path never accepts what the model refuses, and what it accepts becomes the same
columns `record_from_event` makes from the validated model; tests hold both with hostile input.
"""

from __future__ import annotations

import operator
import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final, NamedTuple

import orjson
from pydantic_core import from_json

from orch_worker.domain.models import AuditEvent
from orch_worker.domain.types import SCHEMA_VERSION, format_ts

EVENT_COLUMNS = (
    "event_id",
    "portfolio",
    "seq",
    "ts",
    "type",
    "signal_id",
    "intent_id",
    "account_id",
    "rationale",
    "data",
    "prev_hash",
    "hash",
    "schema_version",
)

MAX_SEQ: Final = 2**63 - 1
"""The largest `seq` a 64-bit integer column holds; the model itself sets no upper bound."""

EventRow = tuple[
    str, str, int, str, str, str | None, str | None, str | None, str, str, str, str, int
]
"""One event's columns in `EVENT_COLUMNS` order: `ts` as RFC 3339 UTC text, `data` as JSON text."""


class UnrepresentableEventError(ValueError):
    """A valid event that no store can hold exactly; dead-letter it rather than store it."""

    def __init__(self, event_id: str, reason: str) -> None:
        super().__init__(f"{event_id}: {reason}")
        self.event_id = event_id
        self.reason = reason


class EventRecord(NamedTuple):
    """One event ready for the store: its columns and what the current-state views need."""

    row: EventRow
    at: datetime
    """`ts` as an aware UTC datetime (the row holds its RFC 3339 text)."""
    signal_status: str | None
    intent_status: str | None
    filled_quantity: str | None
    quantity: str | None


_FIELDS: Final = frozenset(EVENT_COLUMNS)
if frozenset(AuditEvent.model_fields) != _FIELDS:  # pragma: no cover - guards a model change
    raise ImportError("AuditEvent's fields changed: update EVENT_COLUMNS and record_from_json")

# `Identifier` and the hash pattern of the model, as full matches. Only ASCII classes, so the
# model's character lengths are these lengths, and `$` cannot be met by a trailing newline.
_IDENTIFIER = re.compile(r"[A-Za-z0-9._:@/+-]{1,128}")
_UNIQUE_FIELDS = re.compile(r"[A-Za-z0-9._:@/+-]{1,128}\n[0-9a-f]{64}\n[0-9a-f]{64}")
"""`event_id`, `prev_hash` and `hash`, joined by newlines (which none of them may hold)."""
_CANONICAL_TS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")

_CACHE_LIMIT = 4096
"""Entries per memo below; a memo is emptied when it reaches this (cheap, and bounded)."""

_known_identifiers: set[str] = set()
"""Portfolios, types, accounts and ids seen valid: most repeat from event to event."""

_timestamps: dict[str, tuple[str, datetime]] = {}
"""Canonical timestamp text -> (RFC 3339 text as stored, datetime): a batch shares a few."""


def _identifier(value: object) -> bool:
    if type(value) is not str:
        return False
    if value in _known_identifiers:
        return True
    if _IDENTIFIER.fullmatch(value) is None:
        return False
    if len(_known_identifiers) >= _CACHE_LIMIT:
        _known_identifiers.clear()
    _known_identifiers.add(value)
    return True


def _timestamp(value: object) -> tuple[str, datetime] | None:
    """The stored text and datetime of a `...T..:..:...ffffffZ` timestamp, None for any other.

    The stored text is `format_ts` of the datetime, which for this exact form is the text itself
    unless the year is below 1000 (written unpadded): formatting it again cost a tenth of the
    decoding, since the worker's timestamps rarely repeat across batches.
    """
    if type(value) is not str:
        return None
    known = _timestamps.get(value)
    if known is not None:
        return known
    if _CANONICAL_TS.fullmatch(value) is None:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        return None
    if len(_timestamps) >= _CACHE_LIMIT:
        _timestamps.clear()
    known = _timestamps[value] = (value if value[0] != "0" else format_ts(at), at)
    return known


_PLAIN_DECIMAL = re.compile(r"-?[0-9]{1,30}(\.[0-9]{1,30})?\Z")


def amount_text(value: object) -> str | None:
    """A decimal string as written, a JSON number as its exact decimal text, anything else None.

    Kept as text (not a float, not a constrained numeric column) so no value is rounded and an
    odd producer cannot make the whole batch fail.
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        if _PLAIN_DECIMAL.match(value):  # what the worker writes; skips building a Decimal
            return value
        try:
            return value if Decimal(value).is_finite() else None
        except InvalidOperation:
            return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(Decimal(repr(value)), "f")
    return None


def _data_text(event_id: str, data: dict[str, Any]) -> str:
    """`data` as JSON text, exactly as `AuditEvent.data` reads it back.

    Raises:
        UnrepresentableEventError: an integer beyond 64 bits, a lone surrogate.
    """
    try:
        return orjson.dumps(data).decode("utf-8")
    except (UnicodeDecodeError, orjson.JSONEncodeError, TypeError) as exc:
        raise UnrepresentableEventError(
            event_id, f"not representable as UTF-8 JSON: {exc}"
        ) from exc


def _record(row: EventRow, at: datetime, data: dict[str, Any]) -> EventRecord:
    get = data.get
    signal_status, intent_status = get("signal_status"), get("intent_status")
    return _new_record(
        EventRecord,
        (
            row,
            at,
            signal_status if type(signal_status) is str else None,
            intent_status if type(intent_status) is str else None,
            _amount(get("filled_quantity")),
            _amount(get("quantity")),
        ),
    )


_new_record = tuple.__new__
"""`EventRecord` from one tuple, without the Python-level constructor of a named tuple."""

_IN_COLUMN_ORDER = operator.itemgetter(*EVENT_COLUMNS)

_amounts: dict[str, str | None] = {}
"""Amount text -> `amount_text` of it: quantities repeat across a signal's events."""


def _amount(value: object) -> str | None:
    if type(value) is not str:
        return amount_text(value)
    if value in _amounts:
        return _amounts[value]
    if len(_amounts) >= _CACHE_LIMIT:
        _amounts.clear()
    text = _amounts[value] = amount_text(value)
    return text


def record_from_json(value: bytes) -> EventRecord | None:
    """The record of a JSON-encoded `AuditEvent` in the exact form the worker writes, else None.

    None means "not decided here": the caller validates `value` with the model, which accepts
    it (the event was in another valid form) or refuses it with the reason. This runs for every
    event the sink stores, so it is written flat, with as few calls as the checks allow.

    Raises:
        UnrepresentableEventError: the event is valid, but no store can hold it exactly.
    """
    try:
        # Keys only: an event's keys are the same few dozen names event after event, and from
        # the cache they cost no allocation; its values mostly differ (ids, hashes). Measured
        # against no cache: about 8% less CPU per decoded event (minimum and quartiles of 150
        # alternating runs); caching the values too measured no better.
        d = from_json(value, cache_strings="keys")
    except ValueError:
        return None
    if type(d) is not dict or len(d) != len(EVENT_COLUMNS):
        return None
    try:  # with as many keys as fields, all of them present means no other key
        (
            event_id,
            portfolio,
            seq,
            ts,
            type_,
            signal_id,
            intent_id,
            account_id,
            rationale,
            data,
            prev_hash,
            hash_,
            version,
        ) = _IN_COLUMN_ORDER(d)
    except KeyError:
        return None
    known = _known_identifiers
    try:  # `in` a set raises TypeError for a list or an object: not ours to take, then
        stamp = _timestamps.get(ts)
        if (
            (stamp is None and (stamp := _timestamp(ts)) is None)
            or type(version) is not int
            or not 1 <= version <= SCHEMA_VERSION
            or type(seq) is not int
            or seq < 1
            or type(data) is not dict
            or type(rationale) is not str
            or type(event_id) is not str
            or type(prev_hash) is not str
            or type(hash_) is not str
            # The unique ones in one match: `Identifier`, then the two hashes.
            or _UNIQUE_FIELDS.fullmatch(f"{event_id}\n{prev_hash}\n{hash_}") is None
            or (type_ not in known and not _identifier(type_))
            or (portfolio not in known and not _identifier(portfolio))
            or not (signal_id is None or signal_id in known or _identifier(signal_id))
            or not (intent_id is None or intent_id in known or _identifier(intent_id))
            or not (account_id is None or account_id in known or _identifier(account_id))
        ):
            return None
    except TypeError:
        return None
    if seq > MAX_SEQ or not rationale.isascii():
        _check_storable(event_id, seq, rationale)
    get = data.get
    signal_status, intent_status = get("signal_status"), get("intent_status")
    filled, quantity = get("filled_quantity"), get("quantity")
    row: EventRow = (
        event_id,
        portfolio,
        seq,
        stamp[0],
        type_,
        signal_id,
        intent_id,
        account_id,
        rationale,
        _data_text(event_id, data),
        prev_hash,
        hash_,
        version,
    )
    return _new_record(
        EventRecord,
        (
            row,
            stamp[1],
            signal_status if type(signal_status) is str else None,
            intent_status if type(intent_status) is str else None,
            None if filled is None else _amount(filled),
            None if quantity is None else _amount(quantity),
        ),
    )


def record_from_event(e: AuditEvent) -> EventRecord:
    """The record of a validated event.

    Raises:
        UnrepresentableEventError: no store can hold the event exactly.
    """
    _check_storable(e.event_id, e.seq, e.rationale)
    row: EventRow = (
        e.event_id,
        e.portfolio,
        e.seq,
        _ts_text(e.ts),
        e.type,
        e.signal_id,
        e.intent_id,
        e.account_id,
        e.rationale,
        _data_text(e.event_id, e.data),
        e.prev_hash,
        e.hash,
        e.schema_version,
    )
    return _record(row, e.ts, e.data)


def _check_storable(event_id: str, seq: int, rationale: str) -> None:
    if seq > MAX_SEQ:
        raise UnrepresentableEventError(event_id, "seq does not fit a 64-bit integer column")
    if not rationale.isascii():
        try:
            rationale.encode("utf-8")
        except UnicodeEncodeError as exc:
            why = f"not representable as UTF-8 JSON: {exc}"
            raise UnrepresentableEventError(event_id, why) from exc


_ts_texts: dict[datetime, str] = {}


def _ts_text(at: datetime) -> str:
    """`format_ts`, remembered: the worker stamps a whole batch of audit events with one time."""
    text = _ts_texts.get(at)
    if text is None:
        if len(_ts_texts) >= _CACHE_LIMIT:
            _ts_texts.clear()
        text = _ts_texts[at] = format_ts(at)
    return text
