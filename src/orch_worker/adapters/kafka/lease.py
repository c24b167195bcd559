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

The worker checks the lease before it hands a record to its producer, but the producer sends
later, from its own task: a process frozen (SIGSTOP, swapped out, a VM paused) with records
handed over and not yet sent would send them on waking, after the partitions' new owner had
decided the same releases again. So `fence` checks the lease a second time at the wire, as the
producer builds each produce request: batches of the decision topics that would leave without
the lease fail with `LeaseFencedError` instead, and the worker rebuilds before deciding again.
What is left is the few microseconds between that check and the socket write, in which no
await can run.

aiokafka has no public hook for heartbeats or for the produce request, so `attach` wraps two
methods of the consumer's group coordinator and `fence` one of the producer's sender. Should
those change, they return False, the worker logs it, and acts as before (without that fence);
the broker tests of this module fail first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka.errors import KafkaError

from orch_worker.adapters.kafka.publisher import LeaseLostError

log = logging.getLogger("orch_worker.lease")

NO_GENERATION = -1


class LeaseFencedError(KafkaError, LeaseLostError):  # type: ignore[misc]  # aiokafka is untyped
    """A batch of decision records the producer was about to send without the group lease.

    A `KafkaError` that is not retriable, so aiokafka fails the batch's sends with it at once;
    a `LeaseLostError`, so the worker treats it as the lease lost (rebuild, do not stop).
    """


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
        self.term_began = time.monotonic()
        """When the membership the lease stands for last ended or was replaced, in the clock
        of the producer's batches (`time.monotonic`): a batch begun before was handed over
        for another membership."""
        self._moved = asyncio.Event()
        """Set by every renewal and new term: what a produce request held at the wire awaits."""
        self._stopping = False

    def renew(self, sent_at: float) -> None:
        """A heartbeat or join sent at `sent_at` succeeded."""
        self.until = max(self.until, sent_at + self.length_s)
        self.renewals += 1
        self._moved.set()

    def joined(self) -> None:
        """The group assigned partitions in a join sent at `join_sent_at`."""
        self._new_term()
        if self.join_sent_at is not None:
            self.renew(self.join_sent_at)

    def drop(self) -> None:
        """The coordinator no longer knows this member (or its generation)."""
        self._new_term()
        self.until = float("-inf")

    def _new_term(self) -> None:
        self.term_began = time.monotonic()
        self._moved.set()

    def stop_waiting(self) -> None:
        """The process is stopping: what waits at the wire for a late heartbeat fails now.

        Without this a worker stopped while its lease was out took up to a lease length to
        close its producer, for batches that then failed anyway unless a heartbeat came. Failing
        them at once is what a crash would do, which recovery already handles: the changelog
        never got them, the input is not committed, and the next owner decides it again.
        """
        self._stopping = True
        self._moved.set()

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

    async def _wait_for_renewal(self) -> None:
        """Wait for a late heartbeat of the same membership, which makes a batch safe to send.

        The lease can run out while the loop is merely busy: the next heartbeat of the same
        generation renews it, and nothing was decided elsewhere. A membership that ended
        (heartbeat refused, a new join) never sends what it handed over before; nor does one
        that stays silent for as long as a lease lasts.
        """
        began = self.term_began
        give_up = self.clock() + self.length_s
        while not self.held() and self.term_began == began and not self._stopping:
            left = give_up - self.clock()
            if left <= 0:
                return
            self._moved.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._moved.wait(), left)

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

    def fence(
        self,
        producer: Any,
        topics: frozenset[str],
        on_fenced: Callable[[int], None] = lambda batches: None,
    ) -> bool:
        """Fail `producer`'s batches for `topics` that it would send while the lease is not held,
        telling `on_fenced` how many each time (the worker counts them in a metric).

        Runs as the sender starts a produce request: from the check to the socket write there
        is no await (the connection is open, so `client.send` writes at once), so a process
        frozen after the check has already handed its request to the kernel, which delivers
        it while the process is stopped, before any other member can be given the partitions.
        """
        sender = getattr(producer, "_sender", None)
        send = getattr(sender, "_send_produce_req", None)
        in_flight = getattr(sender, "_in_flight", None)
        muted = getattr(sender, "_muted_partitions", None)
        if send is None or not isinstance(in_flight, set) or not isinstance(muted, set):
            log.warning("cannot fence the producer (aiokafka changed?): no check at the wire")
            return False
        if getattr(send, "fenced_by", None) is self:
            return True

        async def send_produce_req(node_id: int, batches: dict[Any, Any]) -> None:
            if any(tp.topic in topics for tp in batches):
                if not self.held():
                    await self._wait_for_renewal()
                held = self.held()
                stale = [
                    tp
                    for tp, batch in batches.items()
                    if tp.topic in topics and (not held or batch._ctime < self.term_began)
                ]
                for tp in stale:
                    batches.pop(tp).failure(
                        exception=LeaseFencedError(
                            f"group lease lost before {tp.topic}[{tp.partition}] was sent"
                        )
                    )
                    muted.discard(tp)
                if stale:
                    on_fenced(len(stale))
                    log.warning(
                        "group lease lost with decision records unsent: not sending %s",
                        ", ".join(f"{tp.topic}[{tp.partition}]" for tp in stale),
                    )
                if not batches:
                    in_flight.discard(node_id)
                    return
            await send(node_id, batches)  # no await between the checks above and the write

        send_produce_req.fenced_by = self  # type: ignore[attr-defined]
        sender._send_produce_req = send_produce_req  # type: ignore[union-attr]
        return True


def generation_of(consumer: Any) -> int | None:
    """The group generation `consumer` was last assigned in, if it can be told."""
    coordinator = getattr(consumer, "_coordinator", None)
    generation = getattr(coordinator, "generation", None)
    return generation if isinstance(generation, int) else None
