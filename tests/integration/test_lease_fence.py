"""The lease checked again at the wire, on the real broker: records a worker handed to its
producer under one group membership are never sent under another, or without the lease.

The producer lingers, so what a test hands over sits in its accumulator, as it would in a
process frozen between handing records over and the producer sending them; the test then
changes the lease, as the process would find it on waking."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from orch_worker.adapters.kafka.clients import consumer_kwargs, producer_kwargs
from orch_worker.adapters.kafka.lease import Lease, LeaseFencedError
from orch_worker.adapters.kafka.publisher import LeaseLostError
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.config import KafkaConfig
from tests.integration.bounded import STOP_S, within

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LINGER_MS = 300


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _lease(clock: Clock) -> Lease:
    lease = Lease(2.0, 0.4, clock)
    lease.attached = True  # as `attach` leaves it; the test moves the lease itself
    lease.renew(clock.t)
    return lease


async def _producer(
    kafka: KafkaConfig, lease: Lease, fenced: str, counted: list[int]
) -> AIOKafkaProducer:
    """A lingering producer fenced by `lease` for topic `fenced`; fenced batches go to `counted`."""
    producer = AIOKafkaProducer(**{**producer_kwargs(kafka), "linger_ms": LINGER_MS})
    await producer.start()
    assert lease.fence(producer, frozenset({fenced}), counted.append)
    return producer


async def _held_at_the_wire(
    producer: AIOKafkaProducer, lease: Lease, clock: Clock, topic: str, value: bytes
) -> asyncio.Future[Any]:
    """Hand `value` over with the lease run out (within what the wire waits): it stays unsent."""
    clock.t += lease.length_s + 0.5
    fut = await _send(producer, topic, value)
    await asyncio.sleep(2 * LINGER_MS / 1000)
    assert not fut.done(), "held at the wire while the lease is out"
    return fut


async def _values(kafka: KafkaConfig, topic: str) -> list[bytes]:
    """Every value on `topic` (partition 0) now."""
    consumer = AIOKafkaConsumer(**consumer_kwargs(kafka, group_id=None))
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = (await consumer.end_offsets([tp]))[tp]
        await consumer.seek_to_beginning(tp)
        values: list[bytes] = []
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=500)
            values += [r.value for r in batch.get(tp, []) if r.value is not None]
        return values
    finally:
        await within(consumer.stop(), STOP_S, "stopping the consumer")


async def _send(producer: AIOKafkaProducer, topic: str, value: bytes) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = await producer.send(topic, value, partition=0)
    return fut


async def test_records_handed_over_before_a_new_join_are_never_sent(kafka: KafkaConfig) -> None:
    """The waking process rejoined and holds a lease again: still, what it handed over for its
    old membership fails, while other topics' records of the same request go out."""
    t = Topics(kafka.topic_prefix)
    clock = Clock()
    lease = _lease(clock)
    counted: list[int] = []
    producer = await _producer(kafka, lease, t.order_intents, counted)
    try:
        stale = await _send(producer, t.order_intents, b"handed-over-before-the-join")
        other = await _send(producer, t.dead_letter, b"not-a-decision")
        lease.join_sent_at = clock.t
        lease.joined()  # a new membership, and the lease held under it
        assert lease.held()
        with pytest.raises(LeaseFencedError) as raised:
            await asyncio.wait_for(stale, 10)
        assert isinstance(raised.value, LeaseLostError)
        await asyncio.wait_for(other, 10)
        fresh = await _send(producer, t.order_intents, b"handed-over-after-the-join")
        await asyncio.wait_for(fresh, 10)
    finally:
        await within(producer.stop(), STOP_S, "stopping the producer")
    assert await _values(kafka, t.order_intents) == [b"handed-over-after-the-join"]
    assert await _values(kafka, t.dead_letter) == [b"not-a-decision"]
    assert counted == [1], "one batch fenced, and the worker's metric hears of it"


async def test_a_lease_that_ran_out_waits_for_a_heartbeat_of_the_same_membership(
    kafka: KafkaConfig,
) -> None:
    """A busy loop let the lease lapse; the late heartbeat renews it and the batch goes."""
    t = Topics(kafka.topic_prefix)
    clock = Clock()
    lease = _lease(clock)
    counted: list[int] = []
    producer = await _producer(kafka, lease, t.order_intents, counted)
    try:
        fut = await _held_at_the_wire(
            producer, lease, clock, t.order_intents, b"sent-after-the-heartbeat"
        )
        lease.renew(clock.t)
        await asyncio.wait_for(fut, 10)
    finally:
        await within(producer.stop(), STOP_S, "stopping the producer")
    assert await _values(kafka, t.order_intents) == [b"sent-after-the-heartbeat"]
    assert counted == []


@pytest.mark.parametrize("ending", ["refused heartbeat", "silence", "stopping"])
async def test_a_membership_that_ended_sends_nothing_it_handed_over(
    kafka: KafkaConfig, ending: str
) -> None:
    """Stopping counts as an end: the held batch fails at once, not a lease length later
    (what a crash would do; the changelog never got it and the next owner decides again)."""
    t = Topics(kafka.topic_prefix)
    clock = Clock()
    lease = _lease(clock)
    counted: list[int] = []
    producer = await _producer(kafka, lease, t.order_intents, counted)
    try:
        fut = await _held_at_the_wire(producer, lease, clock, t.order_intents, b"never-sent")
        within_s = 10.0
        if ending == "refused heartbeat":
            lease.drop()
        elif ending == "silence":
            clock.t += lease.length_s + 0.1  # as long again with no heartbeat at all
        else:
            lease.stop_waiting()
            within_s = lease.length_s / 4
        with pytest.raises(LeaseFencedError):
            await asyncio.wait_for(fut, within_s)
    finally:
        await within(producer.stop(), STOP_S, "stopping the producer")
    assert await _values(kafka, t.order_intents) == []
    assert counted == [1]
