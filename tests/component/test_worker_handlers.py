"""The worker's FastStream handlers on the in-memory broker: fast checks of the wiring.

The real-broker behaviour (commits, recovery, kill -9) is proven in tests/integration; here the
handler is fed records in memory and its publications are captured by in-memory subscribers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import orjson
import pytest
from faststream.kafka import TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage

from orch_worker.adapters.kafka import worker_app
from orch_worker.adapters.kafka.publisher import Batch
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.adapters.kafka.worker_app import Worker
from orch_worker.adapters.timers import TimerService
from orch_worker.domain import decider
from tests import factories as f


def _capture(
    seen: dict[str, list[dict[str, Any]]], topic: str
) -> Callable[[KafkaMessage], Awaitable[None]]:
    async def capture(msg: KafkaMessage) -> None:
        seen.setdefault(topic, []).append(orjson.loads(msg.body))

    return capture


def _worker() -> tuple[Worker, Topics, dict[str, list[dict[str, Any]]]]:
    cfg = f.config()
    worker = Worker(cfg, clock=lambda: f.NOW, http=False)
    for a in cfg.accounts:
        worker.accounts.update(f.account(a))
    worker.recovered = True
    worker.n_partitions, worker.owned = 1, {0}  # what the group would assign a lone worker
    t = Topics(cfg.kafka.topic_prefix)
    seen: dict[str, list[dict[str, Any]]] = {}
    topics = (t.order_intents, t.execution_results, t.audit, t.dead_letter, t.changelog)
    for topic in (*topics, t.interventions):
        worker.broker.subscriber(topic)(_capture(seen, topic))

    return worker, t, seen


async def test_signal_handler_publishes_intents_result_audit_and_changelog() -> None:
    worker, t, seen = _worker()
    async with TestKafkaBroker(worker.broker) as br:
        await br.publish(f.signal("sig-1").model_dump_json().encode(), t.signals, key=b"demo")
    assert sorted(i["account_id"] for i in seen[t.order_intents]) == ["ACC-1", "ACC-2", "ACC-3"]
    assert [r["status"] for r in seen[t.execution_results]] == ["executing"]
    assert [c["type"] for c in seen[t.changelog]] == ["decision", "done"]
    decision = seen[t.changelog][0]
    assert len(decision["outbox"]) == 3 + 1 + len(seen[t.audit])


async def test_invalid_signal_is_dead_lettered_in_memory_too() -> None:
    worker, t, seen = _worker()
    async with TestKafkaBroker(worker.broker) as br:
        await br.publish(b'{"signal_id": 1}', t.signals, key=b"demo")
    [letter] = seen[t.dead_letter]
    assert letter["error_type"] == "schema_invalid"
    assert t.order_intents not in seen


async def test_many_due_timers_are_decided_in_slices_that_let_the_loop_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A restart or a stall can bring thousands of timeouts due at once; deciding them in one
    pass would hold the event loop (and the group heartbeat) for seconds."""
    monkeypatch.setattr(worker_app, "TIMER_CHUNK_S", 0.001)  # slices of a few decisions here
    now = [f.NOW]
    worker, t, seen = _worker()
    worker.clock = lambda: now[0]
    n = 120
    async with TestKafkaBroker(worker.broker):
        batch = Batch()
        for k in range(n):
            pf = worker._portfolio("demo")
            d = decider.on_signal(pf, f.signal(f"s{k}"), worker._context(now[0]))
            worker._apply("signal", d, batch, None)
        await worker._submit(batch)
        released = len(seen[t.order_intents])
        assert released == 3 * n
        # Nobody acknowledges: every order's acknowledgement timeout falls due together.
        ack_timeout = worker.cfg.portfolios["demo"].execution.ack_timeout_s
        now[0] += timedelta(seconds=ack_timeout + 1)
        due = [("demo", f"s{k}") for k in range(n)]
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        try:
            await worker._fire(due + due)  # a signal due twice is decided once
        finally:
            ticker.cancel()
        await worker.drain()
    assert ticks >= 2, "the loop ran between slices"
    assert worker.metrics.outcomes.labels("timer", "timers")._value.get() == n
    assert not worker.failed.is_set()


