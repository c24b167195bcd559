"""An event PostgreSQL cannot hold exactly is dead-lettered by the sink; the rest of its poll is
stored and committed.

The sink writes a whole poll at once and checks event by event only when the store refuses
the write, so this is the one path where a batch is written twice: once refused, once without
the unstorable event.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from orch_worker.adapters.db.store import open_store
from orch_worker.adapters.kafka.clients import producer_kwargs
from orch_worker.adapters.kafka.codec import encode
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.audit import AuditDraft, ChainHead, chain
from orch_worker.domain.config import KafkaConfig, OrchConfig, SinkConfig
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
        await producer.stop()

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
