"""The paper venue against a real Kafka-protocol broker: intents in, execution reports out."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from orch_worker.adapters.kafka.clients import consumer_kwargs, ensure_topics, producer_kwargs
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.adapters.kafka.venue_app import VenueCounters, run_venue
from orch_worker.domain.config import KafkaConfig, OrchConfig, VenueConfig
from orch_worker.domain.models import (
    DeadLetter,
    ExecutionReport,
    IntentKind,
    OrderIntent,
    ReportStatus,
)
from orch_worker.venue.fill_model import TERMINAL_STATUSES
from tests.integration.bounded import STOP_S, within

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

NOW = datetime(2024, 3, 4, 12, 0, 0, tzinfo=UTC)
Records = list[ConsumerRecord[bytes, bytes]]


def orch(kafka: KafkaConfig, **venue: Any) -> OrchConfig:
    fields: dict[str, Any] = {
        "group_id": f"venue-{uuid.uuid4().hex[:8]}",
        "latency_ms_min": 1,
        "latency_ms_max": 5,
        **venue,
    }
    return OrchConfig(kafka=kafka, venue=VenueConfig.model_validate(fields))


def make_intent(intent_id: str, account: str = "ACC-1", **overrides: Any) -> OrderIntent:
    fields: dict[str, Any] = {
        "intent_id": intent_id,
        "plan_id": "P-1",
        "signal_id": "S-1",
        "portfolio": "demo",
        "account_id": account,
        "broker": "paper",
        "symbol": "EURUSD",
        "side": "buy",
        "order_type": "market",
        "quantity": "1.25",
        "reference_price": "1.08456",
        "scheduled_at": NOW,
        "released_at": NOW,
        "rationale": "test",
        **overrides,
    }
    return OrderIntent.model_validate(fields)


async def publish(
    kafka: KafkaConfig, topic: str, records: list[tuple[bytes | None, bytes]]
) -> None:
    producer = AIOKafkaProducer(**producer_kwargs(kafka))
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await within(producer.stop(), STOP_S, "stopping the producer")


async def publish_intents(kafka: KafkaConfig, intents: list[OrderIntent]) -> None:
    topic = Topics(kafka.topic_prefix).order_intents
    await publish(
        kafka, topic, [(i.account_id.encode(), i.model_dump_json().encode()) for i in intents]
    )


async def read_until(
    kafka: KafkaConfig, topic: str, done: Callable[[Records], bool], timeout_s: float = 10.0
) -> Records:
    """Every record of `topic` from the beginning, read until `done` holds (or time runs out)."""
    consumer = AIOKafkaConsumer(**consumer_kwargs(kafka, None))
    await consumer.start()
    try:
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
        assert partitions, f"topic {topic} has no partitions"
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        await consumer.seek_to_beginning()
        records: Records = []
        deadline = time.monotonic() + timeout_s
        while not done(records) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=100)
            for part in batch.values():
                records.extend(part)
        return records
    finally:
        await consumer.stop()


def reports_of(records: Records) -> list[ExecutionReport]:
    return [ExecutionReport.model_validate_json(r.value) for r in records]


def terminals(reports: list[ExecutionReport]) -> dict[str, list[ExecutionReport]]:
    out: dict[str, list[ExecutionReport]] = defaultdict(list)
    for r in reports:
        if r.status in TERMINAL_STATUSES:
            out[r.intent_id].append(r)
    return out


async def committed_total(kafka: KafkaConfig, group: str) -> int:
    """Sum of the group's committed offsets over the intents topic (how many records it acked)."""
    topic = Topics(kafka.topic_prefix).order_intents
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(kafka.partitions)]
        offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
        return sum(max(meta.offset, 0) for meta in offsets.values())
    finally:
        await admin.close()


async def wait_for(check: Callable[[], Any], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout_s}s")


@asynccontextmanager
async def running_venue(
    cfg: OrchConfig, clock: Callable[[], datetime] | None = None
) -> AsyncIterator[VenueCounters]:
    stop, ready, counters = asyncio.Event(), asyncio.Event(), VenueCounters()
    kwargs: dict[str, Any] = {"clock": clock} if clock else {}
    task = asyncio.create_task(run_venue(cfg, stop=stop, ready=ready, counters=counters, **kwargs))
    try:  # a venue that never got ready is stopped too
        ready_wait = asyncio.create_task(ready.wait())
        await asyncio.wait([task, ready_wait], timeout=15, return_when=asyncio.FIRST_COMPLETED)
        ready_wait.cancel()
        if task.done():
            task.result()  # surface the venue's start-up error
        assert ready.is_set(), "venue never got partitions assigned"
        yield counters
    finally:
        stop.set()
        await within(task, STOP_S, "the paper venue's stop")


