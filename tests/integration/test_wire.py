"""Large produce requests are built in a thread, on the real broker: the records arrive as
sent, small requests stay on the loop, and the lease fence still decides at the wire."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from orch_worker.adapters.kafka import wire
from orch_worker.adapters.kafka.clients import producer_kwargs
from orch_worker.adapters.kafka.lease import LeaseFencedError
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.config import KafkaConfig
from tests.integration.bounded import STOP_S, within
from tests.integration.test_lease_fence import LINGER_MS, Clock, _lease, _send, _values

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def built_in(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(thread name, batches) of every build `wire` does in its thread."""
    seen: list[tuple[str, int]] = []
    original = wire._build

    def spy(batches: list[Any]) -> None:
        seen.append((threading.current_thread().name, len(batches)))
        original(batches)

    monkeypatch.setattr(wire, "_build", spy)
    return seen


async def _producer(kafka: KafkaConfig, **kw: Any) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(**{**producer_kwargs(kafka), **kw})
    await producer.start()
    return producer


async def test_large_requests_are_built_in_the_thread_and_arrive_intact(
    kafka: KafkaConfig, built_in: list[tuple[str, int]]
) -> None:
    topic = Topics(kafka.topic_prefix).audit
    producer = await _producer(kafka, linger_ms=LINGER_MS)
    assert kafka.compression_type == "zstd"
    try:
        assert wire.build_off_loop(producer, min_bytes=32 * 1024)
        assert wire.build_off_loop(producer), "installed once, however often asked"
        # Random bytes (incompressible, so the request stays large) in one lingering batch.
        big = [os.urandom(4096).hex().encode() for _ in range(40)]
        futures = [await _send(producer, topic, v) for v in big]
        await asyncio.wait_for(asyncio.gather(*futures), 10)
        assert built_in, "a 320 KB request was built on the loop"
        assert all(name.startswith("orch-produce-build") for name, _ in built_in)
        before = len(built_in)
        small = await _send(producer, topic, b"small")
        await asyncio.wait_for(small, 10)
        assert len(built_in) == before, "a small request went through the thread"
    finally:
        await within(producer.stop(), STOP_S, "stopping the producer")
    assert await _values(kafka, topic) == [*big, b"small"]


async def test_the_fence_inside_still_stops_a_large_stale_batch(
    kafka: KafkaConfig, built_in: list[tuple[str, int]]
) -> None:
    """Built in the thread, then refused at the wire: the fence's checks run after the build."""
    t = Topics(kafka.topic_prefix)
    clock = Clock()
    lease = _lease(clock)
    counted: list[int] = []
    producer = await _producer(kafka, linger_ms=LINGER_MS)
    try:
        assert lease.fence(producer, frozenset({t.order_intents}), counted.append)
        assert wire.build_off_loop(producer, min_bytes=1024)
        stale = await _send(producer, t.order_intents, os.urandom(8192).hex().encode())
        lease.join_sent_at = clock.t
        lease.joined()  # a new membership: what was handed over before it must not go
        with pytest.raises(LeaseFencedError):
            await asyncio.wait_for(stale, 10)
        assert built_in, "the stale batch was built in the thread first"
        fresh = await _send(producer, t.order_intents, b"after-the-join")
        await asyncio.wait_for(fresh, 10)
    finally:
        await within(producer.stop(), STOP_S, "stopping the producer")
    assert await _values(kafka, t.order_intents) == [b"after-the-join"]
    assert counted == [1]
