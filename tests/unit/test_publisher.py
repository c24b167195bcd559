"""The publisher keeps decision order, groups what queued meanwhile, and stops at a failure."""

from __future__ import annotations

import asyncio

import pytest

from orch_worker.adapters.kafka.changelog import OutRecord
from orch_worker.adapters.kafka.publisher import Batch, LeaseLostError, Publisher


def _batch(n: int) -> Batch:
    return Batch(
        changelog=[("pf", b"decision-%d" % n)],
        outputs=[OutRecord("intents", "acc", b"out-%d" % n)],
        outbox_ids={"pf": [f"o{n}"]},
    )


class Recorder:
    def __init__(self, fail_on_round: int | None = None) -> None:
        self.rounds: list[Batch] = []
        self.fail_on_round = fail_on_round
        self.gate = asyncio.Event()
        self.gate.set()

    async def publish(self, batch: Batch) -> None:
        await self.gate.wait()
        self.rounds.append(batch)
        if self.fail_on_round == len(self.rounds):
            raise ConnectionError("broker gone")


async def test_batches_queued_during_a_round_go_out_together_in_order() -> None:
    rec = Recorder()
    pub = Publisher(rec.publish)
    rec.gate.clear()
    first = pub.submit(_batch(0))
    await asyncio.sleep(0)  # the first round has started and waits at the gate
    rest = [pub.submit(_batch(n)) for n in range(1, 5)]
    rec.gate.set()
    await asyncio.gather(first, *rest)

    assert [len(r.changelog) for r in rec.rounds] == [1, 4]
    assert [v for _, v in rec.rounds[1].changelog] == [b"decision-%d" % n for n in range(1, 5)]
    assert [o.value for o in rec.rounds[1].outputs] == [b"out-%d" % n for n in range(1, 5)]
    assert rec.rounds[1].outbox_ids == {"pf": ["o1", "o2", "o3", "o4"]}


async def test_a_failed_round_fails_everything_after_it_and_nothing_more_is_published() -> None:
    rec = Recorder(fail_on_round=1)
    pub = Publisher(rec.publish)
    rec.gate.clear()
    first = pub.submit(_batch(0))
    await asyncio.sleep(0)
    second = pub.submit(_batch(1))
    rec.gate.set()

    with pytest.raises(ConnectionError):
        await first
    with pytest.raises(ConnectionError):
        await second
    with pytest.raises(ConnectionError):
        await pub.submit(_batch(2))  # decided on top of lost state: refused at once
    assert len(rec.rounds) == 1


async def test_drain_waits_for_everything_submitted() -> None:
    rec = Recorder()
    pub = Publisher(rec.publish)
    rec.gate.clear()
    futs = [pub.submit(_batch(n)) for n in range(3)]
    waiting = asyncio.create_task(pub.drain())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    rec.gate.set()
    await waiting
    assert all(f.done() for f in futs)
    assert sum(len(r.changelog) for r in rec.rounds) == 3


async def test_a_closed_gate_drops_the_round_unpublished_until_reset() -> None:
    rec = Recorder()
    open_gate = False

    async def may_publish() -> bool:
        return open_gate

    pub = Publisher(rec.publish, may_publish)
    with pytest.raises(LeaseLostError):
        await pub.submit(_batch(0))
    with pytest.raises(LeaseLostError):
        await pub.submit(_batch(1))  # nothing decided on top of dropped state goes out
    assert rec.rounds == []
    pub.reset()
    open_gate = True
    await pub.submit(_batch(2))
    assert [v for _, v in rec.rounds[0].changelog] == [b"decision-2"]
