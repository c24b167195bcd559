"""Reading a topic to its end: the proof a restarted worker relies on before it decides anything.

A read that returns early hands the worker stale state, and stale state releases orders twice;
these tests hold the reader to "everything written before the read began", including while the
broker is stopped for longer than any idle cut-off would wait.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord

from orch_worker.adapters.kafka.changelog import Recovered, fold
from orch_worker.adapters.kafka.clients import ensure_topics, producer_kwargs
from orch_worker.adapters.kafka.embedded import EmbeddedBroker
from orch_worker.adapters.kafka.reader import ReadIncompleteError, is_fence, read_to_end
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.config import KafkaConfig, KafkaProfile
from tests.integration.bounded import STOP_S, within

pytestmark = pytest.mark.integration

PAD = b"x" * 2000


def _number(rec: ConsumerRecord[bytes, bytes]) -> int:
    return int(rec.value.split(b"|", 1)[0])


async def _fill(cfg: KafkaConfig, topic: str, n: int) -> None:
    """n records of 2 KB over 3 partitions: more than one fetch holds, so a read takes several."""
    producer = AIOKafkaProducer(**producer_kwargs(cfg))
    await producer.start()
    try:
        futures = []
        for i in range(n):
            futures.append(await producer.send(topic, b"%d|" % i + PAD, partition=i % 3))
            if i % 97 == 0:
                await asyncio.sleep(0)
        await asyncio.gather(*futures)
    finally:
        await within(producer.stop(), STOP_S, "stopping the producer")


@pytest.mark.parametrize("fence", [False, True], ids=["watermark", "fence"])
async def test_every_record_is_read_once_and_fences_are_never_handed_out(
    kafka: KafkaConfig, fence: bool
) -> None:
    topic = Topics(kafka.topic_prefix).changelog
    await _fill(kafka, topic, 6000)
    seen: list[ConsumerRecord[bytes, bytes]] = []

    count = await read_to_end(kafka, topic, seen.append, fence=fence)

    assert count == 6000
    assert sorted(_number(r) for r in seen) == list(range(6000))
    assert not any(is_fence(r) for r in seen)
    if fence:  # a second read sees the first read's fences in the log and still skips them
        again: list[ConsumerRecord[bytes, bytes]] = []
        assert await read_to_end(kafka, topic, again.append, fence=True) == 6000


async def test_only_the_asked_partitions_are_read(kafka: KafkaConfig) -> None:
    topic = Topics(kafka.topic_prefix).changelog
    await _fill(kafka, topic, 300)
    seen: list[ConsumerRecord[bytes, bytes]] = []

    assert await read_to_end(kafka, topic, seen.append, partitions={1}, fence=True) == 100
    assert {r.partition for r in seen} == {1}


def test_a_fence_in_the_changelog_changes_no_state() -> None:
    rec = Recovered()
    fold(rec, b'{"type":"fence"}')
    assert rec.records == 0
    assert rec.portfolios == {}
    assert rec.pending == {}


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker of the test's own: stopping the session's broker would stall other tests."""
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log")
    broker.start()
    try:
        yield broker
    finally:
        if broker.pid is not None:
            os.kill(broker.pid, signal.SIGCONT)
        broker.stop()


async def _filled_private_topic(broker: EmbeddedBroker) -> tuple[KafkaConfig, str]:
    """9,000 records (18 MB: far more than the first fetches hold) on the test's own broker.

    Uncompressed: compressed, the records are small enough for one fetch to hold them all."""
    assert broker.pid is not None
    cfg = KafkaConfig(
        bootstrap=broker.bootstrap,
        topic_prefix="r.",
        profile=KafkaProfile.EMBEDDED,
        partitions=3,
        compression="none",
    )
    topic = Topics(cfg.topic_prefix).changelog
    await ensure_topics(cfg, Topics(cfg.topic_prefix))
    await _fill(cfg, topic, 9000)
    return cfg, topic


@pytest.mark.parametrize("fence", [False, True], ids=["watermark", "fence"])
async def test_a_broker_stopped_mid_read_delays_the_read_but_never_shortens_it(
    private_broker: EmbeddedBroker, fence: bool
) -> None:
    cfg, topic = await _filled_private_topic(private_broker)
    seen: list[ConsumerRecord[bytes, bytes]] = []

    def slow(rec: ConsumerRecord[bytes, bytes]) -> None:
        seen.append(rec)
        if len(seen) == 1:  # stop the broker after the first fetch, for 4 s
            os.kill(private_broker.pid or 0, signal.SIGSTOP)
            asyncio.get_running_loop().call_later(
                4.0, os.kill, private_broker.pid or 0, signal.SIGCONT
            )

    count = await read_to_end(cfg, topic, slow, fence=fence)

    assert count == 9000
    assert sorted(_number(r) for r in seen) == list(range(9000))


async def test_a_read_that_cannot_finish_fails_instead_of_returning_a_part(
    private_broker: EmbeddedBroker,
) -> None:
    cfg, topic = await _filled_private_topic(private_broker)
    seen: list[ConsumerRecord[bytes, bytes]] = []

    def stop_at_first(rec: ConsumerRecord[bytes, bytes]) -> None:
        seen.append(rec)
        if len(seen) == 1:
            os.kill(private_broker.pid or 0, signal.SIGSTOP)

    with pytest.raises(ReadIncompleteError, match=r"could not read .* to its end"):
        await read_to_end(cfg, topic, stop_at_first, timeout_s=3.0)
    os.kill(private_broker.pid, signal.SIGCONT)
