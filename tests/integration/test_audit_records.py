"""The sink's fast path from a record's JSON to the store's row form, held against the model.

`record_from_json` must never accept what `AuditEvent` refuses, and whatever it accepts must
become exactly the record the model's path (`record_from_event` of the validated event) makes;
when it declines, the sink's decode gives the model's own answer, error text included. Hostile
documents, listed and generated, check all three; every event the worker writes takes the fast
path. (The records' round trip through SQLite and PostgreSQL is in test_audit_store.)
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import JsonValue, ValidationError

from orch_worker.adapters.db.rows import (
    EVENT_COLUMNS,
    EventRecord,
    UnrepresentableEventError,
    record_from_event,
    record_from_json,
)
from orch_worker.adapters.kafka.codec import DecodeError, decode, encode
from orch_worker.adapters.kafka.sink_app import decode_record
from orch_worker.domain.audit import AuditDraft, ChainHead, chain
from orch_worker.domain.models import AuditEvent

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 23, 12, 0, 0, 123456, tzinfo=UTC)


def _worker_events() -> list[AuditEvent]:
    drafts = [
        AuditDraft("signal_received", "Signal received.", {"signal_status": "received"}, "s-1"),
        AuditDraft(
            "intent_released",
            "Released 0.10 to ACC-1.",
            {
                "intent_status": "released",
                "quantity": "0.10",
                "filled_quantity": "0",
                "effects": ["publish", "arm_ack_timer"],
                "intent": {"quantity": "0.10", "limit_price": None, "attempt": 1},
                "release_lag_s": 0.0,
            },
            "s-1",
            "i-1",
            "ACC-1",
        ),
        AuditDraft("note", 'Ünïcödé — "quoted", a NUL \x00 and 東京.', {"n": 2**63 - 1}),
        AuditDraft("intent_transition", "Filled.", {"intent_status": "filled", "quantity": 1.5}),
    ]
    _, events = chain("alpha", ChainHead(), drafts, T0)
    _, later = chain("beta", ChainHead(seq=10**12, hash="ab" * 32), drafts[:1], T0)
    return [*events, *later]


def _outcome(doc: bytes) -> EventRecord | str | None:
    """What the model's path makes of `doc`: a record, why no store can hold it, or None."""
    try:
        event = AuditEvent.model_validate_json(doc)
    except ValidationError:
        return None
    try:
        return record_from_event(event)
    except UnrepresentableEventError as exc:
        return exc.reason


def _sink(doc: bytes) -> EventRecord | str | tuple[str, str]:
    """What the sink's decode makes of `doc`: a record, why it is unstorable, or its error."""
    try:
        return decode_record(doc)
    except UnrepresentableEventError as exc:
        return exc.reason
    except DecodeError as exc:
        return (exc.error_type, str(exc))


def _model_error(doc: bytes) -> tuple[str, str]:
    try:
        decode(AuditEvent, doc)
    except DecodeError as exc:
        return (exc.error_type, str(exc))
    raise AssertionError("the model accepted it")


def _check(doc: bytes) -> None:
    """The fast path agrees with the model on `doc`, and the sink's decode is the model's."""
    expected = _outcome(doc)
    try:
        fast: EventRecord | str | None = record_from_json(doc)
    except UnrepresentableEventError as exc:
        fast = exc.reason
    if fast is not None:
        assert fast == expected
    if isinstance(fast, EventRecord):
        assert fast.at.utcoffset() == timedelta(0)
    assert _sink(doc) == (_model_error(doc) if expected is None else expected)


def test_every_event_the_worker_writes_takes_the_fast_path() -> None:
    for event in _worker_events():
        record = record_from_json(encode(event))

        assert record is not None, event
        assert record == record_from_event(event)
        assert dict(zip(EVENT_COLUMNS, record.row, strict=True))["ts"] == (
            "2026-11-23T12:00:00.123456Z"
        )


# A valid event as a list of (key, raw JSON text) pairs, so documents can hold what no encoder
# writes: duplicate keys, NaN, integers beyond 64 bits, a byte order mark.
_BASE = orjson.loads(encode(_worker_events()[1]))
_FIELDS = [(k, orjson.dumps(v).decode()) for k, v in _BASE.items()]


