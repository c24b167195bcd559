"""Audit sink throughput: `orch.audit` → SQLite and → PostgreSQL, beside a bare pass-through.

The records are real: a decider run of many signals over several portfolios (plan with its
recorded inputs, schedule, releases, accepts, partial fills, fills, results), chained and
encoded exactly as the worker publishes them, produced once to a fresh audit topic before
anything is timed.

Rows:

* pass-through: an aiokafka consumer group reads the same records with the sink's batch size
  and commits after every partition batch: the least any at-least-once consumer does. The
  sink's ratios are against this one.
* sink → SQLite / PostgreSQL: `AuditSink` end to end (decode and validate every event, one
  database transaction per batch of up to `POLLS_PER_WRITE` polls, current-state views, dead
  letters, commit), timed from when it may consume, once it holds partitions, to the last event
  written. Each sink runs in a process of its own, as `orch-worker sink` does: in this one,
  which holds every event of the run as a model, the same sink took about a fifth more CPU per
  event (alternating runs).
  With `ORCH_BENCH_SINK_PROCESSES` (default `1,2`) each store gets a row per count of sink
  processes in one consumer group, writing to one database (one SQLite file, taking turns on
  its writer lock): scale-out. The sinks join their group holding back their polls
  (`_HeldConsumer`) and are timed from when the group has settled, every process with its share
  of the partitions and nothing consumed yet (a process that got none would count as a slow
  one, so the topic has as many partitions as the bench has portfolios). A run in which the
  group moved partitions after that is no measurement of that many sinks, and is repeated on
  fresh topics (at most `ATTEMPTS` times).
* decode only, store only: the sink's decode of the records into store records (its strict fast
  path, the model for whatever that declines), the same records by way of a validated
  `AuditEvent` for comparison, and `AuditStore.write_records` of decoded records in the sink's
  largest transactions, each alone and without Kafka: where the sink's time goes.

Besides events/s, each row shows the CPU time per event of the process (the sink processes,
for sink rows), which a busy machine (other jobs on the same cores) distorts far less than the
wall-clock rate, and the load average as the row was measured. Neither counts the broker's or
PostgreSQL's CPU, which share the same cores. `ORCH_BENCH_SINK_RUNS` (default 3) runs each
end-to-end sink that many times, each on fresh topics and a fresh database, and reports the
median run beside the slowest and the fastest: on a shared machine a single run can be off by a
third either way.

PostgreSQL is `ORCH_BENCH_POSTGRES_URL` (default: the local server,
postgresql://postgres@127.0.0.1:5432/test) in a schema of its own, dropped afterwards; skipped
with the reason when it does not answer. Targets (issue 6): ≥ 50,000 events/s into SQLite and
≥ 30,000 events/s into PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import multiprocessing
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.sharedctypes import SynchronizedArray
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any
from unittest import mock

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from bench import BenchEnv, paper_account, progress, table
from orch_worker.adapters.db.rows import EventRecord, record_from_event
from orch_worker.adapters.db.store import open_store
from orch_worker.adapters.kafka import sink_app
from orch_worker.adapters.kafka.clients import consumer_kwargs, ensure_topics, producer_kwargs
from orch_worker.adapters.kafka.codec import decode, encode
from orch_worker.adapters.kafka.sink_app import POLLS_PER_WRITE, AuditSink, SinkStats, decode_record
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.config import KafkaConfig, OrchConfig
from orch_worker.domain.decider import Context, PortfolioState, on_report, on_signal
from orch_worker.domain.models import AuditEvent, ExecutionReport, Signal

TITLE = "audit sink throughput (events/s) into SQLite and PostgreSQL vs a bare pass-through"

EVENTS = 60_000
PORTFOLIOS = 6
ACCOUNTS = 3
BATCH = 1000
PG_URL = os.environ.get("ORCH_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
TIMEOUT_S = 300.0
RUNS = max(1, int(os.environ.get("ORCH_BENCH_SINK_RUNS", "3")))
PROCESSES = tuple(
    max(1, int(n)) for n in os.environ.get("ORCH_BENCH_SINK_PROCESSES", "1,2").split(",") if n
)
PARTITIONS = PORTFOLIOS
"""One portfolio per partition, so sink processes can share the audit evenly (hashed, the
bench's six portfolio keys put four on one of three partitions)."""
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


# -- the records -------------------------------------------------------------------------------


def _config() -> OrchConfig:
    return OrchConfig.model_validate(
        {
            "instruments": {
                "EURUSD": {
                    "value_per_unit": "100000",
                    "lot_step": "0.01",
                    "min_quantity": "0.01",
                    "max_quantity": "50",
                    "margin_rate": "0.0333",
                }
            },
            "portfolios": {
                f"p{p}": {"allocation": "equal", "stagger": {"min_s": 0, "max_s": 0}}
                for p in range(PORTFOLIOS)
            },
            "accounts": {
                f"p{p}-A{a}": {"portfolio": f"p{p}"}
                for p in range(PORTFOLIOS)
                for a in range(ACCOUNTS)
            },
        }
    )


def _report(intent_id: str, account: str, status: str, filled: str, n: int) -> ExecutionReport:
    return ExecutionReport.model_validate(
        {
            "report_id": f"{intent_id}-{n}",
            "intent_id": intent_id,
            "account_id": account,
            "order_id": f"o-{intent_id[:8]}",
            "status": status,
            "filled_quantity": filled,
            "last_quantity": filled,
            "last_price": "1.10012" if filled != "0" else None,
            "avg_price": "1.10012" if filled != "0" else None,
            "venue_time": NOW,
        }
    )


def audit_events(n: int) -> list[AuditEvent]:
    """At least `n` audit events from a real decider run, in publication order."""
    cfg = _config()
    accounts = {a: paper_account(a, c.portfolio, NOW) for a, c in cfg.accounts.items()}
    states = {p: PortfolioState(portfolio=p) for p in cfg.portfolios}
    out: list[AuditEvent] = []
    i = 0
    while len(out) < n:
        p = f"p{i % PORTFOLIOS}"
        now = NOW + timedelta(milliseconds=i)
        ctx = Context(config=cfg, now=now, accounts=accounts)
        signal = Signal.model_validate(
            {
                "signal_id": f"bench-{i}",
                "portfolio": p,
                "strategy_id": "bench",
                "symbol": "EURUSD",
                "side": "buy",
                "order_type": "market",
                "reference_price": "1.1000",
                "stop_loss": "1.0950",
                "quantity": "0.30",
                "created_at": now,
            }
        )
        d = on_signal(states[p], signal, ctx)
        pf, intents = d.state, d.intents
        out += d.audit
        for it in intents:
            half = str(it.quantity / 2)
            steps = (("accepted", "0"), ("partially_filled", half), ("filled", str(it.quantity)))
            for k, (status, filled) in enumerate(steps):
                r = _report(it.intent_id, it.account_id, status, filled, k)
                d = on_report(pf, signal.signal_id, r, ctx)
                pf = d.state
                out += d.audit
        states[p] = pf
        i += 1
    return out


# -- the runs -----------------------------------------------------------------------------------


class _Assigned(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, at: list[float]) -> None:
        self.at = at

    async def on_partitions_revoked(self, revoked: Any) -> None:
        return None

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if assigned and not self.at:
            self.at.append(time.perf_counter())


async def produce(cfg: KafkaConfig, topic: str, events: list[AuditEvent]) -> None:
    """The events keyed by portfolio as the worker does, each portfolio on a partition of its
    own (`PARTITIONS`)."""
    partition = {f"p{p}": p % cfg.partitions for p in range(PORTFOLIOS)}
    producer = AIOKafkaProducer(**producer_kwargs(cfg))
    await producer.start()
    try:
        acks = [
            await producer.send(
                topic, encode(e), key=e.portfolio.encode(), partition=partition[e.portfolio]
            )
            for e in events
        ]
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


async def pass_through(cfg: KafkaConfig, topic: str, n: int) -> tuple[float, float]:
    """Records/s of consume → commit per partition batch, from assignment to the last record,
    and the process's CPU time per record (µs)."""
    assigned: list[float] = []
    consumer = AIOKafkaConsumer(**consumer_kwargs(cfg, f"bench-pt-{uuid.uuid4().hex[:8]}"))
    consumer.subscribe([topic], listener=_Assigned(assigned))
    await consumer.start()
    seen = 0
    cpu = time.process_time()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while seen < n and time.monotonic() < deadline:
            polled = await consumer.getmany(timeout_ms=200, max_records=BATCH)
            for tp, records in polled.items():
                if records:
                    seen += len(records)
                    await consumer.commit({tp: records[-1].offset + 1})
        done = time.perf_counter()
        cpu = time.process_time() - cpu
    finally:
        await consumer.stop()
    if seen < n:
        raise RuntimeError(f"pass-through saw {seen} of {n} records in {TIMEOUT_S}s")
    return n / (done - assigned[0]), cpu / n * 1e6


@dataclass(frozen=True)
class _Phases:
    """The events one sink process and the bench pass each other (picklable, for `spawn`).

    The process sets `loaded` once it has imported everything and starts its sink when the
    bench sets `go`. Its sink joins the group but consumes nothing until the bench sets
    `release` (`_HeldConsumer`), which it does once the group has settled; it stops at
    `stop`."""

    loaded: ProcessEvent
    go: ProcessEvent
    release: ProcessEvent
    stop: ProcessEvent


_WRITTEN, _CPU, _PARTITIONS, _MOVED = range(4)
"""The figures a sink process publishes in its shared array: events written, its CPU seconds,
the partitions it holds, and 1 once its partitions changed after the release."""


class _HeldConsumer(AIOKafkaConsumer):  # type: ignore[misc]  # aiokafka is untyped
    """The sink's consumer in a bench process: its polls return nothing until `released`.

    Without it, the first sink to get partitions consumes while the group is still forming,
    and the run then times what is left, unevenly spread. On the embedded broker that is most
    runs: its first generation often holds one member only, which gets every partition, and
    the next generation follows a second or two later. A run timed from the moment every sink
    held partitions then measured one process, labelled two, in about a third of the runs."""

    def __init__(self, released: asyncio.Event, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._released = released

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
        if not self._released.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), timeout_ms / 1000)
            if not self._released.is_set():
                return {}
        polled: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = await super().getmany(
            *partitions, timeout_ms=timeout_ms, max_records=max_records
        )
        return polled


