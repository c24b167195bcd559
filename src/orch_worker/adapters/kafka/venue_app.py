"""The paper venue's Kafka shell: order intents in, execution reports out after simulated latency.

All decisions are the pure fill model's (`orch_worker.venue.fill_model`); this module only moves
records. Delivery is at-least-once: an intent's offset is committed only after every report of
that intent, and of every earlier intent of its partition, has been published. A redelivered
intent is recognised by its id and answered with nothing new; after a crash the deterministic
fill model re-sends the very same reports (same ids), which the orchestrator deduplicates.
Records that do not decode go to the dead-letter topic with the reason and are committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from orch_worker.adapters.kafka.clients import consumer_kwargs, producer_kwargs
from orch_worker.adapters.kafka.codec import DecodeError, dead_letter, decode, encode
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.config import OrchConfig
from orch_worker.domain.models import IntentKind, OrderIntent, ReportStatus
from orch_worker.venue.fill_model import TERMINAL_STATUSES, ScheduledReport, simulate

log = logging.getLogger(__name__)

MEMORY_LIMIT = 200_000
"""Intents remembered for deduplication and cancels; the oldest are forgotten beyond this."""

DRAIN_GRACE_S = 2.0
"""On stop, how long reports already scheduled may still take to go out (plus max latency)."""


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class VenueCounters:
    """What the venue has done so far, for tests and for the metrics endpoint.

    `intents_seen` counts distinct intents answered; redeliveries count in `duplicates` only.
    """

    intents_seen: int = 0
    reports_published: int = 0
    dead_lettered: int = 0
    duplicates: int = 0


@dataclass(frozen=True, slots=True)
class _OrderState:
    """What the venue last said about an order, so a later cancel can report it faithfully."""

    filled: Decimal
    avg_price: Decimal | None
    open: bool


class OffsetTracker:
    """Per partition, the offset that may be committed: the lowest one still in flight.

    Committing past an intent whose reports are not all published would lose them on a crash,
    so the commit position never passes the oldest unfinished intent of its partition.
    """

    def __init__(self) -> None:
        self._next: dict[TopicPartition, int] = {}
        self._inflight: dict[TopicPartition, set[int]] = {}
        self._committed: dict[TopicPartition, int] = {}

    def consumed(self, tp: TopicPartition, offset: int) -> None:
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def begin(self, tp: TopicPartition, offset: int) -> None:
        self._inflight.setdefault(tp, set()).add(offset)

    def finish(self, tp: TopicPartition, offset: int) -> None:
        self._inflight.get(tp, set()).discard(offset)

    def committable(self) -> dict[TopicPartition, int]:
        """Partitions whose commit position moved since the last commit, with the new position."""
        moved = {}
        for tp, nxt in self._next.items():
            inflight = self._inflight.get(tp)
            position = min(inflight) if inflight else nxt
            if position > self._committed.get(tp, -1):
                moved[tp] = position
        return moved

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, tps: Sequence[TopicPartition]) -> None:
        """Drop revoked partitions: their unfinished intents are redelivered to the new owner."""
        for tp in tps:
            self._next.pop(tp, None)
            self._inflight.pop(tp, None)
            self._committed.pop(tp, None)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """Commits finished work before partitions move, and signals readiness once joined."""

    def __init__(self, app: VenueApp, ready: asyncio.Event | None) -> None:
        self._app = app
        self._ready = ready

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._app.commit()
        self._app.tracker.forget(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("venue assigned %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in assigned))
        if self._ready is not None:
            self._ready.set()


class VenueApp:
    """One paper venue process: a consumer of intents, a producer of reports, timers between."""

    def __init__(
        self,
        cfg: OrchConfig,
        *,
        clock: Callable[[], datetime] = utc_now,
        counters: VenueCounters | None = None,
    ) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.kafka.topic_prefix)
        self.counters = counters if counters is not None else VenueCounters()
        self.tracker = OffsetTracker()
        self._clock = clock
        self._consumer_name = f"venue:{cfg.venue.group_id}"
        self._orders: OrderedDict[str, _OrderState | None] = OrderedDict()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._failure: BaseException | None = None
        self._consumer: Any = None
        self._producer: Any = None

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Consume intents until `stop` is set; raises if publishing a report failed."""
        self._producer = AIOKafkaProducer(**producer_kwargs(self.cfg.kafka))
        self._consumer = AIOKafkaConsumer(
            **consumer_kwargs(self.cfg.kafka, self.cfg.venue.group_id)
        )
        self._consumer.subscribe([self.topics.order_intents], listener=_Rebalance(self, ready))
        await self._producer.start()
        try:
            await self._consumer.start()
            try:
                await self._loop(stop)
                await self._drain()
            finally:
                await self._consumer.stop()
        finally:
            leftovers = list(self._running.values())
            for task in leftovers:  # not committed, so redelivered (same reports) on restart
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
            await self._producer.stop()

    async def _loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._raise_if_failed()
            batch = await self._consumer.getmany(
                timeout_ms=100, max_records=self.cfg.worker.max_batch
            )
            for tp, records in batch.items():
                for record in records:
                    await self._handle(tp, record)
            await self.commit()

    async def _drain(self) -> None:
        """Let reports already scheduled go out, then commit, so a clean stop loses nothing."""
        tasks = list(self._running.values())
        if tasks:
            grace = DRAIN_GRACE_S + 4 * self.cfg.venue.latency_ms_max / 1000
            await asyncio.wait(tasks, timeout=grace)
        self._raise_if_failed()
        await self.commit()

    async def commit(self) -> None:
        """Commit every partition whose oldest unfinished intent moved on."""
        if self._consumer is None:
            return
        offsets = self.tracker.committable()
        owned = self._consumer.assignment()
        lost = [tp for tp in offsets if tp not in owned]
        if lost:  # records of a batch fetched before a rebalance: the new owner answers them
            self.tracker.forget(lost)
            offsets = {tp: o for tp, o in offsets.items() if tp in owned}
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except KafkaError as exc:  # a rebalance in progress: the records are redelivered
            log.warning("venue offset commit failed, will be retried or redelivered: %r", exc)
            return
        self.tracker.committed(offsets)

    async def _handle(self, tp: TopicPartition, record: ConsumerRecord[bytes, bytes]) -> None:
        self.tracker.consumed(tp, record.offset)
        try:
            intent = decode(OrderIntent, record.value)
        except DecodeError as exc:
            await self._dead_letter(record, exc.error_type, str(exc))
            return
        if intent.intent_id in self._orders:
            self._duplicate(tp, record.offset, intent)
            return
        try:
            scheduled = self._simulate(intent)
        except Exception as exc:  # bad input must never stop the venue: dead-letter it
            await self._dead_letter(record, "simulation_failed", f"{type(exc).__name__}: {exc}")
            return
        self.counters.intents_seen += 1
        log.info(
            "venue intent %s account %s: %s",
            intent.intent_id,
            intent.account_id,
            describe(scheduled),
        )
        self._start(tp, record.offset, intent, scheduled)

    def _duplicate(self, tp: TopicPartition, offset: int, intent: OrderIntent) -> None:
        """A redelivery: no new reports, but its offset waits for the original's reports."""
        self.counters.duplicates += 1
        log.info(
            "venue intent %s account %s: duplicate, ignored", intent.intent_id, intent.account_id
        )
        original = self._running.get(intent.intent_id)
        if original is not None:
            self.tracker.begin(tp, offset)
            original.add_done_callback(lambda task: self._settle(task, tp, offset))

    def _simulate(self, intent: OrderIntent) -> tuple[ScheduledReport, ...]:
        """Run the fill model and remember the order's outcome for later cancels."""
        now = self._clock()
        if intent.kind is not IntentKind.CANCEL:
            scheduled = simulate(intent, self.cfg.venue, now)
            self._remember(intent.intent_id, _state_after(scheduled))
            return scheduled
        parent_id = intent.parent_intent_id
        parent = self._orders.get(parent_id) if parent_id is not None else None
        scheduled = simulate(
            intent,
            self.cfg.venue,
            now,
            filled_so_far=parent.filled if parent else Decimal(0),
            avg_price_so_far=parent.avg_price if parent else None,
            parent_open=parent is not None and parent.open,
        )
        self._remember(intent.intent_id, None)
        last = scheduled[-1].report if scheduled else None
        if (
            parent is not None
            and parent_id is not None
            and last is not None
            and last.status is ReportStatus.CANCELLED
        ):
            self._remember(parent_id, _OrderState(last.filled_quantity, last.avg_price, False))
        return scheduled

    def _remember(self, intent_id: str, state: _OrderState | None) -> None:
        self._orders[intent_id] = state
        self._orders.move_to_end(intent_id)
        while len(self._orders) > MEMORY_LIMIT:
            self._orders.popitem(last=False)

    def _start(
        self,
        tp: TopicPartition,
        offset: int,
        intent: OrderIntent,
        scheduled: tuple[ScheduledReport, ...],
    ) -> None:
        """Publish the reports in a task, so one order's latency never holds up the next."""
        after = self._running.get(intent.parent_intent_id or "")
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._publish(scheduled, loop.time(), after))
        self._running[intent.intent_id] = task
        self.tracker.begin(tp, offset)
        task.add_done_callback(lambda t: self._finished(t, intent.intent_id, tp, offset))

    async def _publish(
        self,
        scheduled: tuple[ScheduledReport, ...],
        started: float,
        after: asyncio.Task[None] | None,
    ) -> None:
        """Send each report at its delay; a cancel waits until its parent's reports are out."""
        loop = asyncio.get_running_loop()
        if after is not None:
            await asyncio.wait([after])
            started = max(started, loop.time())
        for item in scheduled:
            wait = started + item.delay_s - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            report = item.report
            await self._producer.send_and_wait(
                self.topics.execution_reports, encode(report), key=report.account_id.encode()
            )
            self.counters.reports_published += 1

    def _finished(
        self, task: asyncio.Task[None], intent_id: str, tp: TopicPartition, offset: int
    ) -> None:
        if self._running.get(intent_id) is task:
            del self._running[intent_id]
        self._settle(task, tp, offset)

    def _settle(self, task: asyncio.Task[None], tp: TopicPartition, offset: int) -> None:
        """Free an offset for commit once its reports are out; a failure stops the venue."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("venue could not publish execution reports: %r", exc)
            self._failure = self._failure or exc
            return
        self.tracker.finish(tp, offset)

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise RuntimeError("the paper venue failed to publish reports") from self._failure

    async def _dead_letter(
        self, record: ConsumerRecord[bytes, bytes], error_type: str, error: str
    ) -> None:
        """Park a record the venue cannot answer, keyed as it came, with the reason."""
        letter = dead_letter(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value,
            error_type=error_type,
            error=error,
            now=self._clock(),
            consumer=self._consumer_name,
        )
        await self._producer.send_and_wait(self.topics.dead_letter, encode(letter), key=record.key)
        self.counters.dead_lettered += 1
        log.warning(
            "venue dead-lettered %s[%d]@%d: %s: %s",
            record.topic,
            record.partition,
            record.offset,
            error_type,
            error,
        )


def _state_after(scheduled: tuple[ScheduledReport, ...]) -> _OrderState | None:
    if not scheduled:  # a silent account: the venue knows nothing of the order
        return None
    last = scheduled[-1].report
    return _OrderState(last.filled_quantity, last.avg_price, last.status not in TERMINAL_STATUSES)


def describe(scheduled: tuple[ScheduledReport, ...]) -> str:
    """One readable outcome for the log line of an intent."""
    if not scheduled:
        return "no report (a silent account)"
    last = scheduled[-1].report
    qty = format(last.filled_quantity, "f")
    price = f" @ {last.avg_price}" if last.avg_price is not None else ""
    if last.status is ReportStatus.REJECTED:
        return f"rejected ({last.reason_code}): {last.reason_text}"
    if last.status is ReportStatus.CANCELLED:
        return f"cancelled order of intent {last.intent_id} with {qty} filled{price}"
    if last.status is ReportStatus.PARTIALLY_FILLED:
        return f"partially filled {qty}{price}, {last.leaves_quantity} left open"
    return f"{last.status.value} {qty}{price} in {len(scheduled)} reports"


async def run_venue(
    cfg: OrchConfig,
    *,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    clock: Callable[[], datetime] = utc_now,
    counters: VenueCounters | None = None,
) -> None:
    """Run the paper venue until `stop` is set.

    Args:
        cfg: the whole configuration; the venue reads `kafka` and `venue`.
        stop: set it to stop after the reports already scheduled are out.
        ready: set once the consumer group has assigned partitions.
        clock: the source of `venue_time` (tests pin it to get identical reports).
        counters: pass one in to read what the venue did (tests, metrics).
    """
    await VenueApp(cfg, clock=clock, counters=counters).run(stop, ready)
