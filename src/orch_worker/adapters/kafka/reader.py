"""Reading a topic from the beginning up to its current end, without a consumer group.

End offsets are read from fetch responses (the high watermark) rather than from
`end_offsets()`, which the embedded broker reports wrongly after batched produces.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from orch_worker.adapters.kafka.clients import consumer_kwargs, producer_kwargs
from orch_worker.domain.config import KafkaConfig


async def partition_count(cfg: KafkaConfig, topic: str) -> int:
    """How many partitions `topic` has, from the cluster's metadata."""
    producer = AIOKafkaProducer(**producer_kwargs(cfg))
    await producer.start()
    try:
        return len(await producer.partitions_for(topic))
    finally:
        await producer.stop()


async def read_to_end(
    cfg: KafkaConfig,
    topic: str,
    on_record: Callable[[ConsumerRecord[bytes, bytes]], None],
    *,
    idle_timeout_s: float = 2.0,
    partitions: Collection[int] | None = None,
) -> int:
    """Feed every record now in `topic` to `on_record` in partition order; returns the count.

    Stops when every partition's position has reached its high watermark, or when nothing has
    arrived for `idle_timeout_s` while some partition never reported one (an empty partition).
    """
    consumer = AIOKafkaConsumer(**consumer_kwargs(cfg, None))
    await consumer.start()
    count = 0
    try:
        only = partitions
        partitions = consumer.partitions_for_topic(topic)
        for _ in range(50):
            if partitions:
                break
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic)
            await asyncio.sleep(0.05)
        if not partitions:
            return 0
        wanted = sorted(partitions) if only is None else sorted(set(partitions) & set(only))
        if not wanted:
            return 0
        tps = [TopicPartition(topic, p) for p in wanted]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        last_progress = time.monotonic()
        while True:
            batch = await consumer.getmany(*tps, timeout_ms=100, max_records=5000)
            for records in batch.values():
                for rec in records:
                    on_record(rec)
                    count += 1
            if batch:
                last_progress = time.monotonic()
            caught_up = True
            for tp in tps:
                hw = consumer.highwater(tp)
                if hw is None or await consumer.position(tp) < hw:
                    caught_up = False
            if caught_up or time.monotonic() - last_progress > idle_timeout_s:
                return count
    finally:
        await consumer.stop()
