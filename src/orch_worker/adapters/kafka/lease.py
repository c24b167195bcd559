"""Knowing when this worker may still act for its partitions: the group membership lease.

A worker that cannot heartbeat (its loop blocked, the broker paused, the network cut) is
dropped from the group once its session times out, and its partitions go to another worker,
which recovers them from the changelog and carries on. If the dropped worker went on deciding
and releasing meanwhile, both would release the same scheduled intents. Kafka's fence against
such a zombie is the transactional producer, which not every broker offers (the embedded one
does not), so the worker fences itself:

* it holds a lease that runs out `session_timeout - margin` after the *sending* of its last
  successful heartbeat (or group join). The coordinator counts the session from when it
  *received* that request, later still, so while the lease is held no other member can have
  been given the partitions;
* it decides nothing and starts no publish while the lease is not held;
* a group generation that moved by more than one since its last assignment means rebalances
  happened without it: what it holds in memory may be stale, and it is rebuilt from the
  changelog (see `Worker.take_ownership`).

aiokafka has no public hook for heartbeats, so `attach` wraps two methods of the consumer's
group coordinator. Should those change, `attach` returns False, the worker logs it, and acts
as before (without the fence); the broker tests of this module fail first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("orch_worker.lease")

NO_GENERATION = -1


class Lease:
    def __init__(
        self,
        session_timeout_s: float,
        margin_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if margin_s >= session_timeout_s:
            raise ValueError("the lease margin must be shorter than the session timeout")
        self.length_s = session_timeout_s - margin_s
        self.clock = clock
        self.until = float("-inf")
        self.attached = False
        self.renewals = 0
        self.lapses = 0
        self._held_last = False
        self.join_sent_at: float | None = None

    def renew(self, sent_at: float) -> None:
        """A heartbeat or join sent at `sent_at` succeeded."""
        self.until = max(self.until, sent_at + self.length_s)
        self.renewals += 1

    def joined(self) -> None:
        """The group assigned partitions in a join sent at `join_sent_at`."""
        if self.join_sent_at is not None:
            self.renew(self.join_sent_at)

    def drop(self) -> None:
        """The coordinator no longer knows this member (or its generation)."""
        self.until = float("-inf")

    def held(self) -> bool:
        """True while no other member can have been given this member's partitions.

        Without `attach` there is nothing to go by, and the worker acts as a plain consumer.
        """
        if not self.attached:
            return True
        held = self.clock() < self.until
        if self._held_last and not held:
            self.lapses += 1
            log.warning("group lease ran out: deciding nothing until a heartbeat gets through")
        self._held_last = held
        return held

    def attach(self, consumer: Any) -> bool:
        """Follow the heartbeats and joins of `consumer`'s group coordinator."""
        if self.attached:
            return True
        coordinator = getattr(consumer, "_coordinator", None)
        heartbeat = getattr(coordinator, "_do_heartbeat", None)
        rejoin = getattr(coordinator, "_do_rejoin_group", None)
        if coordinator is None or heartbeat is None or rejoin is None:
            log.warning("cannot follow group heartbeats (aiokafka changed?): no lease fencing")
            return False

        async def do_heartbeat() -> bool:
            sent_at = self.clock()
            generation = coordinator.generation
            ok = bool(await heartbeat())
            if ok and generation != NO_GENERATION and coordinator.generation == generation:
                self.renew(sent_at)
            elif coordinator.generation == NO_GENERATION:
                self.drop()
            return ok

        async def do_rejoin_group(subscription: Any) -> bool:
            # The assignment callback runs inside the join: `joined` renews from here.
            self.join_sent_at = self.clock()
            return bool(await rejoin(subscription))

        coordinator._do_heartbeat = do_heartbeat
        coordinator._do_rejoin_group = do_rejoin_group
        self.attached = True
        return True


def generation_of(consumer: Any) -> int | None:
    """The group generation `consumer` was last assigned in, if it can be told."""
    coordinator = getattr(consumer, "_coordinator", None)
    generation = getattr(coordinator, "generation", None)
    return generation if isinstance(generation, int) else None