async def test_each_market_intent_gets_one_terminal_report_and_offsets_commit(
    kafka: KafkaConfig,
) -> None:
    cfg = orch(kafka, partial_fill_probability=0.5, reject_probability={"timeout": 0.2})
    topics = Topics(kafka.topic_prefix)
    intents = [make_intent(f"I-{i}", account=f"ACC-{i % 4}") for i in range(12)]
    async with running_venue(cfg) as counters:
        await publish_intents(kafka, intents)
        records = await read_until(
            kafka, topics.execution_reports, lambda rs: len(terminals(reports_of(rs))) == 12
        )
        await wait_for(lambda: _equals(committed_total(kafka, cfg.venue.group_id), 12))
    reports = reports_of(records)
    by_intent = terminals(reports)
    assert sorted(by_intent) == sorted(i.intent_id for i in intents)
    assert all(len(t) == 1 for t in by_intent.values())
    assert {t[0].status for t in by_intent.values()} <= {ReportStatus.FILLED, ReportStatus.REJECTED}
    for record, report in zip(records, reports, strict=True):
        assert record.key == report.account_id.encode()  # keyed by account
    for intent in intents:
        mine = [r for r in reports if r.intent_id == intent.intent_id]
        assert mine[0].status is ReportStatus.ACCEPTED
        assert mine[0].account_id == intent.account_id
        if mine[-1].status is ReportStatus.FILLED:
            assert mine[-1].filled_quantity == intent.quantity
            assert mine[-1].avg_price is not None
            assert mine[-1].avg_price >= Decimal("1.08456")  # buys slip up, never down
    assert counters.intents_seen == 12
    assert counters.reports_published == len(reports)
    assert counters.duplicates == counters.dead_lettered == 0


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_redelivered_intent_produces_no_new_reports(kafka: KafkaConfig) -> None:
    cfg = orch(kafka, partial_fill_probability=0.0)
    topics = Topics(kafka.topic_prefix)
    intent = make_intent("I-dup")
    async with running_venue(cfg) as counters:
        await publish_intents(kafka, [intent])
        first = await read_until(kafka, topics.execution_reports, lambda rs: len(rs) == 2)
        await publish_intents(kafka, [intent])
        await wait_for(lambda: counters.duplicates == 1)
        await wait_for(lambda: _equals(committed_total(kafka, cfg.venue.group_id), 2))
        await asyncio.sleep(0.2)  # far beyond the venue's 5 ms latency
        again = await read_until(kafka, topics.execution_reports, lambda rs: False, timeout_s=0.5)
    assert [r.status for r in reports_of(first)] == [ReportStatus.ACCEPTED, ReportStatus.FILLED]
    assert [r.value for r in again] == [r.value for r in first]
    assert counters.intents_seen == 1
    assert counters.reports_published == 2


async def test_garbage_lands_in_dead_letter_with_the_reason(kafka: KafkaConfig) -> None:
    cfg = orch(kafka)
    topics = Topics(kafka.topic_prefix)
    missing_fields = orjson.dumps({"intent_id": "I-bad", "account_id": "ACC-1"})
    await publish(
        kafka,
        topics.order_intents,
        [
            (b"ACC-9", b"\xffnot json at all"),
            (b"ACC-1", missing_fields),
            (b"ACC-1", make_intent("I-good").model_dump_json().encode()),
        ],
    )
    async with running_venue(cfg) as counters:
        letters = await read_until(kafka, topics.dead_letter, lambda rs: len(rs) == 2)
        reports = await read_until(kafka, topics.execution_reports, lambda rs: len(rs) == 2)
        await wait_for(lambda: _equals(committed_total(kafka, cfg.venue.group_id), 3))
    parsed = {r.key: DeadLetter.model_validate_json(r.value) for r in letters}
    assert set(parsed) == {b"ACC-9", b"ACC-1"}
    garbage, invalid = parsed[b"ACC-9"], parsed[b"ACC-1"]
    assert garbage.error_type == "malformed_json"
    assert garbage.value_encoding == "base64"  # the raw bytes were not UTF-8: kept, not mangled
    assert invalid.error_type == "schema_invalid"
    assert "plan_id" in invalid.error  # the reason names what is wrong
    assert invalid.value == missing_fields.decode()
    for letter in (garbage, invalid):
        assert letter.original_topic == topics.order_intents
        assert letter.consumer.startswith("venue")
    assert {r.intent_id for r in reports_of(reports)} == {"I-good"}
    assert counters.dead_lettered == 2
    assert counters.intents_seen == 1


