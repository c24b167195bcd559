"""New signals give way to waiting reports and to the open-signal cap, with hysteresis."""

from __future__ import annotations

from collections.abc import Collection

from aiokafka import TopicPartition

from orch_worker.adapters.kafka.intake import Intake, IntakeLimits, IntakeState, pause_reason

LIMITS = IntakeLimits(max_open_signals=100, resume_below=90, routed_lag=50, routed_resume=5)


def reason(paused: bool, open_signals: int, waiting: int) -> str | None:
    return pause_reason(paused, IntakeState(open_signals, waiting), LIMITS)


def test_signals_are_read_while_under_both_limits() -> None:
    assert reason(False, 0, 0) is None
    assert reason(False, 99, 49) is None


def test_waiting_reports_come_first_and_hold_the_pause_until_few_wait() -> None:
    assert reason(False, 0, 50) == "reports_waiting"
    assert reason(True, 0, 5) == "reports_waiting"
    assert reason(True, 0, 4) is None
    # Below the threshold a few waiting reports do not pause a running intake.
    assert reason(False, 0, 49) is None


def test_the_open_cap_pauses_and_resumes_only_below_the_low_mark() -> None:
    assert reason(False, 100, 0) == "open_signals"
    assert reason(True, 95, 0) == "open_signals"
    assert reason(True, 90, 0) == "open_signals"
    assert reason(True, 89, 0) is None
    assert reason(False, 95, 0) is None  # not paused: the cap itself is the trigger


BEHIND = IntakeLimits(
    max_open_signals=100,
    resume_below=90,
    routed_lag=50,
    routed_resume=5,
    behind_s=0.2,
    behind_resume_s=0.05,
)


def behind(paused: bool, late_s: float, *, open_signals: int = 0, waiting: int = 0) -> str | None:
    return pause_reason(paused, IntakeState(open_signals, waiting, late_s), BEHIND)


def test_late_releases_pause_new_signals_until_the_timers_nearly_caught_up() -> None:
    assert behind(False, 0.199) is None
    assert behind(False, 0.2) == "releases_behind"
    assert behind(True, 0.1) == "releases_behind"
    assert behind(True, 0.05) == "releases_behind"
    assert behind(True, 0.049) is None


def test_waiting_reports_are_named_before_late_releases_and_late_releases_before_the_cap() -> None:
    assert behind(False, 1.0, waiting=50) == "reports_waiting"
    assert behind(False, 1.0, open_signals=100) == "releases_behind"
    assert behind(True, 0.0, open_signals=95) == "open_signals"


def test_without_a_lateness_limit_late_releases_never_pause() -> None:
    assert reason(False, 0, 0) is None
    assert pause_reason(False, IntakeState(0, 0, 3600.0), LIMITS) is None


class FakeConsumer:
    def __init__(self, n: int, high: dict[int, int], position: dict[int, int]) -> None:
        self.tps = [TopicPartition(t, p) for t in ("signals", "routed") for p in range(n)]
        self._paused: set[TopicPartition] = set()
        self.high, self.pos = high, position
        self.calls: list[tuple[str, tuple[TopicPartition, ...]]] = []

    def assignment(self) -> Collection[TopicPartition]:
        return set(self.tps)

    def paused(self) -> Collection[TopicPartition]:
        return set(self._paused)

    def pause(self, *partitions: TopicPartition) -> None:
        self.calls.append(("pause", partitions))
        self._paused.update(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self.calls.append(("resume", partitions))
        self._paused.difference_update(partitions)

    def highwater(self, partition: TopicPartition) -> int | None:
        return self.high.get(partition.partition)

    async def position(self, partition: TopicPartition) -> int:
        if partition.partition not in self.pos:
            raise RuntimeError("no position yet")
        return self.pos[partition.partition]


async def test_intake_pauses_only_signals_partitions_and_resumes_them() -> None:
    changes: list[str | None] = []
    intake = Intake("signals", "routed", LIMITS, on_change=changes.append)
    consumer = FakeConsumer(2, high={0: 100, 1: 30}, position={0: 60, 1: 20})

    assert await intake.routed_waiting(consumer) == 50
    assert await intake.apply(consumer, open_signals=0) == "reports_waiting"
    assert consumer.paused() == {TopicPartition("signals", 0), TopicPartition("signals", 1)}
    # Applying the same state again changes nothing.
    await intake.apply(consumer, open_signals=0)
    assert len(consumer.calls) == 1

    consumer.pos = {0: 100, 1: 30}  # every waiting report read
    assert await intake.apply(consumer, open_signals=0) is None
    assert consumer.paused() == set()
    assert changes == ["reports_waiting", None]
    assert intake.pauses == 1


async def test_unknown_high_watermarks_or_positions_count_as_nothing_waiting() -> None:
    intake = Intake("signals", "routed", LIMITS)
    consumer = FakeConsumer(2, high={0: 500}, position={})
    assert await intake.routed_waiting(consumer) == 0
    assert await intake.apply(consumer, open_signals=100) == "open_signals"


async def test_the_in_memory_test_consumer_is_left_alone() -> None:
    intake = Intake("signals", "routed", LIMITS)
    assert await intake.apply(object(), open_signals=10_000) is None
