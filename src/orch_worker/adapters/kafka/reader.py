"""Reading a topic from the beginning up to its current end, without a consumer group.

A read that stops early is how a restarted worker comes back with stale state and releases an
order twice, so there is no idle cut-off here: a read ends when every partition is provably at
its end, or fails loudly after `timeout_s`.

"At its end" comes from one of two proofs:

* a high watermark taken from a fetch response (aiokafka records one for every partition in
  every successful fetch, empty or not; `end_offsets()` is not used because the embedded
  broker reports it wrongly after batched produces);
* for a topic this process owns, a fence: a marker record appended to each partition before
  reading, whose offset comes back in the produce acknowledgement. Reading past it proves that
  everything written before the read began has been seen, whatever the broker says about its
  watermarks. Fence records carry the `orch-fence` header and are never handed to `on_record`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from orch_worker.adapters.kafka.clients import consumer_kwargs, producer_kwargs
from orch_worker.domain.config import KafkaConfig

log = logging.getLogger(__name__)

FENCE_HEADER = "orch-fence"
PROGRESS_EVERY_S = 5.0


class ReadIncompleteError(TimeoutError):
    """The topic could not be read to its end in time; the caller must not act on a part."""


def is_fence(rec: ConsumerRecord[bytes, bytes]) -> bool:
    return any(k == FENCE_HEADER for k, _ in rec.headers or ())


async def partition_count(cfg: KafkaConfig, topic: str) -> int:
    """How many partitions `topic` has, from the cluster's metadata."""
    producer = AIOKafkaProducer(**producer_kwargs(cfg))
    await producer.start()
    try:
        return len(await producer.partitions_for(topic))
    finally:
        await producer.stop()


async def append_fences(
    cfg: KafkaConfig, topic: str, partitions: Collection[int], value: bytes
) -> dict[int, int]:
    """Append one fence record to each partition; returns each fence's offset."""
    producer = AIOKafkaProducer(**producer_kwargs(cfg))
    await producer.start()
    try:
        futures = {
            p: await producer.send(
                topic,
                value=value,
                partition=p,
                headers=[(FENCE_HEADER, b"1")],
            )
            for p in partitions
        }
        return {p: (await f).offset for p, f in futures.items()}
    finally:
        await producer.stop()


async def _partitions(
    consumer: AIOKafkaConsumer, topic: str, only: Collection[int] | None
) -> list[int]:
    """The topic's partitions (limited to `only`), waiting briefly for fresh metadata."""
    known = consumer.partitions_for_topic(topic)
    for _ in range(50):
        if known:
            break
        await consumer._client.force_metadata_update()
        known = consumer.partitions_for_topic(topic)
        await asyncio.sleep(0.05)
    if not known:
        return []
    return sorted(known) if only is None else sorted(set(known) & set(only))


async def _behind(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], ends: dict[int, int | None]
) -> dict[int, tuple[int, int | None]]:
    """(position, end) of each partition not yet at its end; a None end is not yet known."""
    out: dict[int, tuple[int, int | None]] = {}
    for tp in tps:
        end = ends[tp.partition]
        if end is None:
            end = consumer.highwater(tp)
        position = await consumer.position(tp)
        if end is None or position < end:
            out[tp.partition] = (position, end)
    return out


async def _seek(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], start: Mapping[int, int]
) -> None:
    from_beginning = [tp for tp in tps if tp.partition not in start]
    if from_beginning:
        await consumer.seek_to_beginning(*from_beginning)
    for tp in tps:
        if tp.partition in start:
            consumer.seek(tp, start[tp.partition])


async def read_to_end(
    cfg: KafkaConfig,
    topic: str,
    on_record: Callable[[ConsumerRecord[bytes, bytes]], None],
    *,
    partitions: Collection[int] | None = None,
    fence: bool = False,
    fence_value: bytes = b'{"type":"fence"}',
    on_fence: Callable[[ConsumerRecord[bytes, bytes]], None] | None = None,
    ends: Mapping[int, int] | None = None,
    start: Mapping[int, int] | None = None,
    timeout_s: float = 300.0,
) -> int:
    """Feed every record now in `topic` to `on_record` in partition order; returns the count.

    With `fence`, a marker (`fence_value`) is appended to each partition first and the read
    ends past it; with `ends` (one past fences appended before, see `append_fences`) it ends
    there; otherwise it ends when each partition's position reaches the high watermark of a
    fetch. A partition in `start` is read from that offset, the others from the beginning.
    Fence records, this read's and earlier ones, go to `on_fence` if given, never to
    `on_record`. Raises `ReadIncompleteError` if that takes longer than `timeout_s`.
    """
    consumer = AIOKafkaConsumer(**consumer_kwargs(cfg, None))
    await consumer.start()
    count = 0
    try:
        wanted = await _partitions(consumer, topic, partitions)
        if not wanted:
            return 0
        # The end to reach per partition: one past the fence, or (None) the fetched watermark.
        until: dict[int, int | None] = dict.fromkeys(wanted)
        if ends is not None:
            until = {p: ends[p] for p in wanted}
        elif fence:
            appended = await append_fences(cfg, topic, wanted, fence_value)
            until = {p: o + 1 for p, o in appended.items()}
        tps = [TopicPartition(topic, p) for p in wanted]
        consumer.assign(tps)
        await _seek(consumer, tps, start or {})
        started = last_report = time.monotonic()
        while True:
            batch = await consumer.getmany(*tps, timeout_ms=100, max_records=5000)
            for records in batch.values():
                for rec in records:
                    if not is_fence(rec):
                        on_record(rec)
                        count += 1
                    elif on_fence is not None:
                        on_fence(rec)
            behind = await _behind(consumer, tps, until)
            if not behind:
                return count
            now = time.monotonic()
            if now - started > timeout_s:
                raise ReadIncompleteError(
                    f"could not read {topic} to its end in {timeout_s:.0f}s; "
                    f"(position, end) of the partitions behind: {behind}"
                )
            if now - last_report > PROGRESS_EVERY_S:
                last_report = now
                log.info("reading %s: %d records so far; behind: %s", topic, count, behind)
    finally:
        await consumer.stop()