async def test_cancel_closes_an_open_limit_order_with_its_partial_fill(
    kafka: KafkaConfig,
) -> None:
    cfg = orch(kafka, partial_fill_probability=1.0)
    topics = Topics(kafka.topic_prefix)
    parent = make_intent("I-lim", order_type="limit", limit_price="1.08", quantity="2.00")
    cancel = make_intent("I-cxl", kind=IntentKind.CANCEL, parent_intent_id="I-lim")
    async with running_venue(cfg):
        await publish_intents(kafka, [parent, cancel])
        records = await read_until(kafka, topics.execution_reports, lambda rs: len(rs) == 3)
    reports = reports_of(records)
    assert [r.status for r in reports] == [
        ReportStatus.ACCEPTED,
        ReportStatus.PARTIALLY_FILLED,
        ReportStatus.CANCELLED,
    ]
    partial, cancelled = reports[1], reports[2]
    assert 0 < partial.filled_quantity < Decimal(2)
    assert cancelled.intent_id == "I-lim"
    assert cancelled.order_id == partial.order_id
    assert cancelled.filled_quantity == partial.filled_quantity
    assert cancelled.avg_price == Decimal("1.08")
    assert cancelled.leaves_quantity == 0


async def test_same_seed_gives_the_same_reports_across_runs(kafka: KafkaConfig) -> None:
    other = kafka.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:10]}."})
    await ensure_topics(other, Topics(other.topic_prefix))
    intents = [make_intent(f"I-{i}", account=f"ACC-{i % 3}") for i in range(10)]
    venue = {"seed": 1234, "partial_fill_probability": 0.5, "reject_probability": {"other": 0.2}}

    async def one_run(kcfg: KafkaConfig) -> list[dict[str, Any]]:
        async with running_venue(orch(kcfg, **venue), clock=lambda: NOW):
            await publish_intents(kcfg, intents)
            topic = Topics(kcfg.topic_prefix).execution_reports
            records = await read_until(
                kcfg, topic, lambda rs: len(terminals(reports_of(rs))) == len(intents)
            )
        return sorted((orjson.loads(r.value) for r in records), key=lambda d: d["report_id"])

    first, second = await one_run(kafka), await one_run(other)
    assert len(first) >= 2 * len(intents)
    assert first == second
    statuses = {r["status"] for r in first}
    assert {"accepted", "filled"} <= statuses  # the run exercised more than one path


async def test_offset_waits_for_all_reports_and_a_crash_redelivers_the_same_reports(
    kafka: KafkaConfig,
) -> None:
    # The fill comes well after the acknowledgement has been read and the commit checked, even
    # on a slow machine: the crash must fall between the two reports.
    cfg = orch(kafka, latency_ms_min=2000, latency_ms_max=2100, partial_fill_probability=0.0)
    topics = Topics(kafka.topic_prefix)
    group = cfg.venue.group_id
    stop, ready = asyncio.Event(), asyncio.Event()
    crashed = asyncio.create_task(run_venue(cfg, stop=stop, ready=ready))
    await asyncio.wait_for(ready.wait(), 15)
    await publish_intents(kafka, [make_intent("I-slow")])
    before = await read_until(kafka, topics.execution_reports, lambda rs: len(rs) == 1)
    assert [r.status for r in reports_of(before)] == [ReportStatus.ACCEPTED]
    await asyncio.sleep(0.15)  # several commit rounds of the venue's loop
    assert await committed_total(kafka, group) == 0  # the fill is not out yet: no commit
    crashed.cancel()  # a crash between the two reports
    with pytest.raises(asyncio.CancelledError):
        await crashed
    async with running_venue(cfg):  # same group: the intent is redelivered
        records = await read_until(
            kafka, topics.execution_reports, lambda rs: len(terminals(reports_of(rs))) == 1
        )
        await wait_for(lambda: _equals(committed_total(kafka, group), 1))
    reports = reports_of(records)
    assert [r.status for r in reports] == [
        ReportStatus.ACCEPTED,
        ReportStatus.ACCEPTED,
        ReportStatus.FILLED,
    ]
    # The restarted venue re-sent the very same report: the orchestrator dedupes it by id.
    assert reports[0].report_id == reports[1].report_id
