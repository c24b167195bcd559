"""The group lease: held only while no other member can have taken the partitions over."""

from __future__ import annotations

from typing import Any

import pytest

from orch_worker.adapters.kafka.lease import NO_GENERATION, Lease, generation_of


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Coordinator:
    """The two coroutines of aiokafka's group coordinator that the lease follows."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.generation = 5
        self.answer = True
        self.evict = False
        self.took_s = 0.3

    async def _do_heartbeat(self) -> bool:
        self.clock.t += self.took_s  # the response comes back later than the request went
        if self.evict:
            self.generation = NO_GENERATION
            return False
        return self.answer

    async def _do_rejoin_group(self, subscription: Any) -> bool:
        self.clock.t += self.took_s
        self.generation += 1
        return True


class Consumer:
    def __init__(self, clock: Clock) -> None:
        self._coordinator = Coordinator(clock)


def test_a_lease_must_be_shorter_than_the_session() -> None:
    with pytest.raises(ValueError, match="margin"):
        Lease(1.0, 1.0)


def test_unattached_lease_does_not_fence() -> None:
    assert Lease(1.0, 0.2).held()


async def test_held_from_sending_a_successful_heartbeat_for_the_session_less_margin() -> None:
    clock = Clock()
    lease = Lease(1.0, 0.2, clock)
    consumer = Consumer(clock)
    assert lease.attach(consumer)
    assert not lease.held()  # attached, never renewed
    sent = clock.t
    assert await consumer._coordinator._do_heartbeat()
    clock.t = sent + 0.79
    assert lease.held()
    clock.t = sent + 0.8  # the response took 0.3 s, yet the lease counts from the request
    assert not lease.held()
    assert lease.lapses == 1


async def test_failed_heartbeats_do_not_renew_and_an_eviction_drops_the_lease() -> None:
    clock = Clock()
    lease = Lease(1.0, 0.2, clock)
    consumer = Consumer(clock)
    lease.attach(consumer)
    await consumer._coordinator._do_heartbeat()
    assert lease.held()
    consumer._coordinator.answer = False
    await consumer._coordinator._do_heartbeat()
    assert lease.renewals == 1
    assert lease.held()  # still inside the first renewal
    consumer._coordinator.evict = True
    await consumer._coordinator._do_heartbeat()
    assert not lease.held()


async def test_a_join_renews_from_when_it_was_sent() -> None:
    clock = Clock()
    lease = Lease(1.0, 0.2, clock)
    consumer = Consumer(clock)
    lease.attach(consumer)
    sent = clock.t
    await consumer._coordinator._do_rejoin_group(None)
    lease.joined()  # called from the assignment callback, inside the join
    assert lease.until == pytest.approx(sent + 0.8)
    assert generation_of(consumer) == 6


def test_a_consumer_without_a_coordinator_is_not_fenced() -> None:
    lease = Lease(1.0, 0.2)
    assert not lease.attach(object())
    assert lease.held()
    assert generation_of(object()) is None