def _sink_process(
    cfg: OrchConfig, db_url: str, shared: SynchronizedArray[float], phases: _Phases
) -> None:
    """One sink process (the target of `multiprocessing`): `AuditSink` until `phases.stop`,
    publishing its figures in `shared` (`_WRITTEN`...) every `_TICK_S`."""
    phases.loaded.set()
    if phases.go.wait(60):
        asyncio.run(_sink_until(cfg, db_url, shared, phases))


_TICK_S = 0.002


async def _sink_until(
    cfg: OrchConfig, db_url: str, shared: SynchronizedArray[float], phases: _Phases
) -> None:
    stats = SinkStats()
    stopping, released = asyncio.Event(), asyncio.Event()
    consumers: list[_HeldConsumer] = []

    def held(**kwargs: Any) -> _HeldConsumer:
        consumers.append(_HeldConsumer(released, **kwargs))
        return consumers[-1]

    with mock.patch.object(sink_app, "AIOKafkaConsumer", held):
        task = asyncio.create_task(AuditSink(cfg, db_url=db_url, stats=stats).run(stop=stopping))
        try:
            at_release: frozenset[TopicPartition] | None = None
            while not (phases.stop.is_set() or task.done()):
                held_now = frozenset(consumers[0].assignment()) if consumers else frozenset()
                if at_release is None and phases.release.is_set():
                    at_release = held_now
                    released.set()
                with shared.get_lock():
                    shared[_WRITTEN], shared[_CPU] = stats.events_written, time.process_time()
                    shared[_PARTITIONS] = len(held_now)
                    if at_release is not None and held_now != at_release:
                        shared[_MOVED] = 1
                await asyncio.sleep(_TICK_S)
        finally:
            stopping.set()
            await asyncio.wait_for(task, 30)


