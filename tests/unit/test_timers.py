"""The timer service reports how far behind it is, which the intake pauses new signals on."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from orch_worker.adapters.timers import TimerService

T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def test_nothing_due_is_not_behind() -> None:
    clock = Clock()
    timers: TimerService[str] = TimerService(clock)
    assert timers.behind_s(T0) == 0.0
    timers.add(T0 + timedelta(seconds=1), "a", "a")
    assert timers.behind_s(T0) == 0.0
    assert timers.behind_s(T0 + timedelta(seconds=1)) == 0.0


def test_a_due_timer_not_yet_fired_counts_from_its_due_time() -> None:
    timers: TimerService[str] = TimerService(Clock())
    timers.add(T0 + timedelta(seconds=2), "late", "late")
    timers.add(T0 + timedelta(seconds=1), "later", "later")
    assert timers.behind_s(T0 + timedelta(seconds=1, milliseconds=300)) == 0.3


async def test_timers_being_decided_count_until_the_callback_returns() -> None:
    """A slow callback keeps the service behind by its oldest due timer, then it catches up."""
    clock = Clock()
    timers: TimerService[str] = TimerService(clock)
    entered, release = asyncio.Event(), asyncio.Event()
    fired: list[list[str]] = []

    async def fire(due: list[str]) -> None:
        fired.append(due)
        entered.set()
        await release.wait()

    timers.add(T0 - timedelta(milliseconds=500), "a", "a")
    timers.add(T0 - timedelta(milliseconds=100), "b", "b")
    timers.start(fire)
    try:
        await asyncio.wait_for(entered.wait(), 2)
        assert fired == [["a", "b"]]
        assert len(timers) == 0  # popped, but not decided yet
        clock.now = T0 + timedelta(milliseconds=250)
        assert timers.behind_s(clock.now) == 0.75
        assert timers.firing
        release.set()
        for _ in range(5):
            await asyncio.sleep(0)
        assert timers.behind_s(clock.now) == 0.0
        assert not timers.firing
    finally:
        await timers.stop()


def test_take_due_hands_over_only_what_is_due_earliest_first() -> None:
    """What the callback takes while deciding: due timers leave the service (their keys may be
    armed again), later ones stay for the service's own wake-up."""
    timers: TimerService[str] = TimerService(Clock())
    timers.add(T0 + timedelta(milliseconds=30), "c", "c")
    timers.add(T0 + timedelta(milliseconds=10), "a", "a")
    timers.add(T0 + timedelta(milliseconds=20), "b", "b")
    assert timers.take_due(T0) == []
    assert timers.take_due(T0 + timedelta(milliseconds=20)) == ["a", "b"]
    assert len(timers) == 1
    assert timers.take_due(T0 + timedelta(milliseconds=29)) == []
    assert timers.next_due() == T0 + timedelta(milliseconds=30)
    timers.add(T0 + timedelta(milliseconds=40), "a", "a again")
    assert "a" in timers
    assert timers.take_due(T0 + timedelta(seconds=1)) == ["c", "a again"]
    assert len(timers) == 0
