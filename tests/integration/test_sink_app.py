"""The audit sink on a real Kafka-protocol broker, into SQLite and PostgreSQL.

Redelivery is simulated the way it happens in production (the same event published twice), a
poison record sits between good ones, and a second sink in the same group proves the offsets were
committed: it must read only what was published after the first one stopped.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from orch_worker.adapters.db.rows import EventRecord
from orch_worker.adapters.db.store import (
    AuditStore,
    StoreUnavailableError,
    WriteResult,
    open_store,
)
from orch_worker.adapters.kafka import sink_app
from orch_worker.adapters.kafka.clients import consumer_kwargs, producer_kwargs
from orch_worker.adapters.kafka.codec import encode
from orch_worker.adapters.kafka.sink_app import SinkStats, run_sink
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.audit import AuditDraft, ChainHead, chain, verify_chain
from orch_worker.domain.config import KafkaConfig, OrchConfig, SinkConfig
from orch_worker.domain.models import AuditEvent, DeadLetter
from tests.integration.bounded import STOP_S, within

pytestmark = pytest.mark.integration

PG_URL = os.environ.get("ORCH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
TIMEOUT_S = 15.0


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit.db'}"
        return
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc}")
    schema = f"t_sink_{uuid.uuid4().hex[:12]}"
    try:
        yield f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}"
    finally:
        admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.close()


async def _eventually(check: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def _run_until(
    cfg: OrchConfig, db_url: str, done: Callable[[SinkStats], bool]
) -> tuple[SinkStats, Callable[[], Awaitable[None]]]:
    """Start a sink; return its stats once `done` holds, and a coroutine that stops it."""
    stop, ready, stats = asyncio.Event(), asyncio.Event(), SinkStats()
    task = asyncio.create_task(run_sink(cfg, stop=stop, ready=ready, db_url=db_url, stats=stats))

    async def finish() -> None:
        stop.set()
        await within(task, TIMEOUT_S, "the sink's stop")

    try:
        await _eventually(lambda: ready.is_set() or task.done(), "partition assignment")
        await _eventually(lambda: done(stats) or task.done(), "the sink to catch up")
        if task.done():
            task.result()  # re-raises the sink's error
            pytest.fail("the sink stopped by itself")
    except BaseException:
        await finish()
        raise
    return stats, finish


async def _dead_letters(kafka: KafkaConfig, topic: str, expected: int) -> list[DeadLetter]:
    consumer = AIOKafkaConsumer(**consumer_kwargs(kafka, None))
    consumer.assign([TopicPartition(topic, p) for p in range(kafka.partitions)])
    await consumer.start()
    try:
        await consumer.seek_to_beginning()
        letters: list[DeadLetter] = []
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while len(letters) < expected and asyncio.get_running_loop().time() < deadline:
            polled = await consumer.getmany(timeout_ms=200)
            for records in polled.values():
                letters.extend(DeadLetter.model_validate_json(r.value) for r in records)
        return letters
    finally:
        await consumer.stop()


async def _committed(kafka: KafkaConfig, group: str, tps: list[TopicPartition]) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
        return {tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}
    finally:
        await admin.close()


def _events(portfolio: str, n: int) -> list[AuditEvent]:
    drafts = [
        AuditDraft(
            "intent_transition",
            f"Step {i} of {portfolio}.",
            {"intent_status": "filled" if i == n - 1 else "working"},
            signal_id=f"{portfolio}-sig",
            intent_id=f"{portfolio}-int",
            account_id="ACC-1",
        )
        for i in range(n)
    ]
    _, events = chain(portfolio, ChainHead(), drafts, datetime.now(UTC))
    return list(events)


async def test_sink_stores_each_event_once_dead_letters_garbage_and_commits(
    kafka: KafkaConfig, db_url: str
) -> None:
    topics = Topics(kafka.topic_prefix)
    group = f"sink-{uuid.uuid4().hex[:8]}"
    cfg = OrchConfig(kafka=kafka, sink=SinkConfig(group_id=group, batch_size=7))
    alpha, beta = _events("alpha", 25), _events("beta", 18)
    redelivered = alpha[3:8] + beta[:2]
    poison = [(b"bad-json", b"{not json"), (b"bad-schema", b'{"event_id": "x"}')]

    last_offset: dict[int, int] = {}
    sent_poison: dict[bytes, tuple[int, int]] = {}
    producer = AIOKafkaProducer(**producer_kwargs(kafka))
    await producer.start()
    try:
        for i, event in enumerate(alpha + beta + redelivered):
            if i == 10:  # poison in the middle: the records after it must still be stored
                for key, value in poison:
                    meta = await producer.send_and_wait(topics.audit, value, key=key)
                    sent_poison[key] = (meta.partition, meta.offset)
                    last_offset[meta.partition] = max(
                        last_offset.get(meta.partition, -1), meta.offset
                    )
            meta = await producer.send_and_wait(
                topics.audit, encode(event), key=event.portfolio.encode()
            )
            last_offset[meta.partition] = max(last_offset.get(meta.partition, -1), meta.offset)
    finally:
        await within(producer.stop(), STOP_S, "stopping the producer")
    total = len(alpha) + len(beta) + len(redelivered) + len(poison)

    stats, finish = await _run_until(cfg, db_url, lambda s: s.records >= total)
    await finish()

    assert stats.records == total
    assert stats.events_written == len(alpha) + len(beta)
    assert stats.duplicates == len(redelivered)
    assert stats.dead_lettered == len(poison)
    assert stats.conflicts == 0
    # One transaction holds at most POLLS_PER_WRITE polls of batch_size records.
    assert stats.batches >= -(-total // (7 * sink_app.POLLS_PER_WRITE))
    with open_store(db_url) as store:
        assert store.count() == len(alpha) + len(beta)
        assert list(store.events("alpha")) == alpha
        assert list(store.events("beta")) == beta
        assert verify_chain(store.events("alpha")) is None
        assert store.intent_statuses("alpha-sig") == {"alpha-int": "filled"}

    letters = await _dead_letters(kafka, topics.dead_letter, len(poison))
    assert {(d.key, d.value, d.error_type) for d in letters} == {
        ("bad-json", "{not json", "malformed_json"),
        ("bad-schema", '{"event_id": "x"}', "schema_invalid"),
    }
    for d in letters:
        assert d.original_topic == topics.audit
        assert (d.partition, d.offset) == sent_poison[(d.key or "").encode()]
        assert d.error  # the reason, for the person reading the dead letter

    tps = [TopicPartition(topics.audit, p) for p in range(kafka.partitions)]
    expected_commits = {p: o + 1 for p, o in last_offset.items()}
    assert await _committed(kafka, group, tps) == expected_commits
    assert {tp.partition: o for tp, o in stats.committed.items()} == expected_commits

    # A restarted sink in the same group reads only what came after the commit: one new event
    # per partition. Records arrive in order within a partition, so once all three are stored,
    # any uncommitted old record would have been read (and counted) before them.
    _, late = chain("late", ChainHead(), [AuditDraft("note", "Late.")] * 3, alpha[0].ts)
    producer = AIOKafkaProducer(**producer_kwargs(kafka))
    await producer.start()
    try:
        for partition, event in enumerate(late):
            await producer.send_and_wait(
                topics.audit, encode(event), key=b"late", partition=partition
            )
    finally:
        await within(producer.stop(), STOP_S, "stopping the producer")

    again, finish = await _run_until(cfg, db_url, lambda s: s.records >= len(late))
    await asyncio.sleep(0.3)  # a few more polls: nothing else may turn up
    await finish()

    assert (again.records, again.events_written, again.duplicates) == (3, 3, 0)
    assert again.dead_lettered == 0
    with open_store(db_url) as store:
        assert store.count() == len(alpha) + len(beta) + len(late)


class _FlakyStore:
    """A real store whose first writes fail the way a locked or unreachable database does."""

    def __init__(self, inner: AuditStore, failures: int) -> None:
        self._inner = inner
        self.failures = failures

    def write_records(self, records: Sequence[EventRecord]) -> WriteResult:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailableError("database is locked (simulated)")
        return self._inner.write_records(records)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_a_batch_the_database_refuses_is_retried_then_committed(
    kafka: KafkaConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = Topics(kafka.topic_prefix)
    db_url = f"sqlite:///{tmp_path / 'audit.db'}"
    group = f"sink-{uuid.uuid4().hex[:8]}"
    cfg = OrchConfig(kafka=kafka, sink=SinkConfig(group_id=group))
    monkeypatch.setattr(sink_app, "RETRY_BACKOFF_S", (0.05,))
    monkeypatch.setattr(sink_app, "open_store", lambda url: _FlakyStore(open_store(url), 2))
    events = _events("alpha", 5)
    producer = AIOKafkaProducer(**producer_kwargs(kafka))
    await producer.start()
    try:
        for event in events:
            meta = await producer.send_and_wait(topics.audit, encode(event), key=b"alpha")
    finally:
        await within(producer.stop(), STOP_S, "stopping the producer")

    stats, finish = await _run_until(cfg, db_url, lambda s: s.records >= len(events))
    await finish()

    assert (stats.write_retries, stats.events_written, stats.duplicates) == (2, 5, 0)
    committed = await _committed(kafka, group, [TopicPartition(topics.audit, meta.partition)])
    assert committed == {meta.partition: meta.offset + 1}
    with open_store(db_url) as store:
        assert list(store.events()) == events


class _SlowStore:
    """A real store whose writes take a while, so a rebalance finds a sink mid-batch."""

    def __init__(self, inner: AuditStore, seconds: float) -> None:
        self._inner = inner
        self._seconds = seconds

    def write_records(self, records: Sequence[EventRecord]) -> WriteResult:
        time.sleep(self._seconds)
        return self._inner.write_records(records)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_a_second_sink_joining_the_group_takes_partitions_and_nothing_is_lost(
    kafka: KafkaConfig, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first sink writes and commits what it fetched before its partitions move (the
    rebalance listener), the second reads on from the commits: every event is stored once."""
    topics = Topics(kafka.topic_prefix)
    group = f"sink-{uuid.uuid4().hex[:8]}"
    cfg = OrchConfig(kafka=kafka, sink=SinkConfig(group_id=group, batch_size=20))
    monkeypatch.setattr(sink_app, "open_store", lambda url: _SlowStore(open_store(url), 0.15))
    chains = {p: _events(p, 150) for p in ("alpha", "beta", "gamma", "delta", "epsilon")}
    events = [e for chain_ in chains.values() for e in chain_]
    last_offset: dict[int, int] = {}
    producer = AIOKafkaProducer(**producer_kwargs(kafka))
    await producer.start()
    try:
        sent = [
            await producer.send(topics.audit, encode(e), key=e.portfolio.encode()) for e in events
        ]
        for meta in await asyncio.gather(*sent):
            last_offset[meta.partition] = max(last_offset.get(meta.partition, -1), meta.offset)
    finally:
        await within(producer.stop(), STOP_S, "stopping the producer")

    first, finish_first = await _run_until(cfg, db_url, lambda s: s.records > 0)
    second, finish_second = await _run_until(cfg, db_url, lambda s: True)
    try:
        await _eventually(
            lambda: first.events_written + second.events_written >= len(events), "every event"
        )
        tps = [TopicPartition(topics.audit, p) for p in range(kafka.partitions)]
        expected_commits = {p: o + 1 for p, o in last_offset.items()}
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while await _committed(kafka, group, tps) != expected_commits:
            assert asyncio.get_running_loop().time() < deadline, "offsets never caught up"
            await asyncio.sleep(0.1)
    finally:
        await finish_second()
        await finish_first()

    assert first.events_written + second.events_written == len(events)  # each one new once
    assert first.records < len(events) + first.duplicates  # the first did not read it all...
    assert second.records > 0  # ...the group gave the newcomer partitions
    with open_store(db_url) as store:
        assert store.count() == len(events)
        for portfolio, chain_ in chains.items():
            assert list(store.events(portfolio)) == chain_
            assert verify_chain(store.events(portfolio)) is None


