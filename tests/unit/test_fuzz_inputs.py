"""Hostile input, fuzzed: every input topic's payloads through the worker's real decode-and-
decide path. The worker never raises, never acts on invalid input, and dead-letters every
refused record with its reason. `ORCH_FUZZ_EXAMPLES` sets payloads per topic: 1,000 by default
for a quick run, 10,000 in `make test` (and so in CI), 100,000 in `make fuzz-long`."""

from __future__ import annotations

import json
import logging
import os
from decimal import Decimal
from typing import Any

import orjson
import pytest
from aiokafka import ConsumerRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orch_worker.adapters.kafka.publisher import Batch
from orch_worker.adapters.kafka.worker_app import Worker
from tests import factories as f

PER_TOPIC = int(os.environ.get("ORCH_FUZZ_EXAMPLES", "1000"))
STRATEGIES_PER_TOPIC = 3  # bytes, JSON, one hostile field (reports get a fourth on top)
EXAMPLES = max(-(-PER_TOPIC // STRATEGIES_PER_TOPIC), 1)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1", "0", "", "1" * 400]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=10,
)
hostile = st.sampled_from(
    [
        "NaN",
        "Infinity",
        "-1",
        "0",
        "1e400",
        "-1e-400",
        "99999999999999999999999999999",
        "",
        None,
        True,
        [],
        {},
        "buy",
        "2026-13-45T99:99:99Z",
        "2026-11-21T12:00:00",
        "x" * 5000,
        "ACC-404",
        "ZZZ/ZZZ",
    ]
)

_offset = 0


def record(
    topic: str, value: bytes | None, key: bytes | None = b"k"
) -> ConsumerRecord[bytes, bytes]:
    global _offset  # noqa: PLW0603 - unique offsets make every dead letter identifiable
    _offset += 1
    return ConsumerRecord(
        topic=topic,
        partition=0,
        offset=_offset,
        timestamp=0,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key or b""),
        serialized_value_size=len(value or b""),
        headers=(),
    )


# Every refusal logs a warning; thousands of them would measure logging, not the worker.
logging.getLogger("orch_worker").setLevel(logging.ERROR)


def make_worker() -> Worker:
    cfg = f.config()
    worker = Worker(cfg, clock=lambda: f.NOW, http=False)
    for a in cfg.accounts:
        worker.accounts.update(f.account(a))
    worker.recovered = True
    worker.n_partitions, worker.owned = 1, {0}  # what the group would assign a lone worker
    return worker


WORKER = make_worker()
T = WORKER.topics
# One planned signal, so fuzzed reports can name real intents.
_seed_batch = Batch()
WORKER._decide(record(T.signals, f.signal("seed").model_dump_json().encode(), b"demo"), _seed_batch)
INTENTS = [(iid, sig_and_pf) for iid, sig_and_pf in WORKER.intent_index.items()]
assert len(INTENTS) == 3

VALID: dict[str, dict[str, Any]] = {
    T.signals: orjson.loads(f.signal("v").model_dump_json()),
    T.account_state: orjson.loads(f.account("ACC-1").model_dump_json()),
    T.execution_reports: orjson.loads(
        f.report(INTENTS[0][0], "ACC-1", "filled", "0.34").model_dump_json()
    ),
    T.control: orjson.loads(f.control("c", "pause_account", account_id="ACC-1").model_dump_json()),
}


def feed(topic: str, value: bytes | None) -> Batch:
    """Decide one record exactly as the worker does; it must never raise."""
    batch = Batch()
    if topic == T.account_state:
        WORKER._on_account(record(topic, value))  # the table's real entry point
        return batch
    WORKER._decide(record(topic, value), batch)  # the loop's real entry point
    return batch


def dead_letters(batch: Batch) -> list[dict[str, Any]]:
    return [orjson.loads(o.value) for o in batch.outputs if o.topic == T.dead_letter]


def intents_out(batch: Batch) -> list[dict[str, Any]]:
    return [orjson.loads(o.value) for o in batch.outputs if o.topic == T.order_intents]


