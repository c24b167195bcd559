"""Issue 4 on the real broker: a 5-account signal is released over its window in the logged
order, and a halt in the middle stops the releases still pending."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.config import KafkaConfig
from tests import factories as f
from tests.integration.bounded import worker_running as real_time_worker
from tests.integration.kafka_io import Collector, publish

pytestmark = pytest.mark.integration


def _at(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


async def test_five_accounts_are_released_over_the_window_in_the_logged_order(
    kafka: KafkaConfig,
) -> None:
    cfg = f.config(kafka, n_accounts=5, stagger={"min_s": 0.3, "max_s": 2.5})
    t = Topics(kafka.topic_prefix)
    now = datetime.now(UTC)
    await publish(kafka, t.account_state, [(a, f.account(a, at=now)) for a in cfg.accounts])
    async with (
        Collector(kafka, t.order_intents) as intents,
        Collector(kafka, t.audit) as audit,
        real_time_worker(cfg),
    ):
        await publish(kafka, t.signals, [("demo", f.signal("sig-s", at=now))])
        got = await intents.wait_for(lambda v: len(v) == 5, timeout_s=15)
        events = await audit.wait_for(lambda v: any(e["type"] == "schedule_created" for e in v))
    sched = next(e for e in events if e["type"] == "schedule_created")
    assert [i["account_id"] for i in got] == sched["data"]["order"]
    planned = {s["account_id"]: s for s in sched["data"]["slots"]}
    received = _at(next(e for e in events if e["type"] == "signal_received")["ts"])
    for i in got:
        delay = (_at(i["scheduled_at"]) - received).total_seconds()
        assert 0.3 - 1e-3 <= delay <= 2.5 + 1e-3
        assert i["scheduled_at"] == planned[i["account_id"]]["scheduled_at"]
        lag = (_at(i["released_at"]) - _at(i["scheduled_at"])).total_seconds()
        assert 0 <= lag < 0.1, f"released {lag:.3f}s after its time"
    spread = _at(got[-1]["released_at"]) - _at(got[0]["released_at"])
    assert spread.total_seconds() > 0.5, "releases are spread, not simultaneous"


async def test_halt_mid_way_stops_the_pending_releases(kafka: KafkaConfig) -> None:
    cfg = f.config(kafka, n_accounts=5, stagger={"min_s": 0.2, "max_s": 6})
    t = Topics(kafka.topic_prefix)
    now = datetime.now(UTC)
    await publish(kafka, t.account_state, [(a, f.account(a, at=now)) for a in cfg.accounts])
    async with (
        Collector(kafka, t.order_intents) as intents,
        Collector(kafka, t.audit) as audit,
        real_time_worker(cfg),
    ):
        await publish(kafka, t.signals, [("demo", f.signal("sig-h", at=now))])
        await intents.wait_for(lambda v: len(v) >= 1, timeout_s=10)
        halt = f.control("halt-1", "halt", portfolio="demo", at=datetime.now(UTC))
        await publish(kafka, t.control, [("demo", halt)])
        events = await audit.wait_for(lambda v: any(e["type"] == "control_applied" for e in v))
        released_before_halt = len(intents.values)
        await asyncio.sleep(6.5)  # past the end of the window
        events = audit.values
    assert len(intents.values) == released_before_halt < 5
    cancelled = [e for e in events if e["type"] == "release_cancelled"]
    assert len(cancelled) == 5 - released_before_halt
    assert {e["intent_id"] for e in cancelled}.isdisjoint({i["intent_id"] for i in intents.values})
    applied = next(e for e in events if e["type"] == "control_applied")
    assert f"{5 - released_before_halt} pending releases cancelled" in applied["rationale"]