def test_a_batch_decoded_in_steps_never_skips_a_record_that_failed_to_decode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop decodes part of a batch while the store commits the one before; if that fails
    unexpectedly, the write decodes the same record again (and fails loudly), never past it."""
    tp = TopicPartition("audit", 0)
    events = _events("alpha", 4)
    batch = sink_app._Batch()
    batch.add(
        {
            tp: [
                ConsumerRecord("audit", 0, i, 0, 0, b"alpha", encode(e), None, 5, 0, [])
                for i, e in enumerate(events[:2])
            ]
        }
    )
    assert [r.row[0] for r in batch.decode()] == [e.event_id for e in events[:2]]

    batch.add(
        {
            tp: [
                ConsumerRecord("audit", 0, i, 0, 0, b"alpha", encode(e), None, 5, 0, [])
                for i, e in enumerate(events[2:], 2)
            ]
        }
    )
    real = sink_app.decode_record
    broken = encode(events[3])

    def flaky(value: bytes | None) -> EventRecord:
        if value == broken:
            raise RuntimeError("a bug")
        return real(value)

    monkeypatch.setattr(sink_app, "decode_record", flaky)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            batch.decode()
        assert batch.decoded == 3
    monkeypatch.setattr(sink_app, "decode_record", real)
    assert [r.row[0] for r in batch.decode()] == [e.event_id for e in events]
    assert len(batch.origins) == len(events)


def test_running_sinks_tune_the_process_and_the_last_one_restores_it() -> None:
    """A higher young GC threshold and a shorter GIL switch interval while any sink runs."""
    threshold, interval = gc.get_threshold(), sys.getswitchinterval()
    try:
        gc.set_threshold(700, 10, 10)
        sys.setswitchinterval(0.005)
        with sink_app._tuned_for_sinks():
            with sink_app._tuned_for_sinks():
                assert gc.get_threshold() == (sink_app.YOUNG_THRESHOLD, 10, 10)
                assert sys.getswitchinterval() == pytest.approx(sink_app.SWITCH_INTERVAL_S)
            assert gc.get_threshold() == (sink_app.YOUNG_THRESHOLD, 10, 10)
            assert sys.getswitchinterval() == pytest.approx(sink_app.SWITCH_INTERVAL_S)
        assert gc.get_threshold() == (700, 10, 10)
        assert sys.getswitchinterval() == pytest.approx(0.005)
    finally:
        gc.set_threshold(*threshold)
        sys.setswitchinterval(interval)