class RebalancedError(RuntimeError):
    """A sink's partitions changed during the timed run: not a measurement of that many sinks
    each with its share. Repeat the run on fresh topics."""


async def sink(cfg: OrchConfig, db_url: str, n: int, processes: int = 1) -> tuple[float, float]:
    """Events/s of `processes` sink processes in one group, from the moment they may consume
    (their group settled: every one of them holds partitions, every partition is held once) to
    the last event written, and their CPU time per event (µs, all threads: a figure a busy
    machine does not distort).

    Raises:
        RebalancedError: the group moved partitions between the sinks during the run.
    """
    mp = multiprocessing.get_context("spawn")
    stop, go, release = mp.Event(), mp.Event(), mp.Event()
    sinks = [(mp.Array("d", 4), _Phases(mp.Event(), go, release, stop)) for _ in range(processes)]
    procs = [
        mp.Process(target=_sink_process, args=(cfg, db_url, shared, phases), daemon=True)
        for shared, phases in sinks
    ]
    for proc in procs:
        proc.start()

    def figures(k: int) -> list[float]:
        """Every process's figure `k` of its shared array."""
        out = []
        for shared, _ in sinks:
            with shared.get_lock():
                out.append(shared[k])
        return out

    def settled() -> bool:
        held = figures(_PARTITIONS)
        return min(held) > 0 and sum(held) == cfg.kafka.partitions

    async def until(what: str, done: Callable[[], bool], within_s: float) -> None:
        deadline = time.monotonic() + within_s
        while not done():  # the figures are in shared memory: nothing to wait on
            if any(not proc.is_alive() for proc in procs):
                raise RuntimeError(f"a sink process stopped early, waiting for {what}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} in {within_s:.0f}s")
            await asyncio.sleep(_TICK_S)

    try:
        await until(
            "the sink processes to start", lambda: all(p.loaded.is_set() for _, p in sinks), 60
        )
        go.set()
        await until("settled partition assignment", settled, 60)
        cpu = sum(figures(_CPU))
        release.set()
        started = time.perf_counter()
        await until(f"{n} events written", lambda: sum(figures(_WRITTEN)) >= n, TIMEOUT_S)
        elapsed = time.perf_counter() - started
        cpu = sum(figures(_CPU)) - cpu
        moved = max(figures(_MOVED))
    finally:
        stop.set()
        for proc in procs:
            await asyncio.to_thread(proc.join, 30)
            if proc.is_alive():
                proc.kill()
    if moved:
        raise RebalancedError("the group moved partitions between the sinks during the run")
    return n / elapsed, cpu / n * 1e6


