"""Latency and throughput of the worker against a bare aiokafka consume→produce pass-through.

Both systems under test run in this process on the same broker, with the same driver and the
same observer, so the ratio isolates what the worker adds: decoding, planning, the audit chain,
the changelog and outbox, and its extra round trips before each commit.

* pass-through: a consumer group reads topic A with `getmany` and the worker's poll settings,
  sends every record to topic B, waits for the acks and commits: the least any at-least-once
  consume→produce service can do. The ratios are against this one.
  It polls with exactly the worker's fetch wait (`kafka.fetch_max_wait_ms`, by profile): the
  embedded broker holds every fetch for the whole wait, so a different setting on one side
  would measure the setting, not the work.
* worker: a signal on `signals` until its OrderIntents appear on `order-intents`. Three
  accounts with equal allocation, so every signal fans out to three intents.

Latency: send one message, wait until its first output is seen, repeat (after a warm-up).
Throughput: send a burst as fast as the producer goes; time until every output is seen.
The observer polls with a 1 ms fetch wait so that it adds as little as possible to either.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

from bench import BenchEnv, Latency, paper_account, progress, table
from orch_worker.adapters.kafka.clients import consumer_kwargs, ensure_topics, producer_kwargs
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.adapters.kafka.worker_app import Worker
from orch_worker.domain.config import KafkaConfig, OrchConfig

TITLE = "signal → order intent latency and throughput vs a bare aiokafka pass-through"

WARMUP = 50
SAMPLES = 500
PASS_THROUGH_BURST = 5_000
WORKER_BURST = 2_000
ACCOUNTS = 3
PORTFOLIO = "bench"

# The worker's subscriber settings (worker_app._subscribe), mirrored by the pass-through so
# the comparison is about work done, not about poll timing.
POLL_TIMEOUT_MS = 100
MAX_RECORDS = 500
TIGHT_FETCH_MAX_WAIT_MS = 1

FIRST_TIMEOUT_S = 10.0
BURST_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Result:
    latency: Latency
    per_second: float
    """Input messages (records, or signals) per second through the whole burst."""
    outputs_per_second: float


def signal_json(signal_id: str, created_at: datetime) -> bytes:
    """A Signal as a strategy publishes it; the pass-through carries the very same bytes."""
    return orjson.dumps(
        {
            "schema_version": 1,
            "signal_id": signal_id,
            "portfolio": PORTFOLIO,
            "strategy_id": "bench",
            "symbol": "EURUSD",
            "side": "buy",
            "order_type": "market",
            "reference_price": "1.1000",
            "stop_loss": "1.0950",
            "quantity": "0.03",
            "urgency": "normal",
            "confidence": 1.0,
            "created_at": created_at.isoformat(),
        }
    )


def signal_id_of(value: bytes) -> str:
    """Signals (pass-through) and OrderIntents (worker) both name their signal."""
    return str(orjson.loads(value)["signal_id"])


class Observer:
    """Reads an output topic from the beginning and notes when each signal's outputs arrive.

    A record counts as seen when the `getmany` that returned it returns: the same moment a
    downstream consumer could act on it, measured the same way for both systems.
    """

    def __init__(self, cfg: KafkaConfig, topic: str, per_signal: int) -> None:
        self.cfg, self.topic, self.per_signal = cfg, topic, per_signal
        self.first_seen: dict[str, float] = {}
        self.completed_at: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        kw = consumer_kwargs(self.cfg, None) | {"fetch_max_wait_ms": TIGHT_FETCH_MAX_WAIT_MS}
        self._consumer = AIOKafkaConsumer(**kw)
        await self._consumer.start()
        partitions = self._consumer.partitions_for_topic(self.topic) or set()
        if not partitions:
            raise RuntimeError(f"topic {self.topic} has no partitions")
        self._consumer.assign([TopicPartition(self.topic, p) for p in sorted(partitions)])
        await self._consumer.seek_to_beginning()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=POLL_TIMEOUT_MS)
            now = time.perf_counter()
            for records in batch.values():
                for r in records:
                    self._seen(signal_id_of(r.value), now)

    def _seen(self, signal_id: str, now: float) -> None:
        n = self._counts[signal_id] = self._counts.get(signal_id, 0) + 1
        if n == 1:
            self.first_seen[signal_id] = now
            waiter = self._waiters.pop(signal_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if n == self.per_signal:
            self.completed_at[signal_id] = now

    async def wait_first(self, signal_id: str) -> float:
        if signal_id not in self.first_seen:
            waiter = self._waiters.setdefault(signal_id, asyncio.get_running_loop().create_future())
            try:
                await asyncio.wait_for(waiter, FIRST_TIMEOUT_S)
            except TimeoutError:
                raise RuntimeError(
                    f"{signal_id} not seen on {self.topic} within {FIRST_TIMEOUT_S}s"
                ) from None
        return self.first_seen[signal_id]

    async def wait_complete(self, signal_ids: list[str], timeout_s: float) -> float:
        """The moment the last of these signals had all its outputs."""
        deadline = time.monotonic() + timeout_s
        pending = [s for s in signal_ids if s not in self.completed_at]
        while pending:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(pending)} of {len(signal_ids)} signals incomplete on {self.topic} "
                    f"after {timeout_s}s"
                )
            await asyncio.sleep(0.01)
            pending = [s for s in pending if s not in self.completed_at]
        return max(self.completed_at[s] for s in signal_ids)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()


async def drive(
    label: str,
    *,
    producer: AIOKafkaProducer,
    topic: str,
    key: bytes,
    observer: Observer,
    burst: int,
) -> Result:
    """Latency one at a time (after a warm-up), then throughput of one burst."""
    samples: list[float] = []
    for i in range(WARMUP + SAMPLES):
        sid = f"{label}-lat-{i}"
        value = signal_json(sid, datetime.now(UTC))
        sent = time.perf_counter()
        await producer.send_and_wait(topic, value, key=key)
        seen = await observer.wait_first(sid)
        if i >= WARMUP:
            samples.append(seen - sent)
        if i in (WARMUP - 1, WARMUP + SAMPLES // 2):
            progress(f"{label}: latency {i + 1}/{WARMUP + SAMPLES} (first {WARMUP} are warm-up)")
    latency = Latency.of(samples)
    await observer.wait_complete([f"{label}-lat-{i}" for i in range(WARMUP + SAMPLES)], 10.0)
    progress(f"{label}: latency p50 {latency.p50:.2f} ms; throughput burst of {burst:,}")

    ids = [f"{label}-tput-{i}" for i in range(burst)]
    now = datetime.now(UTC)
    values = [signal_json(sid, now) for sid in ids]
    started = time.perf_counter()
    acks = [await producer.send(topic, v, key=key) for v in values]
    await asyncio.gather(*acks)
    produced = time.perf_counter() - started
    done = await observer.wait_complete(ids, BURST_TIMEOUT_S)
    elapsed = done - started
    progress(
        f"{label}: {burst:,} in {elapsed:.2f}s "
        f"(producer done after {produced:.2f}s) = {burst / elapsed:,.0f}/s"
    )
    return Result(latency, burst / elapsed, burst * observer.per_signal / elapsed)


class _Assigned(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, event: asyncio.Event) -> None:
        self.event = event

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.event.clear()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.event.set()


async def pass_through_service(
    cfg: KafkaConfig,
    *,
    source: str,
    sink: str,
    group: str,
    fetch_max_wait_ms: int,
    stop: asyncio.Event,
    ready: asyncio.Event,
) -> None:
    """The baseline: consume a batch, produce every record, await the acks, commit."""
    kw = consumer_kwargs(cfg, group) | {"fetch_max_wait_ms": fetch_max_wait_ms}
    consumer = AIOKafkaConsumer(**kw)
    consumer.subscribe([source], listener=_Assigned(ready))
    producer = AIOKafkaProducer(**producer_kwargs(cfg))
    await producer.start()
    try:
        await consumer.start()
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=MAX_RECORDS)
            acks = [
                await producer.send(sink, r.value, key=r.key)
                for records in batch.values()
                for r in records
            ]
            if acks:
                await asyncio.gather(*acks)
                await consumer.commit()
    finally:
        await consumer.stop()
        await producer.stop()


async def bench_pass_through(env: BenchEnv, label: str, fetch_max_wait_ms: int) -> Result:
    cfg = env.kafka("pt")
    topics = Topics(cfg.topic_prefix)
    source, sink = topics.signals, topics.order_intents  # plain topics here, same shape
    await ensure_topics(cfg, topics)
    stop, ready = asyncio.Event(), asyncio.Event()
    service = asyncio.create_task(
        pass_through_service(
            cfg,
            source=source,
            sink=sink,
            group=f"bench-pt-{cfg.topic_prefix}",
            fetch_max_wait_ms=fetch_max_wait_ms,
            stop=stop,
            ready=ready,
        )
    )
    observer = Observer(cfg, sink, per_signal=1)
    producer = AIOKafkaProducer(**producer_kwargs(cfg))
    await producer.start()
    try:
        await observer.start()
        await _ready(ready, service, f"{label} consumer")
        progress(f"{label}: consumer joined its group (fetch wait {fetch_max_wait_ms} ms)")
        return await drive(
            label,
            producer=producer,
            topic=source,
            key=PORTFOLIO.encode(),
            observer=observer,
            burst=PASS_THROUGH_BURST,
        )
    finally:
        stop.set()
        await producer.stop()
        await observer.stop()
        await asyncio.wait_for(service, 10)


def worker_config(cfg: KafkaConfig, run_id: str) -> OrchConfig:
    return OrchConfig.model_validate(
        {
            "kafka": cfg,
            # No venue answers here, so every signal stays open: the latency samples and the
            # burst together pass the default `max_open_signals` (2,000), and the worker would
            # rightly hold the rest of the burst in Kafka until the first ones time out.
            "worker": {
                "group_id": f"bench-worker-{run_id}",
                "http_port": 0,
                "max_open_signals": WARMUP + SAMPLES + WORKER_BURST,  # every signal of the run
            },
            "instruments": {
                "EURUSD": {
                    "value_per_unit": "100000",
                    "lot_step": "0.01",
                    "min_quantity": "0.01",
                    "max_quantity": "50",
                    "margin_rate": "0.0333",
                }
            },
            # Released at once: this measures the decision path; release timing has its own
            # bench (scheduling).
            "portfolios": {PORTFOLIO: {"allocation": "equal", "stagger": {"min_s": 0, "max_s": 0}}},
            "accounts": {f"BENCH-{i}": {"portfolio": PORTFOLIO} for i in range(1, ACCOUNTS + 1)},
        }
    )


async def bench_worker(env: BenchEnv) -> Result:
    kafka = env.kafka("worker")
    cfg = worker_config(kafka, env.run_id)
    topics = Topics(kafka.topic_prefix)
    await ensure_topics(kafka, topics)
    producer = AIOKafkaProducer(**producer_kwargs(kafka))
    await producer.start()
    observer = Observer(kafka, topics.order_intents, per_signal=ACCOUNTS)
    worker = Worker(cfg, http=False)  # the real clock: signals are stamped now
    try:
        now = datetime.now(UTC)
        # The worker loads the account table at start, so the states must be there first.
        for account_id in cfg.accounts:
            state = paper_account(account_id, PORTFOLIO, now)
            await producer.send_and_wait(
                topics.account_state, state.model_dump_json().encode(), key=account_id.encode()
            )
        await observer.start()
        await worker.app.start()
        await worker.wait_ready()
        progress("worker: ready (account table loaded, group joined)")
        return await drive(
            "worker",
            producer=producer,
            topic=topics.signals,
            key=PORTFOLIO.encode(),
            observer=observer,
            burst=WORKER_BURST,
        )
    finally:
        await worker.app.stop()
        await producer.stop()
        await observer.stop()


async def _ready(ready: asyncio.Event, service: asyncio.Task[None], what: str) -> None:
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait({waiting, service}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if service.done():
        service.result()
        raise RuntimeError(f"{what} stopped before it was ready")
    if not ready.is_set():
        raise RuntimeError(f"{what} did not join its group in 30s")


def report(pt: Result, wk: Result, fetch_wait_ms: int) -> str:
    def row(name: str, r: Result, unit: str) -> list[str]:
        return [
            name,
            f"{r.latency.p50:.2f}",
            f"{r.latency.p99:.2f}",
            f"{r.latency.max:.2f}",
            f"{r.per_second:,.0f} {unit}",
            f"{r.outputs_per_second:,.0f}",
        ]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    headers = ["", "p50 ms", "p99 ms", "max ms", "throughput", "outputs/s"]
    rows = [
        row(f"pass-through (aiokafka, {fetch_wait_ms} ms fetch wait)", pt, "msg/s"),
        row(f"worker (1 signal -> {ACCOUNTS} intents)", wk, "signals/s"),
        [
            "ratio worker / pass-through",
            ratio(wk.latency.p50, pt.latency.p50),
            ratio(wk.latency.p99, pt.latency.p99),
            ratio(wk.latency.max, pt.latency.max),
            ratio(wk.per_second, pt.per_second),
            ratio(wk.outputs_per_second, pt.outputs_per_second),
        ],
    ]
    notes = (
        f"latency: {SAMPLES} samples after {WARMUP} warm-up, one message in flight, until its "
        f"first output is seen. throughput: a burst of {PASS_THROUGH_BURST:,} records "
        f"(pass-through) or {WORKER_BURST:,} signals (worker), until every output is seen.\n"
        "ratios: latency above 1x is slower than the pass-through; throughput below 1x is lower.\n"
        f"Both poll with the same {fetch_wait_ms} ms fetch wait (the profile's default)."
    )
    return f"{table(headers, rows)}\n{notes}"


async def run(env: BenchEnv) -> None:
    started = time.monotonic()
    fetch_wait = env.kafka("probe").fetch_wait
    pt = await bench_pass_through(env, "pass-through", fetch_wait)
    wk = await bench_worker(env)
    print()
    print(report(pt, wk, fetch_wait))
    print()
    progress(f"latency bench done in {time.monotonic() - started:.1f}s")
