"""Backpressure on the real broker: the open-signal cap holds, and waiting reports are seen."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from orch_worker.adapters.kafka.clients import consumer_kwargs
from orch_worker.adapters.kafka.intake import Intake, IntakeLimits
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.config import KafkaConfig, OrchConfig
from tests import factories as f
from tests.integration.bounded import STOP_S, within
from tests.integration.kafka_io import Collector, publish
from tests.integration.test_worker import running, seed_accounts

pytestmark = pytest.mark.integration


async def test_waiting_routed_inputs_are_counted_from_the_fetched_high_watermark(
    kafka: KafkaConfig,
) -> None:
    t = Topics(kafka.topic_prefix)
    await publish(kafka, t.portfolio_inputs, [("demo", b"r%d" % n) for n in range(30)])
    partition = next(iter(await _partitions_of(kafka, t.portfolio_inputs, "demo")))
    consumer = AIOKafkaConsumer(**consumer_kwargs(kafka, None), max_poll_records=10)
    await consumer.start()
    try:
        tp = TopicPartition(t.portfolio_inputs, partition)
        consumer.assign([tp, TopicPartition(t.signals, partition)])
        await consumer.seek_to_beginning(tp)
        got = await consumer.getmany(tp, timeout_ms=5_000, max_records=10)
        assert len(got[tp]) == 10
        intake = Intake(t.signals, t.portfolio_inputs, IntakeLimits(100, 90, routed_lag=20))
        assert await intake.routed_waiting(consumer) == 20
        assert await intake.apply(consumer, open_signals=0) == "reports_waiting"
        assert consumer.paused() == {TopicPartition(t.signals, partition)}
        while (await consumer.position(tp)) < 30:
            await consumer.getmany(tp, timeout_ms=1_000)
        assert await intake.apply(consumer, open_signals=0) is None
        assert consumer.paused() == set()
    finally:
        await within(consumer.stop(), STOP_S, "stopping the consumer")


async def _partitions_of(cfg: KafkaConfig, topic: str, key: str) -> set[int]:
    consumer = AIOKafkaConsumer(topic, **consumer_kwargs(cfg, None))
    await consumer.start()
    try:
        found: set[int] = set()
        while not found:
            for tp, records in (await consumer.getmany(timeout_ms=1_000)).items():
                found.update(tp.partition for r in records if r.key == key.encode())
        return found
    finally:
        await within(consumer.stop(), STOP_S, "stopping the consumer")


def _capped(kafka: KafkaConfig, cap: int) -> OrchConfig:
    cfg = f.config(kafka)
    return cfg.model_copy(
        update={"worker": cfg.worker.model_copy(update={"max_open_signals": cap, "max_batch": 1})}
    )


async def test_no_more_signals_are_open_than_the_cap_and_the_rest_follow(
    kafka: KafkaConfig,
) -> None:
    cap, n_signals = 2, 7
    cfg = _capped(kafka, cap)
    t = Topics(kafka.topic_prefix)
    await seed_accounts(cfg, t)
    most_open = 0
    async with (
        Collector(kafka, t.order_intents) as intents,
        Collector(kafka, t.execution_results) as results,
        running(cfg) as worker,
    ):

        async def watch() -> None:
            nonlocal most_open
            while True:
                most_open = max(most_open, len(worker._open_signals))
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        try:
            await publish(kafka, t.signals, [("demo", f.signal(f"s{n}")) for n in range(n_signals)])
            # Two signals' intents arrive, then nothing more while they stay open.
            await intents.wait_for(lambda v: len({i["signal_id"] for i in v}) == cap)
            await asyncio.sleep(1.5)
            assert len({i["signal_id"] for i in intents.values}) == cap
            assert worker.metrics.signals_paused._value.get() == 1
            filled: set[str] = set()
            while True:
                fresh = [i for i in intents.values if i["intent_id"] not in filled]
                reports = []
                for i in fresh:
                    filled.add(i["intent_id"])
                    reports += [
                        f.report(i["intent_id"], i["account_id"], "accepted", n=1),
                        f.report(i["intent_id"], i["account_id"], "filled", i["quantity"], n=2),
                    ]
                if reports:
                    await publish(kafka, t.execution_reports, [(r.account_id, r) for r in reports])
                done = {r["signal_id"] for r in results.values if r["status"] == "completed"}
                if len(done) == n_signals:
                    break
                seen = len(results.values)
                await results.wait_for(lambda v, seen=seen: len(v) > seen)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        assert most_open == cap
        assert worker.metrics.signal_pauses.labels("open_signals")._value.get() >= 2