ATTEMPTS = 3
"""Runs of a sink row that may end in `RebalancedError` before the bench gives up."""


async def _measured(
    env: BenchEnv,
    events: list[AuditEvent],
    url: Callable[[int], str],
    serial: Iterator[int],
    processes: int,
) -> tuple[float, float]:
    """`sink` on fresh topics and a fresh database, repeated when the group rebalanced."""

    async def once() -> tuple[float, float]:
        kafka = await _fresh_audit_topic(env, events)
        cfg = OrchConfig.model_validate(
            {"kafka": kafka, "sink": {"group_id": f"bench-sink-{uuid.uuid4().hex[:8]}"}}
        )
        return await sink(cfg, url(next(serial)), len(events), processes)

    for _ in range(ATTEMPTS - 1):
        try:
            return await once()
        except RebalancedError as exc:
            progress(f"{exc}; running again on fresh topics")
    return await once()  # the last attempt's RebalancedError ends the bench


def store_only(db_url: str, events: list[AuditEvent]) -> tuple[float, float]:
    """Events/s of `AuditStore.write_records` alone, in the sink's largest transactions."""
    records = [record_from_event(e) for e in events]
    size = BATCH * POLLS_PER_WRITE
    with open_store(db_url) as store:
        started, cpu = time.perf_counter(), time.process_time()
        for k in range(0, len(records), size):
            store.write_records(records[k : k + size])
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return len(events) / elapsed, cpu / len(events) * 1e6


def decode_only(
    events: list[AuditEvent], decoder: Callable[[bytes], object]
) -> tuple[float, float]:
    """Events/s and CPU µs/event of decoding the records with `decoder`, nothing else."""
    raw = [encode(e) for e in events]
    started, cpu = time.perf_counter(), time.process_time()
    for value in raw:
        decoder(value)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return len(raw) / elapsed, cpu / len(raw) * 1e6


def _through_the_model(value: bytes) -> EventRecord:
    """The same record by way of a validated `AuditEvent`: what the fast path saves."""
    return record_from_event(decode(AuditEvent, value))


def _pg_schema() -> tuple[str, Any] | None:
    try:
        import psycopg
    except ImportError:
        return None
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        progress(f"PostgreSQL not reachable at {PG_URL} ({exc}); its rows are skipped")
        return None
    return f"bench_sink_{uuid.uuid4().hex[:10]}", admin


def _with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


@dataclass
class Row:
    name: str
    per_second: float
    cpu_us: float
    target: float | None = None
    load: float = field(default_factory=lambda: os.getloadavg()[0])
    """The one-minute load average when the row was measured."""
    runs: tuple[float, ...] = ()
    """events/s of every run behind a median row, slowest first."""


async def _fresh_audit_topic(env: BenchEnv, events: list[AuditEvent]) -> KafkaConfig:
    """New topics with the records produced to the audit one: Tansu slows down as batches
    pile up in a partition, and a run must not find the previous run's."""
    kafka = env.kafka("sink", partitions=PARTITIONS)
    topics = Topics(kafka.topic_prefix)
    await ensure_topics(kafka, topics)
    await produce(kafka, topics.audit, events)
    return kafka


