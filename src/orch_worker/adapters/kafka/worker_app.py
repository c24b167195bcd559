"""The worker process: a FastStream app whose handlers feed the pure decider.

One batch subscriber in one consumer group reads signals, execution reports and control
commands, so all decisions are taken by one sequential loop (single writer); account states are
a table every worker reads whole. Offsets are committed manually, after the changelog, the
outputs and the done marker are acknowledged by the broker (see `changelog` for the order).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast

from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener, ConsumerRecord
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage

from orch_worker.adapters.heap import HeapPolicy
from orch_worker.adapters.http import HealthServer
from orch_worker.adapters.kafka.changelog import (
    OutRecord,
    Recovered,
    SnapshotScan,
    StateDumper,
    decision_record,
    done_record,
    fence_record,
    fold,
    snapshot_parts,
)
from orch_worker.adapters.kafka.clients import (
    KeyHashPartitioner,
    ensure_topics,
    faststream_security,
)
from orch_worker.adapters.kafka.codec import DecodeError, dead_letter, decode, encode
from orch_worker.adapters.kafka.intake import Intake, IntakeLimits
from orch_worker.adapters.kafka.lease import Lease, generation_of
from orch_worker.adapters.kafka.publisher import Batch, LeaseLostError, Publisher
from orch_worker.adapters.kafka.reader import (
    ReadIncompleteError,
    append_fences,
    partition_count,
    read_to_end,
)
from orch_worker.adapters.kafka.routing import (
    BROADCAST_HEADER,
    SOURCE_HEADER,
    control_portfolio,
    parse_source,
    portfolio_partition,
    report_portfolio,
    source,
)
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.adapters.kafka.wire import build_off_loop
from orch_worker.adapters.metrics import Metrics
from orch_worker.adapters.timers import TimerService
from orch_worker.domain import control_auth, decider
from orch_worker.domain.book import AccountBook
from orch_worker.domain.config import OrchConfig
from orch_worker.domain.coordinator import IntentStatus, SignalState
from orch_worker.domain.decider import Context, Decision, PortfolioState
from orch_worker.domain.models import (
    AccountState,
    AuditEvent,
    ControlCommand,
    DeadLetter,
    ExecutionReport,
    ExecutionResult,
    Intervention,
    OrderIntent,
    PriceTick,
    Signal,
)
from orch_worker.settings import ConfigError

log = logging.getLogger("orch_worker.worker")

Clock = Callable[[], datetime]
_Send = tuple[str, str | None, bytes, tuple[tuple[str, str], ...], int | None]

CHUNK_S = 0.003
"""Longest stretch of deciding before the slice is published and timers get a turn."""
TIMER_CHUNK_S = 0.005
"""Longest stretch of deciding due timers before the loop gets a turn: long enough that a
burst of releases is not interleaved with everything else (each yield lets the publisher, the
clients and the other tasks run), short enough for heartbeats and I/O to stay on time."""
QUIET_S = 1.0
"""No release due for this long: a full garbage collection may run now."""
FORGET_EVERY_S = 1.0
"""How often finished signals are looked for, to let them go from memory."""
SEND_SLICE_S = 0.002
"""Longest stretch of handing records to the producer before the loop gets a turn; a release
that falls due within it gets a turn after the record being handed over."""
RELEASES_FIRST_S = 0.05
"""Due releases go before input until the oldest is this late; then they take turns. Input
also waits at most this long for a gap between releases long enough to decide its next record."""
COST_WEIGHT = 0.2
"""Weight of the newest record in a topic's running average of deciding time."""
COST_MARGIN = 1.5
"""An input record is begun only with this many times its topic's average before the next
release: deciding times vary, and one that overruns makes the release late."""
INPUT_PATIENCE = 2.0
"""Input waits for such a gap at most this many times its record's cost (and never past
RELEASES_FIRST_S): with releases due back to back, input still gets a third of the loop, and a
release is late by at most one record."""
SNAPSHOT_SPACING = 4
"""At least this many decisions per signal held between two snapshots of a partition. A
snapshot writes every signal whole, a decision mostly a patch of one: so a snapshot costs under
a quarter of a whole signal per decision, and recovery reads about as much after the newest
snapshot as the snapshot itself."""
SNAPSHOT_IN_FLIGHT = 8
"""Snapshot parts (of up to 64 KiB) handed to the producer and not yet acknowledged."""
RECOVERY_FORGET_EVERY = 5_000
"""Changelog records folded between two looks for finished signals during recovery."""
INTAKE_EVERY_S = 0.25
"""How often paused signals are looked at again when no batch arrives (timers close signals
too, and with signals paused and no reports the decide loop may get nothing to handle)."""

LEASE_MARGIN = 0.2
"""Share of the session timeout the group lease ends before it (see lease.py)."""
LEASE_POLL_S = 0.01
"""How often a decision waiting for the lease looks again."""

BROKER_MEMORY = timedelta(seconds=60)
"""How far back release times count against a broker's rate budget."""


def utc_now() -> datetime:
    return datetime.now(UTC)


