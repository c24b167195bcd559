"""An event the store cannot hold exactly is dead-lettered by the sink; the rest of its batch is
stored and committed.

The sink writes a whole batch at once and checks event by event only when the store refuses
the write, so a NUL that PostgreSQL refuses is the one path where a batch is written twice:
once refused, once without the unstorable event. An event no store can hold (a seq beyond 64
bits, an integer in `data` beyond 64 bits) is set aside when it is decoded, on any backend.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from orch_worker.adapters.db.store import open_store
from orch_worker.adapters.kafka.clients import producer_kwargs
from orch_worker.adapters.kafka.codec import encode
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.audit import AuditDraft, ChainHead, chain
from orch_worker.domain.config import KafkaConfig, OrchConfig, SinkConfig
from tests.integration.bounded import STOP_S, within
from tests.integration.test_sink_app import _committed, _dead_letters, _run_until

pytestmark = pytest.mark.integration

PG_URL = os.environ.get("ORCH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_url() -> Iterator[str]:
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc}")
    schema = f"t_unst_{uuid.uuid4().hex[:12]}"
    try:
        yield f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}"
    finally:
        admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.close()


async def test_an_unstorable_event_is_dead_lettered_and_its_poll_still_committed(
    kafka: KafkaConfig, pg_url: str
) -> None:
    topics = Topics(kafka.topic_prefix)
    group = f"sink-{uuid.uuid4().hex[:8]}"
    cfg = OrchConfig(kafka=kafka, sink=SinkConfig(group_id=group))
    drafts = [AuditDraft("note", f"Note {i}.") for i in range(6)]
    drafts[3] = AuditDraft("note", "A NUL \x00 PostgreSQL text cannot hold.")
    _, events = chain("alpha", ChainHead(), drafts, datetime.now(UTC))
    producer = AIOKafkaProducer(**producer_kwargs(kafka))
    await producer.start()
    try:
        for event in events:
            meta = await producer.send_and_wait(topics.audit, encode(event), key=b"alpha")
    finally:
        await within(producer.stop(), STOP_S, "stopping the producer")

    stats, finish = await _run_until(cfg, pg_url, lambda s: s.records >= len(events))
    await finish()

    assert (stats.events_written, stats.dead_lettered) == (5, 1)
    with open_store(pg_url) as store:
        assert [e.seq for e in store.events("alpha")] == [1, 2, 3, 5, 6]
    [letter] = await _dead_letters(kafka, topics.dead_letter, 1)
    assert letter.error_type == "unstorable"
    assert events[3].event_id in letter.error
    assert "NUL" in letter.error
    tp = TopicPartition(topics.audit, meta.partition)
    assert await _committed(kafka, group, [tp]) == {meta.partition: meta.offset + 1}


async def test_an_event_no_store_can_hold_is_dead_lettered_on_sqlite_too(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    topics = Topics(kafka.topic_prefix)
    group = f"sink-{uuid.uuid4().hex[:8]}"
    db_url = f"sqlite:///{tmp_path / 'audit.db'}"
    cfg = OrchConfig(kafka=kafka, sink=SinkConfig(group_id=group))
    _, events = chain("alpha", ChainHead(), [AuditDraft("note", "Fine.")] * 4, datetime.now(UTC))
    _, odd = chain("odd", ChainHead(), [AuditDraft("note", "Odd.", {"n": 1})] * 2, events[0].ts)
    far = encode(odd[0]).replace(b'"seq":1,', f'"seq":{2**63},'.encode())  # valid, not storable
    huge = encode(odd[1]).replace(b'{"n":1}', f'{{"n":{2**64}}}'.encode())
    values = [encode(events[0]), far, encode(events[1]), huge, *map(encode, events[2:])]
    producer = AIOKafkaProducer(**producer_kwargs(kafka))
    await producer.start()
    try:
        for value in values:
            meta = await producer.send_and_wait(topics.audit, value, key=b"alpha")
    finally:
        await within(producer.stop(), STOP_S, "stopping the producer")

    stats, finish = await _run_until(cfg, db_url, lambda s: s.records >= len(values))
    await finish()

    assert (stats.events_written, stats.dead_lettered) == (4, 2)
    with open_store(db_url) as store:
        assert list(store.events()) == list(events)
    letters = await _dead_letters(kafka, topics.dead_letter, 2)
    assert sorted((d.error_type, d.value.encode()) for d in letters) == sorted(
        [("unstorable", far), ("unstorable", huge)]
    )
    reasons = " ".join(d.error for d in letters)
    assert "64-bit integer column" in reasons
    assert "not representable as UTF-8 JSON" in reasons
    tp = TopicPartition(topics.audit, meta.partition)
    assert await _committed(kafka, group, [tp]) == {meta.partition: meta.offset + 1}