def assert_refused_or_sane(batch: Batch) -> None:
    letters = dead_letters(batch)
    assert all(d["error_type"] != "processing_error" for d in letters), letters
    assert all(d["error"] for d in letters)
    if letters:
        assert not intents_out(batch), "acted on input it refused"
    for i in intents_out(batch):
        assert Decimal(i["quantity"]) > 0
        assert i["account_id"] in WORKER.cfg.accounts


TOPICS = [T.signals, T.account_state, T.execution_reports, T.control]


@pytest.mark.parametrize("topic", TOPICS)
@FUZZ
@given(raw=st.binary(max_size=300))
def test_random_bytes_are_refused_never_crash(topic: str, raw: bytes) -> None:
    assert_refused_or_sane(feed(topic, raw))


@pytest.mark.parametrize("topic", TOPICS)
@FUZZ
@given(doc=json_values)
def test_random_json_is_refused_never_crash(topic: str, doc: Any) -> None:
    batch = feed(topic, json.dumps(doc).encode())  # stdlib: integers beyond 64 bits too
    assert_refused_or_sane(batch)
    if topic != T.account_state:
        assert dead_letters(batch), "arbitrary JSON is never a valid event"


@pytest.mark.parametrize("topic", TOPICS)
@FUZZ
@given(data=st.data())
def test_valid_events_with_one_hostile_field(topic: str, data: st.DataObject) -> None:
    doc = dict(VALID[topic])
    field = data.draw(st.sampled_from(sorted(doc)))
    action = data.draw(st.sampled_from(["drop", "hostile", "any", "extra"]))
    if action == "drop":
        doc.pop(field)
    elif action == "hostile":
        doc[field] = data.draw(hostile)
    elif action == "any":
        doc[field] = data.draw(json_values)
    else:
        doc[data.draw(st.text(min_size=1, max_size=10))] = data.draw(json_scalars)
    if topic == T.signals:
        doc["signal_id"] = f"fz-{data.draw(st.integers(0, 10**9))}"
    if topic == T.control:
        doc["command_id"] = f"fz-{data.draw(st.integers(0, 10**9))}"
    assert_refused_or_sane(feed(topic, json.dumps(doc).encode()))


@pytest.mark.parametrize("topic", [T.execution_reports])
@FUZZ
@given(
    which=st.integers(0, 2),
    status=st.sampled_from(
        ["accepted", "partially_filled", "filled", "rejected", "cancelled", "expired"]
    ),
    filled=st.decimals(min_value=0, max_value=1000, places=2, allow_nan=False),
    n=st.integers(1, 50),
    reason=st.none() | st.sampled_from(["insufficient_margin", "timeout", "other"]),
)
def test_out_of_order_duplicate_and_overfilling_reports(
    topic: str, which: int, status: str, filled: Decimal, n: int, reason: str | None
) -> None:
    iid, _ = INTENTS[which]
    account = WORKER.portfolios["demo"].signals["seed"].intent(iid).intent.account_id  # type: ignore[union-attr]
    doc = orjson.loads(
        f.report(iid, account, status, str(filled), n=n, reason_code=reason).model_dump_json()
        if status != "rejected" or reason
        else f.report(iid, account, "accepted", str(filled), n=n).model_dump_json()
    )
    before = WORKER.portfolios["demo"].signals["seed"].intent(iid)
    batch = feed(topic, orjson.dumps(doc))
    assert_refused_or_sane(batch)
    after = WORKER.portfolios["demo"].signals["seed"].intent(iid)
    assert before is not None
    assert after is not None
    assert after.filled >= before.filled, "filled quantity never decreases"


@pytest.mark.parametrize("topic", TOPICS)
def test_an_oversized_message_is_refused_with_its_reason(topic: str) -> None:
    doc = dict(VALID[topic])
    doc["padding"] = "x" * 2_000_000
    letters = dead_letters(feed(topic, orjson.dumps(doc)))
    if topic == T.account_state:
        return  # the table logs and counts it; each worker reads the table whole
    assert letters
    assert letters[0]["error_type"] == "schema_invalid"
    assert letters[0]["value_truncated"] is True
    assert letters[0]["value_bytes"] > 2_000_000
    assert len(letters[0]["value"]) <= 65_536