@pytest.mark.parametrize("falls_due_meanwhile", [True, False])
async def test_a_timer_falling_due_while_a_slice_decides_goes_in_that_slice(
    falls_due_meanwhile: bool,
) -> None:
    """Taken at its own time, not after the slice and every task the loop has ready; one not
    yet due stays with the timer service."""
    now = [f.NOW]
    worker, _, _ = _worker()
    worker.clock = lambda: now[0]
    async with TestKafkaBroker(worker.broker):
        batch = Batch()
        for k, sid in enumerate(("first", "second")):
            now[0] = f.NOW + timedelta(milliseconds=10 * k)
            pf = worker._portfolio("demo")
            d = decider.on_signal(pf, f.signal(sid), worker._context(now[0]))
            worker._apply("signal", d, batch, None)
        await worker._submit(batch)
        due = sorted(d for d, *_ in worker.timers._heap)
        first, second = due[0], next(d for d in due if d > due[0])
        worker.timers.take_due(first)  # as the timer service hands them to `_fire`
        reads = iter([first])
        later = second if falls_due_meanwhile else second - timedelta(microseconds=1)
        worker.clock = lambda: next(reads, later)
        await worker._fire([("demo", "first")])
        await worker.drain()
    decided = worker.metrics.outcomes.labels("timer", "timers")._value.get()
    assert decided == (2 if falls_due_meanwhile else 1)
    assert (worker.timers.next_due() == second) is not falls_due_meanwhile


async def test_input_waits_for_due_releases_only_while_they_keep_up() -> None:
    """Releases first, but a backlog past RELEASES_FIRST_S must not starve reports: then input
    and releases take turns."""
    worker, _, _ = _worker()
    worker.timers._idle.clear()  # timers are being decided
    worker.timers.add(f.NOW - timedelta(milliseconds=10), "recent", ("demo", "recent"))
    waiting = asyncio.create_task(worker._may_decide())
    await asyncio.sleep(0.02)
    assert not waiting.done(), "input went ahead of releases that keep up"
    worker.timers._idle.set()
    assert await asyncio.wait_for(waiting, 1) is True

    worker.timers._idle.clear()
    worker.timers.clear()
    late = f.NOW - timedelta(seconds=worker_app.RELEASES_FIRST_S * 2)
    worker.timers.add(late, "late", ("demo", "late"))
    assert await asyncio.wait_for(worker._may_decide(), 0.01) is True


async def test_input_waits_no_longer_than_until_the_releases_fall_behind() -> None:
    """The timers never finish here: input goes ahead once the due release is that late."""
    worker, _, _ = _worker()
    worker.timers._idle.clear()
    worker.timers.add(f.NOW, "due", ("demo", "due"))
    waiting = asyncio.create_task(worker._may_decide())
    await asyncio.sleep(worker_app.RELEASES_FIRST_S / 5)
    assert not waiting.done()
    assert await asyncio.wait_for(waiting, worker_app.RELEASES_FIRST_S * 2) is True
    assert worker.timers.firing


async def test_input_is_not_begun_when_a_release_falls_due_before_it_would_be_decided() -> None:
    """A record that takes about as long as the gap to the next release waits for that release
    to be decided first; one that fits in the gap goes at once."""
    worker, _, _ = _worker()
    worker.clock = worker_app.utc_now
    worker.timers = TimerService(worker.clock)
    fired: list[float] = []

    async def fire(due: list[tuple[str, str]]) -> None:
        fired.append(time.perf_counter())

    worker.timers.start(fire)
    try:
        worker.timers.add(worker.clock() + timedelta(seconds=10), "far", ("demo", "far"))
        assert await asyncio.wait_for(worker._may_decide(0.001), 0.5) is True
        worker.timers.clear()
        worker.timers.add(worker.clock() + timedelta(milliseconds=20), "r", ("demo", "r"))
        assert await asyncio.wait_for(worker._may_decide(0.03), 1) is True
        decided_at = time.perf_counter()
        assert fired, "the release went first"
        assert fired[0] <= decided_at
    finally:
        await worker.timers.stop()


