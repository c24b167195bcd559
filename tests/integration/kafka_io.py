"""Small real-broker helpers for tests: publish events, collect a topic's records."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import BaseModel

from orch_worker.adapters.kafka.clients import consumer_kwargs, producer_kwargs
from orch_worker.domain.config import KafkaConfig
from tests.integration.bounded import STOP_S, within


async def publish(
    cfg: KafkaConfig, topic: str, items: Iterable[tuple[str | None, BaseModel | bytes]]
) -> None:
    producer = AIOKafkaProducer(**producer_kwargs(cfg))
    await producer.start()
    try:
        for key, value in items:
            raw = value if isinstance(value, bytes) else orjson.dumps(value.model_dump(mode="json"))
            await producer.send_and_wait(topic, raw, key=key.encode() if key else None)
    finally:
        await within(producer.stop(), STOP_S, "stopping the producer")


class Collector:
    """Reads a topic from the beginning in the background and keeps every decoded value."""

    def __init__(self, cfg: KafkaConfig, topic: str) -> None:
        self.cfg, self.topic = cfg, topic
        self.values: list[dict[str, Any]] = []
        self.keys: list[str | None] = []
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> Collector:
        self._consumer = AIOKafkaConsumer(self.topic, **consumer_kwargs(self.cfg, None))
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=50)
            for records in batch.values():
                for r in records:
                    self.keys.append(r.key.decode() if r.key else None)
                    self.values.append(orjson.loads(r.value))

    async def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 20.0
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while not predicate(self.values):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out on {self.topic}; have {len(self.values)} records: "
                    f"{self.values[-5:]}"
                )
            await asyncio.sleep(0.02)
        return self.values

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._task:
                self._task.cancel()
                # Not `await self._task`: its CancelledError would also swallow a cancel of
                # this exit, and a task that ignored its cancel would hold it forever.
                await asyncio.wait({self._task}, timeout=STOP_S)
                if self._task.done() and not self._task.cancelled():
                    self._task.result()  # what stopped the collecting, if anything did
        finally:
            if self._consumer:
                await within(
                    self._consumer.stop(), STOP_S, f"stopping the consumer of {self.topic}"
                )