def _document(fields: list[tuple[str, str]], before: str = "", after: str = "") -> bytes:
    body = ",".join(f"{json.dumps(k)}:{v}" for k, v in fields)
    return f"{before}{{{body}}}{after}".encode()


def _with(key: str, raw: str) -> bytes:
    return _document([(k, raw if k == key else v) for k, v in _FIELDS])


_DEEP = "[" * 300 + "]" * 300

_HOSTILE_VALUES = [
    "null",
    "true",
    "false",
    "0",
    "-1",
    "6.0",
    '"6"',
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551616",
    "[]",
    "{}",
    '""',
    '"a"',
    '"abc\\n"',
    '"\\u0661\\u0662"',  # Arabic-Indic digits: \d would take them, the model does not
    '"\\ud800"',
    f'"{"a" * 128}"',
    f'"{"a" * 129}"',
    f'"{"0" * 64}"',
    f'"{"A" * 64}"',
    f'"{"0" * 63}"',
    f'"{"0" * 65}"',
    f'"{"0" * 64}\\n"',
    '"2026-11-23T12:00:00.000000Z"',
    '"2026-11-23T12:00:00.000000+00:00"',
    '"2026-11-23T13:00:00.000000+01:00"',
    '"2026-11-23T12:00:00Z"',
    '"2026-11-23T12:00:00.0000001Z"',
    '"2026-11-23 12:00:00.000000Z"',
    '"2026-11-23t12:00:00.000000Z"',
    '"2026-11-23T12:00:00.000000z"',
    '"2026-11-23T12:00:00.000000"',
    '"2026-11-23T12:00:00.000000Z\\n"',
    '"2026-02-29T12:00:00.000000Z"',
    '"2024-02-29T12:00:00.000000Z"',
    '"2026-11-23T24:00:00.000000Z"',
    '"2026-11-23T23:59:60.000000Z"',
    '"0000-01-01T00:00:00.000000Z"',
    '"0999-01-01T00:00:00.000000Z"',
    '"9999-12-31T23:59:59.999999Z"',
    '"1700000000"',
    "1700000000",
    '{"a":18446744073709551616}',
    '{"a":NaN,"b":Infinity}',
    '{"a":1e400}',
    '{"a":"\\u0000"}',
    '{"a":1,"a":2}',
    '{"signal_status":"x","signal_status":7}',
    '{"intent_status":"filled","quantity":1e-7,"filled_quantity":"1E+2"}',
    '{"quantity":"NaN","filled_quantity":true}',
    f'{{"a":{"[" * 150}{"]" * 150}}}',
    f'{{"a":{_DEEP}}}',
]


@pytest.mark.parametrize("key", [k for k, _ in _FIELDS])
@pytest.mark.parametrize("raw", _HOSTILE_VALUES)
def test_a_hostile_value_in_any_field_gets_the_models_answer(key: str, raw: str) -> None:
    _check(_with(key, raw))


@pytest.mark.parametrize(
    "doc",
    [
        _document(_FIELDS, before="\ufeff"),
        _document(_FIELDS, before=" \n\t"),
        _document(_FIELDS, after=" \n"),
        _document(_FIELDS, after="x"),
        _document(_FIELDS) + _document(_FIELDS),
        _document(_FIELDS[1:]),  # schema_version left to its default
        _document([f for f in _FIELDS if f[0] != "account_id"]),
        _document([f for f in _FIELDS if f[0] != "data"]),
        _document([f for f in _FIELDS if f[0] != "ts"]),
        _document([*_FIELDS, ("extra", "1")]),
        _document([("seq", '"x"'), *_FIELDS]),  # a duplicate key: the last one counts
        _document([*_FIELDS, ("seq", '"x"')]),
        _document([*_FIELDS, ("hash", '"' + "f" * 64 + '"')]),
        b"[]",
        b"null",
        b"{not json",
        b'{"event_id": "x"}',
        b"\xff\xfe",
        _document(_FIELDS).replace(b"ACC-1", b"ACC-\xff"),
        _document(_FIELDS).replace(b"Released", b"Rel\\ud800eased"),
    ],
)
def test_a_hostile_document_gets_the_models_answer(doc: bytes) -> None:
    _check(doc)