async def test_input_waits_for_a_gap_no_longer_than_releases_first() -> None:
    """Releases due back to back never leave a gap: input goes after RELEASES_FIRST_S anyway."""
    worker, _, _ = _worker()
    worker.clock = worker_app.utc_now
    worker.timers.add(worker.clock() + timedelta(seconds=1), "far", ("demo", "far"))
    started = time.perf_counter()
    assert await asyncio.wait_for(worker._may_decide(5.0), 1) is True
    waited = time.perf_counter() - started
    assert worker_app.RELEASES_FIRST_S * 0.9 <= waited < worker_app.RELEASES_FIRST_S * 4


async def test_input_waits_for_a_gap_no_longer_than_twice_its_own_cost() -> None:
    """A record of a few milliseconds gets a third of a loop crowded with releases: it waits
    at most INPUT_PATIENCE times its cost, not RELEASES_FIRST_S."""
    worker, _, _ = _worker()
    worker.clock = worker_app.utc_now
    worker.timers.add(worker.clock() + timedelta(milliseconds=1), "soon", ("demo", "soon"))
    cost = 0.015
    started = time.perf_counter()
    assert await asyncio.wait_for(worker._may_decide(cost), 1) is True
    waited = time.perf_counter() - started
    assert worker_app.INPUT_PATIENCE * cost * 0.9 <= waited < worker_app.RELEASES_FIRST_S


async def test_a_release_due_while_publishing_waits_for_one_record_not_a_stretch() -> None:
    """The publisher hands records over in stretches; a release that falls due meanwhile gets
    the next turn, also while due timers are being decided, unless those are already behind
    (then the two take turns)."""
    worker, _, _ = _worker()
    assert not worker._release_waits()
    worker.timers.add(f.NOW + timedelta(milliseconds=5), "soon", ("demo", "soon"))
    assert not worker._release_waits()
    worker.timers.add(f.NOW, "due", ("demo", "due"))
    assert worker._release_waits()
    worker.timers._idle.clear()  # being decided, and keeping up
    assert worker._release_waits()
    late = worker_app.RELEASES_FIRST_S + 0.01
    worker.timers._firing = f.NOW - timedelta(seconds=late)  # a backlog being decided
    assert not worker._release_waits()


async def test_no_order_times_out_while_reports_wait_unread() -> None:
    """The venue's answer may be among the waiting reports: silence is only known for time the
    worker was caught up, so a timeout waits a full window after it catches up again."""
    now = [f.NOW]
    worker, t, seen = _worker()
    worker.clock = lambda: now[0]
    worker._listening.since = {0: f.NOW}  # gained the partition at NOW
    async with TestKafkaBroker(worker.broker):
        batch = Batch()
        pf = worker._portfolio("demo")
        d = decider.on_signal(pf, f.signal("s1"), worker._context(now[0]))
        worker._apply("signal", d, batch, None)
        await worker._submit(batch)
        assert len(seen[t.order_intents]) == 3  # released, never acknowledged
        window = timedelta(seconds=worker.cfg.portfolios["demo"].execution.ack_timeout_s)

        worker._intake_changed("reports_waiting")
        now[0] = f.NOW + window + timedelta(seconds=1)
        worker.timers.clear()  # as the timer service pops what it fires
        await worker._fire([("demo", "s1")])
        await worker.drain()
        assert t.interventions not in seen, "timed out while its answer might wait unread"
        assert worker.timers.next_due() == now[0] + window  # re-armed a window from now

        worker._intake_changed(None)  # caught up
        caught_up = now[0]
        now[0] = caught_up + window - timedelta(seconds=1)
        worker.timers.clear()  # as the timer service pops what it fires
        await worker._fire([("demo", "s1")])
        await worker.drain()
        assert t.interventions not in seen
        now[0] = caught_up + window + timedelta(seconds=1)
        worker.timers.clear()  # as the timer service pops what it fires
        await worker._fire([("demo", "s1")])
        await worker.drain()
    reasons = {i["reason_code"] for i in seen[t.interventions]}
    assert reasons == {"unknown_outcome"}
    assert len(seen[t.interventions]) == 3