class _Assigned(ConsumerRebalanceListener):  # type: ignore[misc]
    """Moves portfolio ownership with the decide group's partitions.

    aiokafka calls these between polls, when no batch is being decided, so the state that
    changes hands is always fully published.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.event = asyncio.Event()

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.event.clear()
        w = self.worker
        w.rebalancing = True
        await w.stop_taking_ownership()  # a recovery still running is for the old assignment
        w.lease.attach(w._decide_sub.consumer)
        if w.owned and not w.lease.held():
            # Perhaps dropped from the group already, and another worker decided meanwhile.
            w.tainted = True
        # Wait for decisions still being published: the next owner of these partitions reads
        # the changelog once the group settles, so everything must be written by then. Without
        # the lease, what is queued is dropped instead (see `_may_publish`).
        await w.drain()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        w = self.worker
        w.lease.attach(w._decide_sub.consumer)
        w.fence_producer()
        w.lease.joined()
        owned = {tp.partition for tp in assigned if tp.topic == w.topics.signals}
        w.rebalancing = True
        w.begin_taking_ownership(owned, generation_of(w._decide_sub.consumer))


class _ListeningSince(Mapping[str, datetime]):
    """Portfolio -> since when this worker has been reading its reports as they come.

    That is when it gained the partition, or, later, when it last caught up after reports
    waited unread in numbers (`behind`, the intake's `reports_waiting`): an order's timeout
    runs only over time its answer could not have been waiting unread (see
    `execution.effective_deadline`). While behind, it is always "now", so nothing times out.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.since: dict[int, datetime] = {}
        self.behind = False
        self.caught_up: datetime | None = None

    def __getitem__(self, portfolio: str) -> datetime:
        if not self.since:
            raise KeyError(portfolio)
        began = self.since[portfolio_partition(portfolio, self.worker.n_partitions)]
        if self.behind:
            return max(began, self.worker.clock())
        if self.caught_up is not None and self.caught_up > began:
            return self.caught_up
        return began

    def reports_waiting(self, waiting: bool) -> None:
        if self.behind and not waiting:
            self.caught_up = self.worker.clock()
        self.behind = waiting

    def __iter__(self) -> Iterator[str]:
        return iter(p for p in self.worker.portfolios if p in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Worker:
    """State, recovery and the decision loop of one worker process."""

    def __init__(self, cfg: OrchConfig, *, clock: Clock = utc_now, http: bool = True) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.kafka.topic_prefix)
        self.clock = clock
        self.metrics = Metrics.create("worker")
        self.portfolios: dict[str, PortfolioState] = {}
        self.intent_index: dict[str, tuple[str, str]] = {}
        self.signal_index: dict[str, str] = {}
        # Keeps per-portfolio numpy columns current as states arrive, so planning does not
        # rebuild them per signal.
        self.accounts = AccountBook(cfg)
        self.recovered = False
        self._assigned = _Assigned(self)
        self._listening = _ListeningSince(self)
        self.owned: set[int] = set()
        self.n_partitions = 0
        self.rebalancing = False
        self.lease = Lease(
            cfg.kafka.session_timeout / 1000, cfg.kafka.session_timeout / 1000 * LEASE_MARGIN
        )
        # Set when memory may hold decisions that never reached Kafka, or miss decisions another
        # worker took: the next assignment then rebuilds every partition from the changelog.
        self.tainted = False
        self._group_generation: int | None = None
        # Partition -> the ownership epoch its decisions are stamped with (see changelog.py).
        self._epochs: dict[int, int | None] = {}
        # Partition -> decision records written since its last snapshot.
        self._since_snapshot: dict[int, int] = {}
        self.recovery_starts: dict[int, int] = {}
        """Where the last recovery began reading each partition (its newest snapshot)."""
        # Each held signal's JSON, by parts: a decision record or a snapshot serialises only
        # what changed since the signal was last written.
        self._dump_signal = StateDumper()
        # Decisions are taken synchronously (never interleaved) and published in that order.
        self.publisher = Publisher(
            self._publish_decisions, self._may_publish, on_take=self._capture_snapshots
        )
        # Held while partitions change hands: aiokafka may hand the decide loop a batch while
        # the rebalance callback is still recovering, and nothing may be decided on a state
        # that recovery is about to replace.
        self._ownership = asyncio.Lock()
        self.timers: TimerService[tuple[str, str]] = TimerService(clock)
        self._producer_fenced = False
        # Input topic -> running average of the seconds one record takes to decide.
        self._costs: dict[str, float] = {}
        self._broker_taken: dict[str, list[datetime]] = {}
        self._open_signals: set[str] = set()
        self._reserved: set[str] = set()
        self.failed = asyncio.Event()
        self.stopping = False
        self._forgot_at = datetime.min.replace(tzinfo=UTC)
        self.heap = (
            HeapPolicy(
                full_every_s=cfg.worker.full_gc_every_s, observe=self.metrics.full_gc.observe
            )
            if cfg.worker.freeze_heap
            else None
        )
        self.failure: BaseException | None = None
        self.prices: dict[str, Decimal] = {}
        # Changes on every ownership change: a slice of due timers taken before it is stale.
        self._generation = 0
        w = cfg.worker
        self.intake = Intake(
            self.topics.signals,
            self.topics.portfolio_inputs,
            IntakeLimits(
                max_open_signals=w.max_open_signals,
                resume_below=max(1, w.max_open_signals * 9 // 10),
                routed_lag=w.reports_first_at,
                routed_resume=max(1, w.reports_first_at // 10),
                behind_s=w.releases_behind_ms / 1000,
                behind_resume_s=w.releases_behind_ms / 4000,
            ),
            on_change=self._intake_changed,
        )
        self._intake_task: asyncio.Task[None] | None = None
        self._taking: asyncio.Task[None] | None = None
        self.http = (
            HealthServer(
                self.metrics.registry,
                self.is_ready,
                cfg.worker.http_port,
                cfg.worker.http_host,
                healthy=self.is_healthy,
            )
            if http
            else None
        )
        self.broker = KafkaBroker(
            cfg.kafka.bootstrap,
            enable_idempotence=cfg.kafka.idempotence,
            acks="all",
            compression_type=cfg.kafka.compression_type,
            max_request_size=cfg.kafka.max_message_bytes,
            # Decisions are written as bursts of records several KiB large; aiokafka's 16 KiB
            # default batch would send each as its own request, one round trip apiece.
            max_batch_size=max(cfg.kafka.max_message_bytes, 1_048_576),
            partitioner=KeyHashPartitioner(),
            security=faststream_security(cfg.kafka),
            logger=log,
            graceful_timeout=10.0,
        )
        self._subscribe()
        self.app = FastStream(self.broker, logger=log)
        self.app.on_startup(self.startup)
        self.app.on_shutdown(self._begin_stop)
        self.app.after_startup(self._start_timers)
        self.app.after_shutdown(self.shutdown)

    # -- lifecycle -------------------------------------------------------------------------

    def is_ready(self) -> bool:
        return self.recovered and self._assigned.event.is_set() and not self.failed.is_set()

    def is_healthy(self) -> bool:
        return not self.failed.is_set()

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise TimeoutError("worker did not become ready")
            await asyncio.sleep(0.02)

    async def startup(self) -> None:
        if self.http:
            await self.http.start()
        await ensure_topics(self.cfg.kafka, self.topics)
        n_accounts = await read_to_end(self.cfg.kafka, self.topics.account_state, self._on_account)
        log.info("account table loaded: %d records, %d accounts", n_accounts, len(self.accounts))
        await read_to_end(self.cfg.kafka, self.topics.prices, self._on_price)
        await self._check_partitions()
        # The state itself is loaded per partition, when the group assigns them.

    async def _begin_stop(self) -> None:
        # From here on nothing new is decided: what is not yet committed is redelivered to
        # whichever worker runs next, and a publish cut short by the closing producer is
        # not a failure.
        self.stopping = True
        self.lease.stop_waiting()  # as `_may_publish` does not wait for the lease from here
        await self.stop_taking_ownership()
        await self._stop_intake()
        await self.timers.stop()
        await self.drain()  # let decisions already taken reach Kafka before the producer closes

    async def _start_timers(self) -> None:
        # After the broker is connected: a due release publishes at once.
        self.timers.start(self._fire)
        self._intake_task = asyncio.create_task(self._intake_loop(), name="intake")
        if self.heap is not None:
            self.heap.install()

    async def _stop_intake(self) -> None:
        if self._intake_task is not None:
            self._intake_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._intake_task
            self._intake_task = None

    async def _intake_loop(self) -> None:
        while True:
            await asyncio.sleep(INTAKE_EVERY_S)
            await self._apply_intake()

    async def _apply_intake(self) -> None:
        """Pause or resume new signals for the present open count and report backlog."""
        if self.rebalancing or self.stopping or self.failed.is_set():
            return
        try:
            await self.intake.apply(
                self._decide_sub.consumer,
                len(self._open_signals),
                self.timers.behind_s(self.clock()),
            )
        except Exception as exc:  # a partition revoked under our feet: the next look decides
            log.debug("intake not applied: %r", exc)

    def _intake_changed(self, reason: str | None) -> None:
        self._listening.reports_waiting(reason == "reports_waiting")
        self.metrics.signals_paused.set(0 if reason is None else 1)
        if reason is not None:
            self.metrics.count(self.metrics.signal_pauses, reason)

    def _forget(self, now: datetime, *, every_s: float = FORGET_EVERY_S) -> None:
        """Let finished signals go from memory (see `decider.forget_finished`)."""
        if (now - self._forgot_at).total_seconds() < every_s:
            return
        self._forgot_at = now
        dropped = 0
        for name, pf in list(self.portfolios.items()):
            new, gone = decider.forget_finished(pf, now, self.cfg)
            if not gone and new is pf:
                continue
            self.portfolios[name] = new
            for st in gone:
                sid = st.signal.signal_id
                self._dump_signal.forget(sid)
                self.signal_index.pop(sid, None)
                self._open_signals.discard(sid)
                for i in st.intents:
                    self.intent_index.pop(i.intent.intent_id, None)
                    for cancel_id in i.cancel_ids:
                        self.intent_index.pop(cancel_id, None)
            dropped += len(gone)
        if dropped:
            self.metrics.forgotten.inc(dropped)
            log.debug("forgot %d finished signals", dropped)

    def _settle(self, *, backlog: bool) -> None:
        """Freeze what the last decision left alive (see adapters/heap.py)."""
        if self.heap is None:
            return
        nxt = self.timers.next_due()
        quiet = not backlog and (nxt is None or (nxt - self.clock()).total_seconds() > QUIET_S)
        self.heap.settle(quiet=quiet)

    def _aiokafka_producer(self) -> AIOKafkaProducer | None:
        """The aiokafka producer under FastStream's, None on its in-memory test broker (which
        has none and delivers at once)."""
        fast = getattr(self.broker.config, "producer", None)
        producer = getattr(getattr(fast, "_producer", None), "producer", None)
        return producer if isinstance(producer, AIOKafkaProducer) else None

    def fence_producer(self) -> None:
        """Have the producer check the lease again as it sends decision records (lease.py) and
        build large requests off the loop (wire.py)."""
        if self._producer_fenced:
            return
        producer = self._aiokafka_producer()
        if producer is None:
            return
        t = self.topics
        decisions = {t.changelog, t.order_intents, t.execution_results, t.interventions, t.audit}
        self._producer_fenced = self.lease.fence(
            producer, frozenset(decisions), self.metrics.fenced_batches.inc
        )
        build_off_loop(producer)  # around the fence, whose checks stay next to the write

    def _freeze(self) -> None:
        if self.heap is not None:
            self.heap.freeze()

    def _fail(self, exc: BaseException) -> None:
        """A decision was applied in memory but could not be made durable: stop deciding.

        Memory is now ahead of Kafka, so carrying on could lose or repeat work. Nothing more is
        committed; `failed` is set (health turns 503) and `orch-worker run` exits non-zero so a
        supervisor restarts it, and the restart rebuilds the state from the changelog.
        """
        if self.failed.is_set():
            return
        if self.stopping:
            log.info("publish cut short by shutdown (%r); uncommitted input is redelivered", exc)
            return
        if isinstance(exc, LeaseLostError):
            # Not published and not committed: the input is redelivered to the partitions'
            # owner, and memory is rebuilt from the changelog at the next assignment.
            log.warning("%s; memory is rebuilt at the next assignment", exc)
            self.tainted = True
            return
        log.critical("could not publish a decision, stopping: %r", exc, exc_info=exc)
        self.failure = exc
        self.failed.set()

    async def shutdown(self) -> None:
        await self._stop_intake()
        await self.timers.stop()
        if self.heap is not None:
            self.heap.uninstall()
        if self.http:
            await self.http.stop()

    async def _check_partitions(self) -> None:
        t = self.topics
        counts = {
            topic: await partition_count(self.cfg.kafka, topic)
            for topic in (t.signals, t.portfolio_inputs, t.changelog)
        }
        if len(set(counts.values())) != 1 or 0 in counts.values():
            raise ConfigError(
                "signals, the portfolio-inputs and changelog topics must have the same "
                f"number of partitions (co-partitioned by portfolio); found {counts}"
            )
        self.n_partitions = counts[t.signals]

    def owns(self, portfolio: str) -> bool:
        return portfolio_partition(portfolio, self.n_partitions) in self.owned

    def begin_taking_ownership(self, owned: set[int], generation: int | None) -> None:
        """Recover beside the group's heartbeats, not inside the assignment callback.

        aiokafka sends no heartbeat until that callback returns: a recovery longer than the
        session timeout inside it gets the worker dropped from the group, and the rebalance
        that follows starts the recovery again, over and over.
        """
        self._taking = asyncio.create_task(
            self._take_and_announce(owned, generation), name="take-ownership"
        )

    async def _take_and_announce(self, owned: set[int], generation: int | None) -> None:
        try:
            await self.take_ownership(owned, generation)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # without its state the worker must not decide: stop
            self._fail(exc)
            return
        if not self.failed.is_set():
            self._assigned.event.set()

    async def stop_taking_ownership(self) -> None:
        task, self._taking = self._taking, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def take_ownership(self, owned: set[int], generation: int | None = None) -> None:
        """Drop portfolios whose partitions left, load those that arrived, re-arm the timers.

        `generation` is the group generation of this assignment: one that moved by more than
        one since the last means the group rebalanced without this worker, so partitions it
        kept may have been decided elsewhere in between, and all are rebuilt.
        """
        async with self._ownership:
            await self._take_ownership(owned, generation)

    async def _take_ownership(self, owned: set[int], generation: int | None) -> None:
        self.rebalancing = True
        self._generation += 1
        await self.drain()
        last, self._group_generation = self._group_generation, generation
        skipped = last is not None and generation is not None and generation != last + 1
        if self.tainted or skipped:
            log.warning(
                "rebuilding every partition from the changelog: %s",
                "the group lease ran out while deciding for them"
                if self.tainted
                else f"the group moved from generation {last} to {generation} without us",
            )
            self.owned = set()
            self.portfolios = {}
            self.publisher.reset()
            self.tainted = False
        lost, gained = self.owned - owned, owned - self.owned
        for p in lost:
            self._listening.since.pop(p, None)
            self._epochs.pop(p, None)
        # Only what is loaded counts as owned: a recovery cut short by the next rebalance
        # leaves its partitions to be loaded again.
        self.owned = self.owned - lost
        if lost:
            self.portfolios = {n: p for n, p in self.portfolios.items() if self.owns(n)}
        try:
            if gained:
                await self.recover(gained, generation)
        except ReadIncompleteError as exc:  # acting on part of the history repeats work
            self._fail(exc)
            return
        except asyncio.CancelledError:
            self.portfolios = {n: p for n, p in self.portfolios.items() if self.owns(n)}
            raise
        self.owned = set(owned)
        now = self.clock()
        for p in gained:
            self._listening.since[p] = now
            self._epochs[p] = generation
        self._forget(now, every_s=0)
        self._reindex()
        self.rebalancing = False
        self.recovered = True
        self._settle(backlog=False)
        self.metrics.owned_partitions.set(len(owned))
        log.info(
            "own partitions %s (gained %s, lost %s): %d portfolios, %d open signals, "
            "%d pending timers",
            sorted(owned),
            sorted(gained),
            sorted(lost),
            len(self.portfolios),
            len(self._open_signals),
            len(self.timers),
        )

    def _reindex(self) -> None:
        held = {sid for pf in self.portfolios.values() for sid in pf.signals}
        self._dump_signal.keep(held)
        self.intent_index.clear()
        self.signal_index.clear()
        self._open_signals.clear()
        self._reserved.clear()
        self._broker_taken.clear()
        self.timers.clear()
        for pf in self.portfolios.values():
            self._index(pf, tuple(pf.signals))

    async def recover(self, partitions: set[int], epoch: int | None = None) -> None:
        """Rebuild these partitions' portfolios from the changelog; finish unfinished outboxes.

        The fence appended first carries `epoch`: from it on, decisions of earlier owners that
        arrive late are skipped by every later recovery (see changelog.py).
        """
        rec = Recovered()
        now = self.clock()
        topic = self.topics.changelog
        # The fence proves that every decision written before this read is folded in.
        fences = await append_fences(self.cfg.kafka, topic, partitions, fence_record(epoch))
        ends = {p: o + 1 for p, o in fences.items()}
        start = self.recovery_starts = await self._snapshot_starts(ends)

        def on_fence(r: ConsumerRecord[bytes, bytes]) -> None:
            fold(rec, r.value, r.partition)

        def on_record(r: ConsumerRecord[bytes, bytes]) -> None:
            fold(rec, r.value, r.partition)
            if rec.records % RECOVERY_FORGET_EVERY == 0:  # a long history must not fill memory
                for name, pf in rec.portfolios.items():
                    rec.portfolios[name] = decider.forget_finished(pf, now, self.cfg)[0]

        await read_to_end(
            self.cfg.kafka,
            topic,
            on_record,
            partitions=partitions,
            ends=ends,
            start=start,
            on_fence=on_fence,
        )
        for p in partitions:
            self._since_snapshot[p] = rec.records  # roughly: snapshot again after as many more
        for name, pf in rec.portfolios.items():
            if portfolio_partition(name, self.n_partitions) in partitions:
                self.portfolios[name] = pf
        log.info(
            "recovered %d changelog records of partitions %s (from offsets %s, %d snapshots): "
            "%d portfolios, %d signals, %d unfinished outboxes, %d decisions of deposed owners "
            "skipped",
            rec.records,
            sorted(partitions),
            {p: start.get(p, 0) for p in sorted(partitions)},
            rec.snapshots,
            len(rec.portfolios),
            sum(len(p.signals) for p in rec.portfolios.values()),
            len(rec.pending),
            rec.deposed,
        )
        if rec.pending:
            await self._finish_outboxes(rec)

    async def _snapshot_starts(self, ends: Mapping[int, int]) -> dict[int, int]:
        """Where each partition's newest usable snapshot starts, looked for in a tail of the
        partition that widens until one is found or the whole partition was looked at."""
        every = self.cfg.worker.snapshot_every
        found: dict[int, int] = {}
        if every <= 0:
            return found
        window = every + 500
        todo = dict(ends)
        scans: dict[int, SnapshotScan] = {}

        def feed(r: ConsumerRecord[bytes, bytes]) -> None:
            scans[r.partition].feed(r.offset, r.value)

        while todo:
            scans.clear()
            scans.update({p: SnapshotScan() for p in todo})
            lows = {p: max(0, end - window) for p, end in todo.items()}
            await read_to_end(
                self.cfg.kafka,
                self.topics.changelog,
                feed,
                partitions=set(todo),
                ends=todo,
                start=lows,
                on_fence=feed,
            )
            for p, scan in scans.items():
                if scan.start is not None:
                    found[p] = scan.start
            todo = {p: e for p, e in todo.items() if p not in found and lows[p] > 0}
            window *= 4
        return found

    async def _finish_outboxes(self, rec: Recovered) -> None:
        """Republish what a crash left between a decision and its done marker, verbatim."""
        released: set[str] = set()

        def seen_intent(r: ConsumerRecord[bytes, bytes]) -> None:
            try:
                released.add(OrderIntent.model_validate_json(r.value).intent_id)
            except ValueError:
                return

        await read_to_end(self.cfg.kafka, self.topics.order_intents, seen_intent)
        futures = []
        for records in rec.pending.values():
            for r in records:
                if r.topic == self.topics.order_intents:
                    intent_id = OrderIntent.model_validate_json(r.value).intent_id
                    if intent_id in released:
                        continue  # published before the crash: never release twice
                futures.append(await self._send(r.topic, r.key, r.value))
                self.metrics.count(self.metrics.recovered, r.topic)
        await asyncio.gather(*futures)
        for portfolio, outbox_ids in rec.pending_by_portfolio().items():
            await (await self._send(self.topics.changelog, portfolio, done_record(outbox_ids)))

    # -- subscribers -----------------------------------------------------------------------

    def _subscribe(self) -> None:
        k = self.cfg.kafka
        t = self.topics
        common: dict[str, Any] = {
            "batch": True,
            "max_records": self.cfg.worker.max_batch,
            "batch_timeout_ms": 100,
            "fetch_max_wait_ms": k.fetch_wait,
            "ack_policy": AckPolicy.MANUAL,
            "auto_offset_reset": k.auto_offset_reset,
            "max_partition_fetch_bytes": max(k.max_message_bytes * 2, 1_048_576),
        }
        group: dict[str, Any] = {
            "session_timeout_ms": k.session_timeout,
            "heartbeat_interval_ms": k.heartbeat_interval,
        }
        # Range assignment gives partition i of both topics to one member: with the changelog
        # keyed the same way, a portfolio's inputs and state move together on failover.
        self._decide_sub = self.broker.subscriber(
            t.signals,
            t.portfolio_inputs,
            group_id=self.cfg.worker.group_id,
            listener=self._assigned,
            partition_assignment_strategy=(RangePartitionAssignor,),
            title="decide",
            description="Signals and routed reports/control, by portfolio: one decision loop.",
            **group,
            **common,
        )
        self._decide_sub(self.handle_batch)
        self.broker.subscriber(
            t.execution_reports,
            t.control,
            group_id=f"{self.cfg.worker.group_id}-router",
            title="route",
            description="Execution reports and control commands, re-keyed by portfolio.",
            **group,
            **common,
        )(self.handle_route)
        # Declared for the AsyncAPI document: what the worker publishes, with its schemas.
        outputs: list[tuple[str, type[Any], str]] = [
            (t.order_intents, OrderIntent, "Per-account orders, keyed by account_id."),
            (t.execution_results, ExecutionResult, "Per-signal progress and outcome."),
            (t.interventions, Intervention, "Decisions that need a human."),
            (t.audit, AuditEvent, "Hash-chained decisions and transitions, keyed by portfolio."),
            (t.dead_letter, DeadLetter, "Refused input with its origin and the reason."),
        ]
        for topic, model, text in outputs:
            self.broker.publisher(topic, schema=model, title=topic, description=text)
        # A table, not a stream: every worker reads every account state, so no group.
        self.broker.subscriber(
            t.account_state,
            title="account-table",
            description="Latest AccountState per account (client-side compaction).",
            **{**common, "auto_offset_reset": "earliest"},
        )(self.handle_accounts)
        self.broker.subscriber(
            t.prices,
            title="price-table",
            description="Latest price per symbol, for the release drift budget (optional).",
            **{**common, "auto_offset_reset": "earliest"},
        )(self.handle_prices)

    async def handle_accounts(self, msg: KafkaMessage) -> None:
        for rec in _records(msg):
            self.metrics.count(self.metrics.consumed, rec.topic)
            self._on_account(rec)
        # No group, nothing to commit: the table is rebuilt from the topic at every start.

    def _on_account(self, rec: ConsumerRecord[bytes, bytes]) -> None:
        try:
            state = decode(AccountState, rec.value)
        except DecodeError as exc:
            # Refused by the table; dead-lettered once by whichever worker sees it during its
            # live subscription would duplicate across workers, so log and count instead.
            self.metrics.count(self.metrics.dead_lettered, rec.topic, exc.error_type)
            log.warning(
                "ignored invalid account state at %s/%d: %s", rec.partition, rec.offset, exc
            )
            return
        old = self.accounts.get(state.account_id)
        if old is None or state.updated_at >= old.updated_at:
            self.accounts.update(state)

    async def handle_batch(self, msg: KafkaMessage) -> None:
        started = time.perf_counter()
        records = list(_records(msg))
        done = 0
        last: asyncio.Future[None] | None = None
        # Decide in slices of at most CHUNK_S of work and hand each to the publisher, yielding
        # in between so that due release timers are decided on time: a large batch must not
        # hold releases back. A crash before the ack redelivers the batch, and the decided part
        # dedupes as duplicates.
        while done < len(records):
            if not await self._may_decide(self._cost(records[done].topic)):
                return
            async with self._ownership:  # no await inside: a slice is decided in one go
                if self.failed.is_set() or self.stopping:
                    return  # nothing more is decided or committed; the restart redelivers
                if self.rebalancing or not self.lease.held():
                    continue
                batch = Batch()
                chunk_started = time.perf_counter()
                begun = done
                while done < len(records):
                    rec = records[done]
                    if done > begun and not self._gap_for(self._cost(rec.topic)):
                        break  # a release falls due first: it goes, this record waits
                    done += 1
                    if rec.partition not in self.owned:
                        continue  # its partition moved on in a rebalance: its new owner reads it
                    self.metrics.count(self.metrics.consumed, rec.topic)
                    began = time.perf_counter()
                    self._decide(rec, batch)
                    ended = time.perf_counter()
                    self._learn_cost(rec.topic, ended - began)
                    if ended - chunk_started > CHUNK_S:
                        break
                last = self._submit(batch)
            self._freeze()
            await asyncio.sleep(0)
        if last is not None:
            try:
                await last
            except Exception as exc:  # any failure leaves memory ahead of Kafka
                self._fail(exc)
        if not self.failed.is_set() and not self.stopping:
            await msg.ack()
        self._forget(self.clock())
        await self._apply_intake()
        self._settle(backlog=len(records) >= self.cfg.worker.max_batch)
        self.metrics.handler_latency.labels("decide").observe(time.perf_counter() - started)
        self.metrics.open_signals.set(len(self._open_signals))
        self.metrics.pending_releases.set(len(self.timers))

    async def _may_decide(self, cost_s: float = 0.0) -> bool:
        """Wait for a turn to decide input that takes about `cost_s`; False once nothing more
        may be decided.

        Nothing is decided while partitions change hands or another worker may own them.
        Due releases go first while they keep up: input waits for the timers being decided,
        and for a gap before the next release long enough for its record, unless the oldest
        due release is already RELEASES_FIRST_S late or input has waited INPUT_PATIENCE times
        its record's cost. Past that
        the process is overloaded and the two take turns, slice by slice, so reports are never
        starved by releases (a report held back past its order's acknowledgement timeout would
        turn an answered order into an unknown outcome); the intake then holds new signals
        back until the timers catch up."""
        waiting_since = time.perf_counter()
        patience = min(RELEASES_FIRST_S, INPUT_PATIENCE * cost_s)
        while True:
            if self.timers.firing:
                wait_s = RELEASES_FIRST_S - self.timers.behind_s(self.clock())
                if wait_s > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.timers.wait_idle(), wait_s)
            gap = self.timers.until_due(self.clock())
            waited = time.perf_counter() - waiting_since
            if gap >= cost_s or waited >= patience or -gap >= RELEASES_FIRST_S:
                break
            # The release falls due within the record's time: let it go first.
            await asyncio.sleep(max(0.0, min(gap, patience - waited)))
        while self.rebalancing or not self.lease.held():
            if self.failed.is_set() or self.stopping:
                return False
            await asyncio.sleep(LEASE_POLL_S)
        return True

    def _cost(self, topic: str) -> float:
        """About how long a record of `topic` takes to decide, with a margin (0 until known)."""
        return self._costs.get(topic, 0.0) * COST_MARGIN

    def _learn_cost(self, topic: str, took_s: float) -> None:
        known = self._costs.get(topic)
        self._costs[topic] = took_s if known is None else known + COST_WEIGHT * (took_s - known)

    def _gap_for(self, cost_s: float) -> bool:
        """No release falls due within the next `cost_s`."""
        return self.timers.until_due(self.clock()) >= cost_s

    def _release_waits(self) -> bool:
        """A release fell due and waits for its first turn: it goes after the record being
        handed over, not after the stretch. That holds while due timers are being decided too,
        as long as they keep up; once the oldest is RELEASES_FIRST_S late, publishing and
        deciding take turns by the stretch, or a backlog would starve the publisher."""
        now = self.clock()
        if self.timers.until_due(now) > 0:
            return False
        return not self.timers.firing or self.timers.behind_s(now) < RELEASES_FIRST_S

    def _submit(self, batch: Batch) -> asyncio.Future[None]:
        return self.publisher.submit(batch)

    def _capture_snapshots(self, batch: Batch) -> None:
        """A round is taken: snapshot its partitions as memory holds them now, which is the
        state after its last decision (deciding never awaits between applying and
        submitting). Immutable states: the references are the snapshot."""
        for p in batch.snapshot_due:
            states = [
                pf
                for name, pf in self.portfolios.items()
                if portfolio_partition(name, self.n_partitions) == p
            ]
            batch.snapshots[p] = (self._epochs.get(p), states)

    async def drain(self) -> None:
        """Wait until every decision taken so far is published (or its publish failed)."""
        await self.publisher.drain()

    # -- deciding --------------------------------------------------------------------------

    def _decide(self, rec: ConsumerRecord[bytes, bytes], batch: Batch) -> None:
        t = self.topics
        now = self.clock()
        ctx = self._context(now)
        try:
            source = rec.topic
            if rec.topic == t.portfolio_inputs:
                source = parse_source(_header(rec, SOURCE_HEADER) or "?/0/0")[0]
            if source == t.signals:
                signal = decode(Signal, rec.value)
                if signal.portfolio not in self.cfg.portfolios:
                    raise DecodeError(
                        "unknown_portfolio", f"no portfolio {signal.portfolio!r} configured"
                    )
                if not self.owns(signal.portfolio):
                    # Produced with another partitioner: send it to its portfolio's partition.
                    self._forward(rec, signal.portfolio, batch)
                    return
                pf = self._portfolio(signal.portfolio)
                self._apply("signal", decider.on_signal(pf, signal, ctx), batch, None)
            elif source == t.execution_reports:
                report = decode(ExecutionReport, rec.value)
                where = self.intent_index.get(report.intent_id)
                if where is None:
                    raise DecodeError(
                        "unknown_intent", f"no intent {report.intent_id} is followed here"
                    )
                portfolio, signal_id = where
                pf = self._portfolio(portfolio)
                self._apply("report", decider.on_report(pf, signal_id, report, ctx), batch, None)
            elif source == t.control:
                cmd = decode(ControlCommand, rec.value)
                if _header(rec, BROADCAST_HEADER) and (cmd.signal_id not in self.signal_index):
                    return  # a copy for every partition; this one's owner has no such signal
                pf = self._portfolio(self._control_portfolio(cmd))
                self._authorise(cmd, pf, now)
                self._apply("control", decider.on_control(pf, cmd, ctx), batch, cmd.command_id)
        except DecodeError as exc:
            self._dead_letter(rec, exc.error_type, str(exc), now, batch)
        except Exception as exc:  # a bug met by this input: keep it, keep going
            # The core is pure, so a failed decision changed nothing: the input is kept in the
            # dead-letter topic with the error, and the worker carries on with the next one.
            log.exception("deciding %s/%d@%d failed", rec.topic, rec.partition, rec.offset)
            self._dead_letter(rec, "processing_error", repr(exc), now, batch)

    def _authorise(self, cmd: ControlCommand, pf: PortfolioState, now: datetime) -> None:
        secret = self.cfg.worker.control_secret
        if secret is None:
            return
        refused = control_auth.refusal(
            cmd,
            secret.get_secret_value().encode(),
            now,
            max_age_s=self.cfg.worker.control_max_age_s,
            max_skew_s=self.cfg.worker.control_max_skew_s,
            seen=pf.seen_commands,
        )
        if refused is not None:
            raise DecodeError(*refused)

    def _forward(self, rec: ConsumerRecord[bytes, bytes], portfolio: str, batch: Batch) -> None:
        batch.outputs.append(
            OutRecord(
                self.topics.portfolio_inputs,
                portfolio,
                rec.value or b"",
                ((SOURCE_HEADER, source(rec.topic, rec.partition, rec.offset)),),
            )
        )
        self.metrics.count(self.metrics.outcomes, "route", "forwarded")

    async def handle_route(self, msg: KafkaMessage) -> None:
        """Re-key execution reports and control commands by portfolio, then commit."""
        t = self.topics
        batch = Batch()
        for rec in _records(msg):
            self.metrics.count(self.metrics.consumed, rec.topic)
            now = self.clock()
            try:
                if rec.topic == t.execution_reports:
                    report = decode(ExecutionReport, rec.value)
                    portfolio = report_portfolio(report, self.cfg)
                    if portfolio is None:
                        raise DecodeError(
                            "unknown_account", f"no account {report.account_id!r} configured"
                        )
                    self._forward(rec, portfolio, batch)
                else:
                    cmd = decode(ControlCommand, rec.value)
                    portfolio = control_portfolio(cmd, self.cfg)
                    if portfolio is not None:
                        if portfolio not in self.cfg.portfolios:
                            raise DecodeError(
                                "unknown_portfolio", f"no portfolio {portfolio!r} configured"
                            )
                        self._forward(rec, portfolio, batch)
                    elif cmd.signal_id is not None:
                        self._broadcast(rec, batch)
                    else:
                        raise DecodeError(
                            "unknown_target",
                            "control command names no known portfolio, account or signal",
                        )
            except DecodeError as exc:
                self._dead_letter(rec, exc.error_type, str(exc), now, batch)
        try:
            await self._publish(batch)
        except Exception as exc:  # not acked: the records are routed again after a restart
            self._fail(exc)
            return
        await msg.ack()

    def _broadcast(self, rec: ConsumerRecord[bytes, bytes], batch: Batch) -> None:
        """A command that names only a signal goes to every partition; its owner acts on it."""
        origin = source(rec.topic, rec.partition, rec.offset)
        for partition in range(self.n_partitions):
            batch.outputs.append(
                OutRecord(
                    self.topics.portfolio_inputs,
                    None,
                    rec.value or b"",
                    ((SOURCE_HEADER, origin), (BROADCAST_HEADER, "1")),
                    partition,
                )
            )

    def _control_portfolio(self, cmd: ControlCommand) -> str:
        if cmd.portfolio is not None:
            name = cmd.portfolio
        elif cmd.account_id is not None and cmd.account_id in self.cfg.accounts:
            name = self.cfg.accounts[cmd.account_id].portfolio
        elif cmd.signal_id is not None and cmd.signal_id in self.signal_index:
            name = self.signal_index[cmd.signal_id]
        else:
            raise DecodeError(
                "unknown_target", "control command names no known portfolio, account or signal"
            )
        if name not in self.cfg.portfolios:
            raise DecodeError("unknown_portfolio", f"no portfolio {name!r} configured")
        return name

    def _portfolio(self, name: str) -> PortfolioState:
        pf = self.portfolios.get(name)
        if pf is None:
            pf = self.portfolios[name] = PortfolioState(portfolio=name)
        return pf

    def _apply(self, kind: str, d: Decision, batch: Batch, command_id: str | None) -> None:
        self.metrics.count(self.metrics.outcomes, kind, d.outcome)
        if not d.has_outputs and d.state is self.portfolios.get(d.state.portfolio):
            return
        t = self.topics
        outbox = [OutRecord(t.order_intents, i.account_id, encode(i)) for i in d.intents]
        outbox += [OutRecord(t.execution_results, r.signal_id, encode(r)) for r in d.results]
        outbox += [OutRecord(t.interventions, i.signal_id, encode(i)) for i in d.interventions]
        outbox += [
            OutRecord(t.audit, e.portfolio, raw)
            for e, raw in zip(d.audit, d.audit_json, strict=True)
        ]
        outbox_id = uuid.uuid4().hex
        partition = portfolio_partition(d.state.portfolio, self.n_partitions)
        record = decision_record(
            outbox_id,
            d.state,
            d.changed_signals,
            command_id,
            outbox,
            epoch=self._epochs.get(partition),
            dump=self._dump_signal,
            before=self.portfolios.get(d.state.portfolio),
        )
        # Memory moves only once everything to publish is built: an error above leaves the
        # state as it was, so the input can be dead-lettered without diverging from Kafka.
        self.portfolios[d.state.portfolio] = d.state
        self._index(d.state, d.changed_signals)
        batch.changelog.append((d.state.portfolio, record))
        batch.outputs += outbox
        batch.outbox_ids.setdefault(d.state.portfolio, []).append(outbox_id)
        every = self.cfg.worker.snapshot_every
        written = self._since_snapshot.get(partition, 0) + 1
        due = every > 0 and written >= max(every, SNAPSHOT_SPACING * len(d.state.signals))
        self._since_snapshot[partition] = 0 if due else written
        if due:
            batch.snapshot_due.add(partition)
        for i in d.intents:
            self.metrics.count(self.metrics.intents, i.kind.value)
        for r in d.results:
            self.metrics.count(self.metrics.results, r.status.value)

    def _index(self, pf: PortfolioState, signal_ids: tuple[str, ...]) -> None:
        for sid in signal_ids:
            st = pf.signals[sid]
            self.signal_index[sid] = pf.portfolio
            if st.status.terminal:
                self._open_signals.discard(sid)
            else:
                self._open_signals.add(sid)
            for i in st.intents:
                iid = i.intent.intent_id
                self.intent_index[iid] = (pf.portfolio, sid)
                for cancel_id in i.cancel_ids:  # a venue's refusal of a cancel names the cancel
                    self.intent_index[cancel_id] = (pf.portfolio, sid)
                if (
                    i.status is IntentStatus.SCHEDULED
                    and iid not in self._reserved
                    and self._rated(i.intent.broker)
                ):
                    # Only brokers with a rate budget need their reservations remembered.
                    self._reserved.add(iid)
                    bisect.insort(
                        self._broker_taken.setdefault(i.intent.broker, []),
                        i.intent.scheduled_at,
                    )
            self._arm(pf.portfolio, st)

    def _arm(self, portfolio: str, st: SignalState) -> None:
        """Every time-driven step of a signal (a release, a timeout, a retry) is found by the
        pure core; the shell only sets an alarm for it."""
        wake = decider.next_wake(st, self.cfg, self._listening.get(portfolio))
        if wake is not None:
            self.timers.add(wake, (st.signal.signal_id, wake), (portfolio, st.signal.signal_id))

    def _rated(self, broker: str) -> bool:
        found = self.cfg.brokers.get(broker)
        return found is not None and found.max_orders_per_s is not None

    def _context(self, now: datetime) -> Context:
        horizon = now - BROKER_MEMORY
        for times in self._broker_taken.values():
            if times and times[0] < horizon:
                del times[: bisect.bisect_left(times, horizon)]  # kept sorted by insort
        return Context(
            config=self.cfg,
            now=now,
            accounts=self.accounts,
            broker_taken=self._broker_taken,
            prices=self.prices,
            listening_since=self._listening,
        )

    def _on_price(self, rec: ConsumerRecord[bytes, bytes]) -> None:
        try:
            tick = decode(PriceTick, rec.value)
        except DecodeError as exc:
            self.metrics.count(self.metrics.dead_lettered, rec.topic, exc.error_type)
            log.warning("ignored invalid price at %s/%d: %s", rec.partition, rec.offset, exc)
            return
        self.prices[tick.symbol] = tick.price

    async def handle_prices(self, msg: KafkaMessage) -> None:
        for rec in _records(msg):
            self.metrics.count(self.metrics.consumed, rec.topic)
            self._on_price(rec)

    async def _fire(self, due: list[tuple[str, str]]) -> None:
        """Timers fired: decide the due signals now and hand them to the publisher.

        Decided in slices of at most TIMER_CHUNK_S, like a batch of input: after a restart or
        a stall thousands of timeouts can fall due together, and one synchronous pass over them
        would hold the loop (and the group heartbeat) for seconds. A release is late by at most
        one slice; the timer loop does not wait for the publish.
        """
        generation = self._generation
        # A signal with several due timers (say a release and a timeout) is decided once.
        pending = list(dict.fromkeys(due))
        await self._fire_slices(pending, generation)
        self._settle(backlog=True)

    async def _fire_slices(self, pending: list[tuple[str, str]], generation: int) -> None:
        done = 0
        while done < len(pending):
            if self.rebalancing or not await self._hold_lease(generation):
                return  # moved to another worker (which re-arms its own timers), or stopping
            ctx = self._context(self.clock())
            batch = Batch()
            started = time.perf_counter()
            while True:
                if done == len(pending):
                    # Timers that fell due meanwhile go in this slice, decided at their own
                    # time: after it they would wait behind every task the loop has ready.
                    now = self.clock()
                    fresh = self.timers.take_due(now)
                    if not fresh:
                        break
                    pending.extend(dict.fromkeys(fresh))
                    ctx = self._context(now)
                portfolio, sid = pending[done]
                done += 1
                pf = self.portfolios.get(portfolio)
                if pf is None:
                    continue
                # One decision per signal keeps every changelog record small, however many
                # releases fall due at once.
                before = pf.signals.get(sid)
                self._apply("timer", decider.on_due(pf, [sid], ctx), batch, None)
                if before is not None and self.portfolios[portfolio].signals.get(sid) is before:
                    # Fired for nothing (a deadline moved on since the alarm was set: reports
                    # waited unread meanwhile): the state is unchanged, so `_apply` did not
                    # index it, and its next alarm must be set here.
                    self._arm(portfolio, before)
                if time.perf_counter() - started > TIMER_CHUNK_S:
                    break
            self._submit(batch).add_done_callback(self._published_timers)
            self._freeze()
            if done < len(pending):
                await asyncio.sleep(0)

    async def _hold_lease(self, generation: int) -> bool:
        """Wait until the group lease is held; False if ownership changed or work must stop."""
        while not self.lease.held():
            if (
                self.failed.is_set()
                or self.stopping
                or self.rebalancing
                or generation != self._generation
            ):
                return False
            await asyncio.sleep(LEASE_POLL_S)
        return not (self.failed.is_set() or self.stopping or generation != self._generation)

    async def _may_publish(self) -> bool:
        """Gate of every publish round: never publish while another worker may own the
        partitions. In a rebalance without the lease, what is queued is dropped (the input is
        redelivered); otherwise wait for the next heartbeat."""
        while not self.lease.held():
            if self.rebalancing or self.stopping or self.failed.is_set():
                return False
            await asyncio.sleep(LEASE_POLL_S)
        return True

    def _published_timers(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._fail(exc)

    def _dead_letter(
        self,
        rec: ConsumerRecord[bytes, bytes],
        error_type: str,
        error: str,
        now: datetime,
        batch: Batch,
    ) -> None:
        # A routed record is reported where it came from, so operators find the original.
        topic, partition, offset = rec.topic, rec.partition, rec.offset
        origin = _header(rec, SOURCE_HEADER) if topic == self.topics.portfolio_inputs else None
        if origin is not None:
            topic, partition, offset = parse_source(origin)
        self.metrics.count(self.metrics.dead_lettered, topic, error_type)
        log.warning("dead-lettered %s/%d@%d: %s", topic, partition, offset, error)
        dl = dead_letter(
            topic=topic,
            partition=partition,
            offset=offset,
            key=rec.key,
            value=rec.value,
            error_type=error_type,
            error=error,
            now=now,
            consumer=self.cfg.worker.group_id,
        )
        key = rec.key.decode("utf-8", "replace") if rec.key is not None else None
        batch.outputs.append(OutRecord(self.topics.dead_letter, key, encode(dl)))

    # -- publishing ------------------------------------------------------------------------

    async def _send(
        self,
        topic: str,
        key: str | None,
        value: bytes,
        headers: tuple[tuple[str, str], ...] = (),
        partition: int | None = None,
    ) -> asyncio.Future[Any]:
        """Hand one record to the producer; the future is its acknowledgement.

        Straight to aiokafka when there is one: FastStream's publish path (middlewares, a
        random correlation id header, an empty content-type header per record) cost as much as
        aiokafka's own `send`, about a tenth of the worker's CPU per release. Records carry
        only their own headers; no consumer of these topics reads FastStream's.
        """
        raw_key = key.encode("utf-8") if key is not None else None
        producer = self._aiokafka_producer()
        if producer is not None:
            sent: Any = await producer.send(
                topic,
                value,
                key=raw_key,
                partition=partition,
                headers=[(k, v.encode("utf-8")) for k, v in headers] if headers else None,
            )
            self.metrics.count(self.metrics.published, topic)
            return cast("asyncio.Future[Any]", sent)
        sent = await self.broker.publish(
            value,
            topic,
            key=raw_key,
            headers=dict(headers) if headers else None,
            partition=partition,
            no_confirm=True,
        )
        self.metrics.count(self.metrics.published, topic)
        if isinstance(sent, asyncio.Future):
            return sent
        # The in-memory test broker delivers synchronously and returns the result itself.
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(sent)
        return done

    async def _publish_decisions(self, batch: Batch) -> None:
        await self._publish(batch, fenced=True)

    async def _publish(self, batch: Batch, *, fenced: bool = False) -> None:
        """Changelog, then outputs, then done markers. `fenced`: the batch holds decisions of
        the decide group, and no record of it is handed to the producer without the lease."""
        changelog = [(self.topics.changelog, p, v, (), None) for p, v in batch.changelog]
        await self._send_all(changelog, fenced)
        outputs = [(o.topic, o.key, o.value, o.headers, o.partition) for o in batch.outputs]
        await self._send_all(outputs, fenced)
        # Done markers are keyed by portfolio so they follow their decisions in the same
        # partition. Losing one only means a restart republishes outputs that consumers
        # already deduplicate (and intents are checked against the topic first).
        done = [
            (self.topics.changelog, p, done_record(ids), (), None)
            for p, ids in batch.outbox_ids.items()
        ]
        await self._send_all(done, fenced)
        for partition, (epoch, states) in batch.snapshots.items():
            await self._snapshot(partition, epoch, states, fenced)

    async def _snapshot(
        self, partition: int, epoch: int | None, states: list[PortfolioState], fenced: bool
    ) -> None:
        """Append a snapshot after the round's done markers; serialising thousands of signals
        takes a while, so the loop gets a turn between parts.

        At most SNAPSHOT_IN_FLIGHT parts wait for the broker: the producer compresses all that
        waits in one go, and megabytes of parts piled up behind a slow acknowledgement would
        hold the loop (and a due release) for tens of milliseconds."""
        in_flight: collections.deque[asyncio.Future[Any]] = collections.deque()
        for part in snapshot_parts(uuid.uuid4().hex, states, epoch, self._dump_signal):
            if len(in_flight) >= SNAPSHOT_IN_FLIGHT:
                await in_flight.popleft()
            if fenced and not self.lease.held() and not await self._may_publish():
                raise LeaseLostError("group lease lost in the middle of a snapshot")
            in_flight.append(await self._send(self.topics.changelog, None, part, (), partition))
            self._freeze()
            await asyncio.sleep(0)
        await asyncio.gather(*in_flight)

    async def _send_all(self, records: Sequence[_Send], fenced: bool = False) -> None:
        """Send and wait for every acknowledgement, yielding now and then: a round of thousands
        of records must not hold a due release timer back.

        Fenced records are handed over one by one under the lease: a process frozen in the
        middle of a round (stopped, swapped out) must not finish it after waking if its
        partitions went elsewhere meanwhile. What it had sent stays an unfinished outbox in
        the changelog, which the owner completes (see `_finish_outboxes`).
        """
        futures = []
        started = time.perf_counter()
        for topic, key, value, headers, partition in records:
            if fenced and not self.lease.held() and not await self._may_publish():
                raise LeaseLostError("group lease lost in the middle of a publish round")
            futures.append(await self._send(topic, key, value, headers, partition))
            if time.perf_counter() - started > SEND_SLICE_S or self._release_waits():
                await asyncio.sleep(0)
                started = time.perf_counter()
        if futures:
            await asyncio.gather(*futures)


def _header(rec: ConsumerRecord[bytes, bytes], name: str) -> str | None:
    for key, value in rec.headers or ():
        if key == name:
            return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    return None


def _records(msg: KafkaMessage) -> Sequence[ConsumerRecord[bytes, bytes]]:
    raw = msg.raw_message
    if isinstance(raw, (tuple, list)):
        return raw
    return (raw,)


def build_worker(cfg: OrchConfig, *, clock: Clock = utc_now, http: bool = True) -> Worker:
    return Worker(cfg, clock=clock, http=http)
