"""The audit sink (`orch-worker sink`): `orch.audit` into the audit store, at least once, no loss.

Commit order, per batch, and why:

1. decode every record; the ones that do not decode (or that the store cannot hold exactly) are
   set aside for the dead-letter topic, never dropped;
2. write the decoded events of the batch, every partition's records in chain order, in one
   database transaction (idempotent on `event_id`, so a batch redelivered after a crash stores
   nothing twice);
3. publish the dead letters and wait for the broker's acknowledgement;
4. only then commit `last offset + 1` for each partition of the batch.

A crash anywhere before 4 means the batch is read again and steps 2 and 3 repeat harmlessly; a
commit never runs ahead of what is durable. A database that is locked or unreachable is retried
with back-off, uncommitted (if that outlasts the group's poll interval, the partition moves to
another sink, whose re-read is just as harmless); any other failure stops the sink loudly rather
than skipping records.

Throughput. A batch is the polls fetched while the previous batch was being written, up to
`POLLS_PER_WRITE` of them: a sink that keeps up writes each poll as it comes, one that falls
behind commits (and fsyncs) once per several polls, and a transaction of four polls costs the
database about a quarter less per event than four transactions of one (measured). The
event loop keeps fetching while the store thread writes, and the next batch goes to the store as
soon as the previous write returns, before that batch's dead letters and offset commit (Kafka
round trips) finish; offsets are still committed batch after batch, each only after its own
write. Decoding holds the GIL, so it runs where it cannot stall a write: on the store thread
before the write, except while the store waits without the GIL, when the event loop decodes
what it has fetched for the next batch. A PostgreSQL write waits on the server nearly
throughout (`AuditStore.decodes_beside_writes`), so the loop decodes each poll as it comes;
a SQLite write once its rows are staged (`AuditStore.in_database` says when), since decoding
beside the staging would stall it: the sqlite3 module lets go of the GIL around every row
(measured: a sixth slower). What follows, the index updates, the state upserts and COMMIT,
runs in a few statements without the GIL, and the loop decodes beside it each poll as it
comes. Records go to the store as rows built straight from their JSON
(`rows.record_from_json`), with the `AuditEvent` model validating only what that strict fast
path does not accept; the store's own check of what it cannot hold runs only when a write
refuses an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import threading
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError

from orch_worker.adapters.db.rows import (
    EventRecord,
    UnrepresentableEventError,
    record_from_event,
    record_from_json,
)
from orch_worker.adapters.db.store import (
    AuditStore,
    StoreUnavailableError,
    UnstorableEventError,
    WriteResult,
    open_store,
)
from orch_worker.adapters.kafka.clients import consumer_kwargs, ensure_topics, producer_kwargs
from orch_worker.adapters.kafka.codec import DecodeError, dead_letter, decode, encode
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.config import OrchConfig
from orch_worker.domain.models import AuditEvent

log = logging.getLogger(__name__)

T = TypeVar("T")

POLL_TIMEOUT_MS = 200
"""How long one poll waits for records; also the longest a stop request waits to be noticed."""

RETRY_BACKOFF_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
"""Waits between attempts to write a batch the database refused for a retryable reason."""

POLLS_PER_WRITE = 4
"""The most polls (of up to `sink.batch_size` records each) one database transaction takes."""

YOUNG_THRESHOLD = 20_000
"""Allocations between young garbage collections while a sink runs (CPython's default: 700).

A batch in flight is thousands of live objects (fetched records, their decoded rows), and every
young collection walks them and every tenth one the older generation too; the decoding garbage
around them is acyclic and freed by reference counting anyway. With the threshold above what
one batch allocates, the sink took an eighth to a sixth less CPU per event on either store in
most runs (measured, two busy cores). The worker does the same (`adapters/heap.py`)."""

SWITCH_INTERVAL_S = 0.0005
"""The GIL switch interval while a sink runs (CPython's default: 5 ms).

The store thread lets go of the GIL for every SQL statement of a write and needs it back after
each one; meanwhile the event loop decodes the next batch, holding the GIL until the interval
runs out. At the default every statement of a write could wait up to 5 ms for that, and the
store thread, the sink's slowest stage, spent about as long again per event as the same writes
did alone (measured: 23-28 µs against 12 µs per event). At 0.5 ms, one sink process into
SQLite wrote more events per second in 6 alternating pairs of runs (median +22%); two processes,
and PostgreSQL, measured the same or better within this machine's noise."""


@dataclass(frozen=True, slots=True)
class _ProcessSettings:
    gc_threshold: tuple[int, int, int]
    switch_interval_s: float


_settings = threading.Lock()
_changed: list[_ProcessSettings] = []
"""One entry per running sink: the settings the first one found, restored by the last."""


@contextlib.contextmanager
def _tuned_for_sinks() -> Iterator[None]:
    """`YOUNG_THRESHOLD` and `SWITCH_INTERVAL_S` while any sink of this process runs (never
    lowering a higher threshold, never lengthening a shorter interval)."""
    with _settings:
        found = _ProcessSettings(gc.get_threshold(), sys.getswitchinterval())
        _changed.append(_changed[0] if _changed else found)
        gc.set_threshold(max(found.gc_threshold[0], YOUNG_THRESHOLD), *found.gc_threshold[1:])
        sys.setswitchinterval(min(found.switch_interval_s, SWITCH_INTERVAL_S))
    try:
        yield
    finally:
        with _settings:
            before = _changed.pop()
            if not _changed:
                gc.set_threshold(*before.gc_threshold)
                sys.setswitchinterval(before.switch_interval_s)


@dataclass(slots=True)
class SinkStats:
    """Running totals since start, for tests, logs and the metrics endpoint."""

    records: int = 0
    """Records read from the audit topic (events, duplicates and dead letters alike)."""
    events_written: int = 0
    """Events new to the store."""
    duplicates: int = 0
    """Events the store already held, identical (redelivery, or a producer retry)."""
    conflicts: int = 0
    """Events whose id was stored with different content; kept in `audit_conflicts`."""
    dead_lettered: int = 0
    """Records sent to the dead-letter topic (undecodable, or not storable exactly)."""
    batches: int = 0
    """Batches (database transactions) written and committed."""
    write_retries: int = 0
    """Batch writes retried after a retryable database failure."""
    commit_failures: int = 0
    """Commits refused because the partition moved to another sink (it re-reads the batch)."""
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    """The last offset committed per partition (the next offset to read)."""


@dataclass(frozen=True, slots=True)
class _Rejected:
    record: ConsumerRecord[bytes, bytes]
    error_type: str
    error: str


@dataclass(frozen=True, slots=True)
class _Wiring:
    """The running sink's clients, store and stop signal, passed around as one."""

    consumer: AIOKafkaConsumer
    producer: AIOKafkaProducer
    store: AuditStore
    stop: asyncio.Event


class _ReadyOnAssignment(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """Sets `ready` once the group has given this sink its partitions (possibly none), and
    writes and commits what was fetched before partitions go, so their new owner re-reads less."""

    def __init__(self, ready: asyncio.Event | None, drain: Callable[[], Awaitable[None]]) -> None:
        self._ready = ready
        self._drain = drain

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            log.info("audit partitions revoked: %s", _names(revoked))
            await self._drain()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("audit partitions assigned: %s", _names(assigned) or "(none)")
        if self._ready is not None:
            self._ready.set()


def decode_record(value: bytes | None) -> EventRecord:
    """The record of one audit event: the exact fast form, else whatever the model accepts.

    Raises:
        DecodeError: the model refuses the value (its reason is the dead letter's).
        UnrepresentableEventError: valid, but no store can hold it exactly.
    """
    if value is not None:
        record = record_from_json(value)
        if record is not None:
            return record
    return record_from_event(decode(AuditEvent, value))


@dataclass(slots=True)
class _Batch:
    """Records on their way to the store, from one poll or several: one transaction, then
    dead letters and the commit of the next offset of every partition in it."""

    sources: list[tuple[TopicPartition, ConsumerRecord[bytes, bytes]]] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    """The next offset to commit per partition."""
    first: dict[TopicPartition, int] = field(default_factory=dict)
    records: list[EventRecord] = field(default_factory=list)
    origins: list[tuple[TopicPartition, ConsumerRecord[bytes, bytes]]] = field(default_factory=list)
    """Where each of `records` came from, to dead-letter one the store refuses."""
    rejected: list[tuple[TopicPartition, _Rejected]] = field(default_factory=list)
    """Records that did not decode or that the store cannot hold exactly: dead letters."""
    decoded: int = 0
    """How many of `sources` are decoded into `records` and `rejected` (each once, even if the
    write is retried)."""
    write: asyncio.Task[WriteResult | None] | None = None

    def add(self, polled: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]) -> None:
        """Take a poll's records, in partition order (a partition's offsets only grow)."""
        for tp, records in polled.items():
            if records:
                self.offsets[tp] = records[-1].offset + 1
                self.first.setdefault(tp, records[0].offset)
                self.sources += [(tp, r) for r in records]

    def decode(self) -> list[EventRecord]:
        """The batch's records, each decoded once; undecodable ones go to `rejected`.

        Picks up where the last call stopped: the loop decodes what it fetched while the store
        writes the batch before (`_decode_beside_write`), the store thread the rest. `decoded` moves
        record by record, so an unexpected error leaves the failing record to be decoded (and
        fail) again by the write, never skipped.
        """
        sources = self.sources
        records, origins, rejected = self.records, self.origins, self.rejected
        for n in range(self.decoded, len(sources)):
            pair = sources[n]
            try:
                records.append(decode_record(pair[1].value))
            except DecodeError as exc:
                rejected.append((pair[0], _Rejected(pair[1], exc.error_type, str(exc))))
            except UnrepresentableEventError as exc:
                rejected.append((pair[0], _Rejected(pair[1], "unstorable", str(exc))))
            else:
                origins.append(pair)
            self.decoded = n + 1
        return records

    def set_aside_unstorable(self, store: AuditStore) -> list[EventRecord]:
        """Move the records `store` cannot hold exactly to `rejected`; return the others."""
        keep: list[EventRecord] = []
        origins: list[tuple[TopicPartition, ConsumerRecord[bytes, bytes]]] = []
        for record, (tp, source) in zip(self.records, self.origins, strict=True):
            reason = store.record_problem(record)
            if reason is None:
                keep.append(record)
                origins.append((tp, source))
            else:
                why = f"{record.row[0]}: {reason}"
                self.rejected.append((tp, _Rejected(source, "unstorable", why)))
        self.records, self.origins = keep, origins
        return keep


def _store_batch(store: AuditStore, batch: _Batch) -> WriteResult:
    """Decode a batch (once, even if the write is retried) and write it, on the store thread.
    The store's check of what it cannot hold runs record by record only when the write as a
    whole refused, which is rare."""
    try:
        return store.write_records(batch.decode())
    except UnstorableEventError:
        return store.write_records(batch.set_aside_unstorable(store))


def _names(tps: set[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps))


class AuditSink:
    """Consumes the audit topic of one configuration into one audit store.

    All store calls run on one dedicated thread: database work stays off the event loop (so the
    consumer keeps heart-beating through a slow commit) and the store's single connection is
    never used by two threads at once.
    """

    def __init__(
        self, cfg: OrchConfig, *, db_url: str | None = None, stats: SinkStats | None = None
    ) -> None:
        self._cfg = cfg
        self._db_url = db_url or cfg.sink.db
        self._topics = Topics(cfg.kafka.topic_prefix)
        self.stats = stats if stats is not None else SinkStats()
        self._consumer_name = f"orch-worker sink ({cfg.sink.group_id})"
        self._executor: ThreadPoolExecutor | None = None
        self._io: _Wiring | None = None
        self._in_flight: _Batch | None = None
        """The batch being written while the next one is fetched."""
        self._pending = _Batch()
        """Records fetched since the write in flight started: the next batch."""
        self._settling = asyncio.Lock()
        """The main loop and a rebalance may both settle the batch in flight; one at a time."""
        self._failure: BaseException | None = None
        """A write that failed while a rebalance settled it: re-raised by the main loop."""
        self._beside_write = False
        """The SQLite write in flight is in the database (`AuditStore.in_database`): polls are
        decoded as they come."""

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RuntimeError("the audit sink is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run(self, *, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Consume until `stop` is set; return after leaving the group and closing the store."""
        if self._executor is not None:
            raise RuntimeError("the audit sink is already running")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-store")
        try:
            with _tuned_for_sinks():
                await self._run(stop, ready)
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def _run(self, stop: asyncio.Event, ready: asyncio.Event | None) -> None:
        store = await self._db(open_store, self._db_url)
        loop = asyncio.get_running_loop()

        def in_database() -> None:  # on the store thread; must not fail its write
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to decode
                loop.call_soon_threadsafe(self._store_in_database)

        store.in_database = in_database
        try:
            await ensure_topics(self._cfg.kafka, self._topics)
            producer = AIOKafkaProducer(**producer_kwargs(self._cfg.kafka))
            consumer = AIOKafkaConsumer(**consumer_kwargs(self._cfg.kafka, self._cfg.sink.group_id))
            self._io = _Wiring(consumer, producer, store, stop)
            consumer.subscribe(
                [self._topics.audit], listener=_ReadyOnAssignment(ready, self._drain)
            )
            await producer.start()
            try:
                await consumer.start()
                try:
                    await self._consume(self._io)
                finally:
                    await consumer.stop()
            finally:
                await producer.stop()
        finally:
            self._io = None
            await self._db(store.close)

    def _store_in_database(self) -> None:
        """The SQLite write in flight has staged its rows: until it returns, the store thread
        waits in the database, so what is fetched from now on is decoded as it comes."""
        self._beside_write = True
        self._decode_beside_write()

    def _decode_beside_write(self) -> None:
        """The store waits without the GIL: decode what was fetched meanwhile.

        Runs once a SQLite write is in the database (`AuditStore.in_database`) and after each
        poll from then on, and after each poll while a PostgreSQL write is in flight. All of it
        at once: handing the loop back between polls measured twice the CPU per event on SQLite
        (the store thread, done committing, then fought the loop for the GIL). At most
        `POLLS_PER_WRITE` polls wait here, and holding the GIL the store thread would have kept
        the loop from running about as long."""
        try:
            self._pending.decode()
        except Exception as exc:  # a bug, not bad input: stop the sink, as the write would
            log.exception("decoding audit records failed")
            self._failure = exc

    async def _drain(self) -> None:
        """Write and commit everything fetched before partitions are revoked (the listener)."""
        if self._io is None:
            return
        try:
            if await self._settle(self._io, follow=True):
                await self._settle(self._io, follow=False)
        except Exception as exc:  # the listener must not swallow it: the main loop re-raises
            log.exception("audit write failed while partitions were being revoked")
            self._failure = exc

    async def _consume(self, io: _Wiring) -> None:
        fetch: asyncio.Task[dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]] | None = None
        stopping = asyncio.create_task(io.stop.wait())
        try:
            while not io.stop.is_set():
                if self._failure is not None:
                    raise self._failure
                size = self._cfg.sink.batch_size
                room = size * POLLS_PER_WRITE - len(self._pending.sources)
                if fetch is None and room > 0:
                    fetch = asyncio.create_task(
                        io.consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=min(size, room))
                    )
                writing = self._in_flight.write if self._in_flight is not None else None
                waits = {t for t in (fetch, writing) if t is not None}
                done, _ = await asyncio.wait({stopping, *waits}, return_when=FIRST_COMPLETED)
                if fetch is not None and fetch in done:
                    self._pending.add(fetch.result())
                    fetch = None
                    if self._in_flight is not None and (
                        self._beside_write or io.store.decodes_beside_writes
                    ):
                        self._decode_beside_write()
                if writing is not None and writing in done and not await self._settle(io):
                    return
                self._start_write(io)
            await self._settle(io, follow=False)
        finally:
            stopping.cancel()
            if fetch is not None:
                fetch.cancel()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await fetch
            if self._in_flight is not None and self._in_flight.write is not None:
                # Stopped, or failed: never leave the write running on a closing store.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await self._in_flight.write
                self._in_flight = None

    def _start_write(self, io: _Wiring) -> None:
        """Send the fetched records to the store, unless a write is in flight."""
        if self._in_flight is None and self._pending.sources:
            self._beside_write = False  # until the store says it is in the database
            batch, self._pending = self._pending, _Batch()
            batch.write = asyncio.create_task(self._write(io.store, batch, io.stop))
            self._in_flight = batch

    async def _settle(self, io: _Wiring, *, follow: bool = True) -> bool:
        """Finish the batch in flight: await its write, dead-letter, commit; False if stopped.

        With `follow`, the records fetched meanwhile go to the store as soon as this write is
        done, so the database does not wait for the broker's answers below: those offsets are
        committed only once their own write is done, after these.
        """
        async with self._settling:
            batch, self._in_flight = self._in_flight, None
            if batch is None or batch.write is None:
                return True
            result = await batch.write
            if result is None:
                return False  # stopped while the database was unavailable: nothing committed
            if follow:
                self._start_write(io)
            if batch.rejected:
                await self._dead_letter(io.producer, batch.rejected)
            await self._commit(io, batch)
            self._count(batch, result, len(batch.rejected))
            return True

    async def _commit(self, io: _Wiring, batch: _Batch) -> None:
        try:
            await io.consumer.commit(batch.offsets)
            self.stats.committed.update(batch.offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The group moved a partition on; its new owner re-reads from the last commit and
            # the idempotent write makes that harmless.
            self.stats.commit_failures += 1
            log.warning("commit of %s refused (%s)", _names(set(batch.offsets)), exc)

    def _count(self, batch: _Batch, result: WriteResult, dead: int) -> None:
        s = self.stats
        s.records += len(batch.sources)
        s.events_written += result.new
        s.duplicates += result.duplicates
        s.conflicts += result.conflicts
        s.dead_lettered += dead
        s.batches += 1
        log.info(
            "audit %s: %d records, %d new, %d duplicate, %d conflicting, %d dead-lettered",
            ", ".join(
                f"{tp.topic}[{tp.partition}]@{batch.first[tp]}-{o - 1}"
                for tp, o in sorted(batch.offsets.items())
            ),
            len(batch.sources),
            result.new,
            result.duplicates,
            result.conflicts,
            dead,
        )

    async def _write(
        self, store: AuditStore, batch: _Batch, stop: asyncio.Event
    ) -> WriteResult | None:
        attempt = 0
        while True:
            try:
                return await self._db(_store_batch, store, batch)
            except StoreUnavailableError as exc:
                delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
                attempt += 1
                self.stats.write_retries += 1
                log.warning("audit store unavailable (%s); retry %d in %.1fs", exc, attempt, delay)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                except TimeoutError:
                    continue
                return None

    async def _dead_letter(
        self, producer: AIOKafkaProducer, rejected: list[tuple[TopicPartition, _Rejected]]
    ) -> None:
        now = datetime.now(UTC)
        sent = []
        for tp, r in rejected:
            letter = dead_letter(
                topic=tp.topic,
                partition=tp.partition,
                offset=r.record.offset,
                key=r.record.key,
                value=r.record.value,
                error_type=r.error_type,
                error=r.error,
                now=now,
                consumer=self._consumer_name,
            )
            log.warning(
                "dead-lettering %s[%d]@%d: %s: %s",
                tp.topic,
                tp.partition,
                r.record.offset,
                r.error_type,
                r.error,
            )
            sent.append(
                await producer.send(self._topics.dead_letter, encode(letter), key=r.record.key)
            )
        # Every dead letter must be acknowledged before the offsets behind it are committed.
        await asyncio.gather(*sent)


async def run_sink(
    cfg: OrchConfig,
    *,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    db_url: str | None = None,
    stats: SinkStats | None = None,
) -> None:
    """Run the audit sink until `stop` is set.

    Args:
        cfg: the configuration; `cfg.sink` gives the group id, batch size and default database.
        stop: set it to leave the group, close the store and return.
        ready: set once the consumer group has assigned this sink its partitions.
        db_url: the audit store URL, overriding `cfg.sink.db` (the CLI's `--db`).
        stats: counters to update in place (a fresh `SinkStats` if omitted).
    """
    await AuditSink(cfg, db_url=db_url, stats=stats).run(stop=stop, ready=ready)