def test_an_event_no_store_can_hold_is_refused_alike_on_both_paths() -> None:
    too_far = _with("seq", str(2**63))
    too_big = _with("data", '{"n":18446744073709551616}')

    for doc, reason in ((too_far, "64-bit integer column"), (too_big, "UTF-8 JSON")):
        with pytest.raises(UnrepresentableEventError, match=reason) as fast:
            record_from_json(doc)
        with pytest.raises(UnrepresentableEventError) as model:
            record_from_event(AuditEvent.model_validate_json(doc))
        assert str(fast.value) == str(model.value)
        assert fast.value.event_id in str(fast.value)


_TOKENS = st.one_of(
    st.sampled_from(_HOSTILE_VALUES),
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: orjson.dumps(f).decode()),
    st.text(max_size=80).map(lambda s: orjson.dumps(s).decode()),
    st.from_regex(r"[A-Za-z0-9._:@/+\-]{1,3}[^\"\\]?", fullmatch=True).map(json.dumps),
    st.from_regex(r"[0-9a-fA-F]{63,65}", fullmatch=True).map(json.dumps),
    st.from_regex(
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}"
        r"(\.[0-9]{1,7})?(Z|[+-]0[0-9]:[0-9]{2})?",
        fullmatch=True,
    ).map(json.dumps),
)


@st.composite
def _documents(draw: st.DrawFn) -> bytes:
    fields = list(_FIELDS)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "replace", "drop", "extra", "duplicate"]))
        i = draw(st.integers(0, len(fields) - 1))
        if op == "replace":
            fields[i] = (fields[i][0], draw(_TOKENS))
        elif op == "drop":
            del fields[i]
        elif op == "extra":
            fields.insert(i, (draw(st.sampled_from(["x", "Seq", "data2"])), draw(_TOKENS)))
        else:
            fields.insert(draw(st.integers(0, len(fields))), (fields[i][0], draw(_TOKENS)))
        if not fields:
            break
    return _document(fields)


@settings(max_examples=600, deadline=None)
@given(_documents())
def test_generated_hostile_documents_get_the_models_answer(doc: bytes) -> None:
    _check(doc)


_JSON: st.SearchStrategy[JsonValue] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
_IDS = st.from_regex(r"[A-Za-z0-9._:@/+\-]{1,40}", fullmatch=True)
_HEX = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)


@st.composite
def _valid_events(draw: st.DrawFn) -> AuditEvent:
    data = draw(st.dictionaries(st.text(max_size=12), _JSON, max_size=6))
    for key in ("signal_status", "intent_status", "quantity", "filled_quantity"):
        if draw(st.booleans()):
            data[key] = draw(st.sampled_from(["filled", "0.10", "1E+2", "-0", "x", 1.5, 7, None]))
    return AuditEvent(
        event_id=draw(_IDS),
        seq=draw(st.integers(1, 2**64)),
        ts=draw(st.datetimes(min_value=datetime(1000, 1, 1), timezones=st.just(UTC))),
        type=draw(_IDS),
        portfolio=draw(_IDS),
        signal_id=draw(st.none() | _IDS),
        intent_id=draw(st.none() | _IDS),
        account_id=draw(st.none() | _IDS),
        rationale=draw(st.text(max_size=60)),
        data=data,
        prev_hash=draw(_HEX),
        hash=draw(_HEX),
    )


@settings(max_examples=400, deadline=None)
@given(_valid_events())
@example(_worker_events()[2])
def test_a_valid_event_as_the_worker_encodes_it_takes_the_fast_path_exactly(
    event: AuditEvent,
) -> None:
    try:
        doc = encode(event)
    except orjson.JSONEncodeError:
        return  # an integer beyond 64 bits in data: the worker cannot publish it either
    try:
        expected: EventRecord | str = record_from_event(event)
    except UnrepresentableEventError as exc:
        expected = exc.reason
    try:
        fast: EventRecord | str | None = record_from_json(doc)
    except UnrepresentableEventError as exc:
        fast = exc.reason

    assert fast == expected
    _check(doc)
