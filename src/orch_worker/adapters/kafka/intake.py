"""Backpressure on new signals: pause their partitions, keep reading everything else.

One consumer carries both a portfolio's new signals and the routed reports and commands that
move its open signals on (co-partitioned, so they change hands together). Two things go wrong
under a burst of signals if it simply reads what comes:

* reports wait behind thousands of queued signals, every order runs into its acknowledgement
  timeout and is escalated as an unknown outcome, although the venue answered in time;
* every signal read is planned and held in memory until it finishes, so memory grows with the
  backlog rather than with the work the accounts can actually absorb.

A third thing goes wrong when deciding costs more time than the process has: every new
signal planned then delays the releases already scheduled, and each late release delays the
rest. So new signals also wait while the release timers run behind.

So the signals partitions are paused (the consumer keeps polling, heartbeats and reads the
routed inputs) while routed inputs wait, while the release timers are `behind_s` late, or while
the worker holds `max_open_signals` open signals; they are resumed once the reports are read,
the timers have (nearly) caught up and the open count has fallen below `resume_below`. A paused
signal stays in Kafka, uncommitted: nothing is lost, and a restart reads it again. The choice
is a pure function of the counts; `Intake` applies it to aiokafka.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from aiokafka import TopicPartition

log = logging.getLogger("orch_worker.intake")


@dataclass(frozen=True)
class IntakeLimits:
    max_open_signals: int
    """Signals held open (planned, not terminal) before new ones wait in Kafka."""
    resume_below: int
    """Open signals below which paused signals are read again (hysteresis, so the partitions
    are not paused and resumed for every finished signal)."""
    routed_lag: int
    """Routed reports and commands waiting at which new signals give way to them."""
    routed_resume: int = 1
    """...and below which they are read again: not zero, or under a steady flow of reports
    every open signal would finish before a new one is read, and the pipeline runs dry."""
    behind_s: float = float("inf")
    """How late the oldest due release may be before new signals wait for the timers."""
    behind_resume_s: float = float("inf")
    """...and below which they are read again."""


@dataclass(frozen=True)
class IntakeState:
    open_signals: int
    routed_waiting: int
    """Records of the routed-inputs partitions fetched or known to exist but not yet handled."""
    releases_behind_s: float = 0.0
    """How late the oldest due timer not yet decided is."""


def pause_reason(paused: bool, s: IntakeState, limits: IntakeLimits) -> str | None:
    """Why new signals should wait now, or None to read them.

    Reports come first: they close open signals, and every one that waits brings its order
    closer to an acknowledgement timeout. Then releases already scheduled: a new signal's plan
    takes time they are owed. A pause for open signals holds until the count falls
    below `resume_below`; a pause for waiting reports until fewer than `routed_resume` wait.
    """
    if s.routed_waiting >= limits.routed_lag or (
        paused and s.routed_waiting >= limits.routed_resume
    ):
        return "reports_waiting"
    if s.releases_behind_s >= limits.behind_s or (
        paused and s.releases_behind_s >= limits.behind_resume_s
    ):
        return "releases_behind"
    if s.open_signals >= limits.max_open_signals or (
        paused and s.open_signals >= limits.resume_below
    ):
        return "open_signals"
    return None


class Consumer(Protocol):
    """What `Intake` needs of aiokafka's consumer."""

    def assignment(self) -> Collection[TopicPartition]: ...
    def paused(self) -> Collection[TopicPartition]: ...
    def pause(self, *partitions: TopicPartition) -> None: ...
    def resume(self, *partitions: TopicPartition) -> None: ...
    def highwater(self, partition: TopicPartition) -> int | None: ...
    async def position(self, partition: TopicPartition) -> int: ...


class Intake:
    """Applies `pause_reason` to the decide consumer's signals partitions."""

    def __init__(
        self,
        signals_topic: str,
        routed_topic: str,
        limits: IntakeLimits,
        on_change: Callable[[str | None], None] = lambda reason: None,
    ) -> None:
        self.signals_topic = signals_topic
        self.routed_topic = routed_topic
        self.limits = limits
        self.on_change = on_change
        self.reason: str | None = None
        self.pauses = 0

    async def routed_waiting(self, consumer: Consumer) -> int:
        """Routed records past the consumer's position, as far as the last fetch told."""
        waiting = 0
        for tp in consumer.assignment():
            if tp.topic != self.routed_topic:
                continue
            high = consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = await consumer.position(tp)
            except Exception as exc:  # no position (being reset, or just revoked): unknown
                log.debug("no position for %s: %r", tp, exc)
                continue
            waiting += max(0, high - position)
        return waiting

    async def apply(
        self, consumer: Any, open_signals: int, releases_behind_s: float = 0.0
    ) -> str | None:
        """Pause or resume the signals partitions for the present counts; returns the reason."""
        if not _is_consumer(consumer):
            return None  # the in-memory test broker: no partitions to pause
        signals = [tp for tp in consumer.assignment() if tp.topic == self.signals_topic]
        paused_now = set(consumer.paused())
        paused = bool(signals) and all(tp in paused_now for tp in signals)
        state = IntakeState(open_signals, await self.routed_waiting(consumer), releases_behind_s)
        reason = pause_reason(paused, state, self.limits)
        if reason is not None:
            todo = [tp for tp in signals if tp not in paused_now]
            if todo:
                consumer.pause(*todo)
        else:
            todo = [tp for tp in signals if tp in paused_now]
            if todo:
                consumer.resume(*todo)
        if reason != self.reason:
            if reason is not None:
                self.pauses += 1
            log.info(
                "new signals %s (%d open, %d routed inputs waiting, releases %.0f ms behind)",
                f"paused: {reason}" if reason else "read again",
                state.open_signals,
                state.routed_waiting,
                state.releases_behind_s * 1000,
            )
            self.reason = reason
            self.on_change(reason)
        return reason


def _is_consumer(consumer: Any) -> bool:
    return all(
        callable(getattr(consumer, name, None))
        for name in ("assignment", "paused", "pause", "resume", "highwater", "position")
    )
