"""Release timers: one heap and one task, accurate to about a millisecond with many pending.

A single sleeping task wakes for the earliest due time (or when an earlier timer is added) and
hands every due payload to one callback, so thousands of timers cost one wake-up each, not one
task each. Timers live only in memory: the worker rebuilds them from its recovered state, which
is what makes scheduled releases survive a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
from collections.abc import Awaitable, Callable, Hashable
from datetime import datetime
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

P = TypeVar("P")

SPIN_S = 0.002
"""Sleep until this close to the due time, then yield to the loop until it arrives: asyncio's
timer granularity alone would release up to a millisecond late."""


class TimerService(Generic[P]):
    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock
        self._heap: list[tuple[datetime, int, Hashable, P]] = []
        self._keys: set[Hashable] = set()
        self._counter = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._firing: datetime | None = None
        """Due time of the oldest timer handed to the callback that has not returned yet."""
        self._idle = asyncio.Event()
        """Set while no callback runs: what others wait on to go after the due timers."""
        self._idle.set()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, due: datetime, key: Hashable, payload: P) -> None:
        """Schedule `payload` at `due`; a key already pending is not added twice."""
        if key in self._keys:
            return
        self._keys.add(key)
        self._counter += 1
        earliest = self._heap[0][0] if self._heap else None
        heapq.heappush(self._heap, (due, self._counter, key, payload))
        if earliest is None or due < earliest:
            self._wake.set()

    def next_due(self) -> datetime | None:
        return self._heap[0][0] if self._heap else None

    def until_due(self, now: datetime) -> float:
        """Seconds until the next timer falls due (negative once due, infinite with none)."""
        return (self._heap[0][0] - now).total_seconds() if self._heap else math.inf

    @property
    def firing(self) -> bool:
        """The callback is deciding due timers now."""
        return not self._idle.is_set()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def behind_s(self, now: datetime) -> float:
        """How late the oldest due timer not yet decided is (0 when the loop keeps up): the
        measure of whether this process has the time for its releases."""
        oldest = self._firing
        if oldest is None and self._heap and self._heap[0][0] < now:
            oldest = self._heap[0][0]
        return max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0

    def take_due(self, now: datetime) -> list[P]:
        """Remove and return every payload due at `now`, earliest first.

        The callback calls this too, for timers that fell due while it was deciding the ones
        it was handed: they go in the same slice, rather than after it and whatever else is
        waiting for the loop.
        """
        due: list[P] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, key, payload = heapq.heappop(heap)
            self._keys.discard(key)
            due.append(payload)
        return due

    def clear(self) -> None:
        """Forget every pending timer (the owner re-adds what it still needs)."""
        self._heap.clear()
        self._keys.clear()

    def start(self, fire: Callable[[list[P]], Awaitable[None]]) -> None:
        self._task = asyncio.create_task(self._run(fire), name="release-timers")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, fire: Callable[[list[P]], Awaitable[None]]) -> None:
        while True:
            if not self._heap:
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = (self._heap[0][0] - self._clock()).total_seconds()
            if delay > SPIN_S:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay - SPIN_S)
                continue
            if delay > 0:
                await asyncio.sleep(0)
                continue
            self._firing = self._heap[0][0]
            self._idle.clear()
            due = self.take_due(self._clock())
            try:
                await fire(due)
            except Exception:
                # A failed release must not stop every later one; the decision is retried by
                # re-adding nothing here: the state still says scheduled, so a restart (or the
                # next fire for the signal) releases it.
                log.exception("releasing %d due timers failed", len(due))
            finally:
                self._firing = None
                self._idle.set()
            # A turn for the rest of the loop before the next due batch: under a backlog of
            # timers, every fire would otherwise follow the last without a yield.
            await asyncio.sleep(0)
