"""Publishing decisions in the order they were taken, many at a time.

A decision is applied in memory at once and published afterwards (changelog record, then its
outputs, then the done marker: see changelog.py). Publishing one decision after another costs
three broker round trips each, which caps a worker at a few hundred decisions a second however
fast it decides. So decisions queue here, and each round publishes everything queued since the
previous round as one batch: all their changelog records, then all their outputs, then all
their done markers. Order is kept (batches are concatenated in decision order, and within a
partition the producer keeps it), every output still follows its own decision's record, and
a round that fails fails every decision queued after it too: memory is then ahead of Kafka and
the worker must stop rather than publish anything decided on top of the lost state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from orch_worker.adapters.kafka.changelog import OutRecord
from orch_worker.domain.decider import PortfolioState


@dataclass
class Batch:
    """What one or more decisions publish, in decision order."""

    changelog: list[tuple[str, bytes]] = field(default_factory=list)
    outputs: list[OutRecord] = field(default_factory=list)
    outbox_ids: dict[str, list[str]] = field(default_factory=dict)
    """Finished outboxes per portfolio: the done marker goes to that portfolio's partition."""
    snapshot_due: set[int] = field(default_factory=set)
    """Changelog partitions whose state is to be snapshotted after this batch."""
    snapshots: dict[int, tuple[int | None, list[PortfolioState]]] = field(default_factory=dict)
    """Partition -> (ownership epoch, its portfolios' states after every decision of the
    round): filled when a round is taken (see `Publisher`), never earlier, because every
    decision record of the round is written before the snapshot."""

    def extend(self, other: Batch) -> None:
        self.changelog += other.changelog
        self.outputs += other.outputs
        for portfolio, ids in other.outbox_ids.items():
            self.outbox_ids.setdefault(portfolio, []).extend(ids)
        self.snapshot_due |= other.snapshot_due

    def __bool__(self) -> bool:
        return bool(self.changelog or self.outputs or self.outbox_ids or self.snapshot_due)


def _retrieve(fut: asyncio.Future[None]) -> None:
    # Only the last of a handler's submissions is awaited; the others' outcome is the same.
    if not fut.cancelled():
        fut.exception()


class LeaseLostError(Exception):
    """Queued decisions were dropped unpublished: this worker may no longer own them."""


async def _always() -> bool:
    return True


class Publisher:
    def __init__(
        self,
        publish: Callable[[Batch], Awaitable[None]],
        may_publish: Callable[[], Awaitable[bool]] = _always,
        on_take: Callable[[Batch], None] = lambda batch: None,
    ) -> None:
        self._publish = publish
        self._may_publish = may_publish
        # Called with a round's merged batch as it is taken, before anything awaits: memory
        # then holds exactly the state after the round's last decision.
        self._on_take = on_take
        self._queue: list[tuple[Batch, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None
        self.rounds = 0

    def submit(self, batch: Batch) -> asyncio.Future[None]:
        """Queue a decided batch; the future resolves once it (and all before it) is published."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_retrieve)
        if self.failure is not None:
            fut.set_exception(self.failure)
            return fut
        self._queue.append((batch, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="publisher")
        return fut

    def reset(self) -> None:
        """Accept submissions again after a failure, once memory was rebuilt from Kafka."""
        if self._task is None or self._task.done():
            self.failure = None
            self._queue.clear()

    async def drain(self) -> None:
        """Wait until everything submitted so far is published, or has failed."""
        while self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    async def _run(self) -> None:
        while self._queue:
            taken, self._queue = self._queue, []
            merged = Batch()
            for batch, _ in taken:
                merged.extend(batch)
            self._on_take(merged)
            try:
                if merged:
                    # Waits while the group lease is not held; False: drop everything queued.
                    if not await self._may_publish():
                        raise LeaseLostError("group lease lost with decisions unpublished")
                    await self._publish(merged)
                self.rounds += 1
            except BaseException as exc:  # cancelled included: nothing after it may go out
                self.failure = exc
                for _, fut in (*taken, *self._queue):
                    if fut.done():
                        continue
                    if isinstance(exc, Exception):
                        fut.set_exception(exc)
                    else:
                        fut.cancel()
                self._queue.clear()
                if not isinstance(exc, Exception):
                    raise
                return
            for _, fut in taken:
                if not fut.done():
                    fut.set_result(None)