async def run(env: BenchEnv) -> None:
    started = time.monotonic()
    events = audit_events(EVENTS)
    # The bench holds every event (millions of small objects) for the whole run; a real sink
    # holds a poll or two. Frozen, they stay out of the garbage collector's passes, which would
    # otherwise scan them over and over and bill it to whatever is being measured.
    gc.collect()
    gc.freeze()
    n = len(events)
    size = sum(len(encode(e)) for e in events) / n
    progress(f"{n:,} audit events from a decider run ({size:,.0f} bytes each on average)")
    kafka = await _fresh_audit_topic(env, events)
    topics = Topics(kafka.topic_prefix)
    progress(f"produced to {topics.audit}")

    pt, pt_cpu = await pass_through(kafka, topics.audit, n)
    progress(f"pass-through: {pt:,.0f} records/s")
    rows = [Row("pass-through (aiokafka consume → commit)", pt, pt_cpu)]
    rows.append(
        Row("decode only (the sink's records, no Kafka)", *decode_only(events, decode_record))
    )
    rows.append(
        Row("  the same via AuditEvent, for comparison", *decode_only(events, _through_the_model))
    )
    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-sink-"))
    targets = {"sqlite": 50_000.0, "postgresql": 30_000.0}
    urls: list[tuple[str, Callable[[int], str], str]] = [
        ("sqlite", lambda k: f"sqlite:///{tmp / f'sink{k}.db'}", f"sqlite:///{tmp / 'store.db'}")
    ]
    pg = _pg_schema()
    schemas: list[str] = []
    if pg is not None:
        schema, _ = pg
        schemas.append(schema + "_store")

        def pg_url(k: int) -> str:
            schemas.append(f"{schema}_{k}")
            return _with_schema(PG_URL, schemas[-1])

        urls.append(("postgresql", pg_url, _with_schema(PG_URL, schema + "_store")))
    try:
        serial = itertools.count()
        for name, sink_url, store_url in urls:
            for processes in PROCESSES:
                label = f"sink → {name} (end to end" + (
                    f", {processes} processes)" if processes > 1 else ")"
                )
                runs: list[Row] = []
                for k in range(RUNS):
                    rate, cpu = await _measured(env, events, sink_url, serial, processes)
                    runs.append(Row(label, rate, cpu, targets[name]))
                    progress(
                        f"{label}: {rate:,.0f} events/s, {cpu:.1f} µs CPU/event "
                        f"(load {runs[-1].load:.1f}; run {k + 1} of {RUNS})"
                    )
                ranked = sorted(runs, key=lambda r: r.per_second)
                median = ranked[len(ranked) // 2]
                median.runs = tuple(r.per_second for r in ranked)
                rows.append(median)
            alone, cpu = await asyncio.to_thread(store_only, store_url, events)
            progress(f"store only ({name}): {alone:,.0f} events/s")
            rows.append(Row(f"store only ({name}, no Kafka, no decode)", alone, cpu))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a few hundred MB of SQLite files per run
        if pg is not None:
            _, admin = pg
            for s in schemas:
                admin.execute(f"DROP SCHEMA IF EXISTS {s} CASCADE")
            admin.close()

    def fmt(r: Row) -> list[str]:
        ratio = f"{r.per_second / pt:.2f}x" if pt else "n/a"
        target = "" if r.target is None else f"{r.target:,.0f}"
        verdict = "" if r.target is None else ("met" if r.per_second >= r.target else "MISSED")
        cells = [r.name, f"{r.per_second:,.0f}", ratio, f"{r.cpu_us:.1f}", f"{r.load:.1f}"]
        spread = "" if len(r.runs) < 2 else f"{r.runs[0] / 1000:.1f}k-{r.runs[-1] / 1000:.1f}k"
        return [*cells, target, verdict, spread]

    print()
    print(
        table(
            ["", "events/s", "vs pass-through", "CPU µs/event", "load", "target", "", "runs"],
            [fmt(r) for r in rows],
        )
    )
    print(
        f"(load: the one-minute load average on {os.cpu_count()} CPUs as each row was measured; "
        "events/s falls on a busy machine, CPU µs/event much less so"
        + (
            f"; sink rows are the median of {RUNS} runs, the slowest and fastest under 'runs')"
            if RUNS > 1
            else ")"
        )
    )
    print()
    progress(f"sink bench done in {time.monotonic() - started:.1f}s")
