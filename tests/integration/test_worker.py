"""The worker on a real Kafka-protocol broker: plan, release, follow, dead-letter, recover."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from itertools import pairwise

import pytest

from orch_worker.adapters.kafka.topics import Topics
from orch_worker.adapters.kafka.worker_app import Worker
from orch_worker.domain.config import KafkaConfig, OrchConfig
from tests import factories as f
from tests.integration.bounded import worker_running
from tests.integration.kafka_io import Collector, publish

pytestmark = pytest.mark.integration


def running(cfg: OrchConfig) -> AbstractAsyncContextManager[Worker]:
    return worker_running(cfg, clock=lambda: f.NOW)


async def seed_accounts(cfg: OrchConfig, topics: Topics, **overrides: dict[str, str]) -> None:
    states = [f.account(a, **overrides.get(a, {})) for a in cfg.accounts]
    await publish(cfg.kafka, topics.account_state, [(s.account_id, s) for s in states])


async def test_signal_is_planned_released_and_followed_to_completion(kafka: KafkaConfig) -> None:
    cfg = f.config(kafka)
    t = Topics(kafka.topic_prefix)
    await seed_accounts(cfg, t, **{"ACC-3": {"status": "suspended"}})
    async with (
        Collector(kafka, t.order_intents) as intents,
        Collector(kafka, t.execution_results) as results,
        Collector(kafka, t.audit) as audit,
        running(cfg),
    ):
        await publish(kafka, t.signals, [("demo", f.signal("sig-1", quantity="1.01"))])
        got = await intents.wait_for(lambda v: len(v) == 2)
        assert sorted((i["account_id"], i["quantity"]) for i in got) == [
            ("ACC-1", "0.51"),
            ("ACC-2", "0.50"),
        ]
        assert {i["kind"] for i in got} == {"initial"}
        for n, i in enumerate(got):
            reports = [
                f.report(i["intent_id"], i["account_id"], "accepted", n=1),
                f.report(i["intent_id"], i["account_id"], "filled", i["quantity"], n=2),
            ]
            await publish(kafka, t.execution_reports, [(r.account_id, r) for r in reports])
            del n
        final = await results.wait_for(lambda v: any(r["status"] == "completed" for r in v))
        done = next(r for r in final if r["status"] == "completed")
        assert done["filled_total"] == "1.01"
        assert {ln["account_id"]: ln["filled"] for ln in done["lines"]} == {
            "ACC-1": "0.51",
            "ACC-2": "0.50",
        }
        events = await audit.wait_for(
            lambda v: any(e.get("data", {}).get("signal_status") == "completed" for e in v)
        )
        types = [e["type"] for e in events]
        assert "account_excluded" in types
        excluded = next(e for e in events if e["type"] == "account_excluded")
        assert excluded["account_id"] == "ACC-3"
        assert "STATUS: status=suspended" in excluded["rationale"]
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(1, len(seqs) + 1))
        assert all(b["prev_hash"] == a["hash"] for a, b in pairwise(events))


async def test_bad_input_is_dead_lettered_and_worker_keeps_going(kafka: KafkaConfig) -> None:
    cfg = f.config(kafka)
    t = Topics(kafka.topic_prefix)
    await seed_accounts(cfg, t)
    async with (
        Collector(kafka, t.dead_letter) as dead,
        Collector(kafka, t.order_intents) as intents,
        running(cfg) as worker,
    ):
        await publish(
            kafka,
            t.signals,
            [
                ("demo", b"{not json"),
                ("demo", b'{"signal_id": "x"}'),
                ("demo", f.signal("sig-nan").model_dump_json().replace('"1.00"', '"NaN"').encode()),
                ("nope", f.signal("sig-other", portfolio="nope")),
                ("demo", f.signal("sig-ok")),
            ],
        )
        await publish(
            kafka, t.execution_reports, [("ACC-1", f.report("no-such-intent", "ACC-1", "accepted"))]
        )
        letters = await dead.wait_for(lambda v: len(v) == 5)
        # Different keys land on different partitions, so only per-key order is defined.
        assert sorted(d["error_type"] for d in letters) == [
            "malformed_json",
            "schema_invalid",
            "schema_invalid",
            "unknown_intent",
            "unknown_portfolio",
        ]
        by_value = {d["value"]: d for d in letters}
        assert by_value["{not json"]["original_topic"] == t.signals
        assert by_value["{not json"]["error_type"] == "malformed_json"
        nan = next(d for d in letters if "sig-nan" in d["value"])
        assert "quantity" in nan["error"]
        assert "finite" in nan["error"]
        await intents.wait_for(lambda v: len(v) == 3)
        total = sum(
            worker.metrics.dead_lettered.labels(topic, kind)._value.get()
            for topic, kind in [
                (t.signals, "malformed_json"),
                (t.signals, "schema_invalid"),
                (t.signals, "unknown_portfolio"),
                (t.execution_reports, "unknown_intent"),
            ]
        )
        assert total == 5


async def test_restarted_worker_does_not_plan_a_signal_twice(kafka: KafkaConfig) -> None:
    cfg = f.config(kafka)
    t = Topics(kafka.topic_prefix)
    await seed_accounts(cfg, t)
    async with Collector(kafka, t.order_intents) as intents, Collector(kafka, t.audit) as audit:
        async with running(cfg):
            await publish(kafka, t.signals, [("demo", f.signal("sig-1"))])
            await intents.wait_for(lambda v: len(v) == 3)
        # The same signal again (a producer retry), then a new one, to a restarted worker.
        async with running(cfg) as worker:
            await publish(
                kafka, t.signals, [("demo", f.signal("sig-1")), ("demo", f.signal("sig-2"))]
            )
            await intents.wait_for(lambda v: len(v) == 6)
            assert worker.metrics.outcomes.labels("signal", "duplicate")._value.get() == 1
            await audit.wait_for(lambda v: len({e["event_id"] for e in v}) >= 14)
        ids = [i["intent_id"] for i in intents.values]
        assert len(ids) == len(set(ids)) == 6
        # A stop can land between publishing and the outbox's done marker; start-up then
        # republishes that outbox verbatim, so copies are identical and dedupe by event_id.
        by_id: dict[str, dict[str, object]] = {}
        for e in audit.values:
            assert by_id.setdefault(e["event_id"], e) == e
        seqs = sorted(int(str(e["seq"])) for e in by_id.values())
        assert seqs == list(range(1, len(seqs) + 1)), "the audit chain continues across restarts"
        assert len(seqs) == 14


async def test_a_restart_reads_the_changelog_from_the_newest_snapshot(kafka: KafkaConfig) -> None:
    cfg = f.config(kafka)
    cfg = cfg.model_copy(update={"worker": cfg.worker.model_copy(update={"snapshot_every": 4})})
    t = Topics(kafka.topic_prefix)
    await seed_accounts(cfg, t)
    async with Collector(kafka, t.order_intents) as intents, Collector(kafka, t.changelog) as log:
        async with running(cfg):
            await publish(kafka, t.signals, [("demo", f.signal(f"sig-{n}")) for n in range(6)])
            got = await intents.wait_for(lambda v: len(v) == 18)
            # A snapshot comes after at least four decisions per signal held (6 + 18 here).
            acks = [f.report(i["intent_id"], i["account_id"], "accepted", n=1) for i in got]
            await publish(kafka, t.execution_reports, [(r.account_id, r) for r in acks])
            await log.wait_for(lambda v: any(r["type"] == "snapshot" for r in v))
        async with running(cfg) as worker:
            assert any(offset > 0 for offset in worker.recovery_starts.values())
            # Every signal is known from the snapshot: copies are duplicates, new ones plan.
            await publish(
                kafka, t.signals, [("demo", f.signal("sig-0")), ("demo", f.signal("sig-new"))]
            )
            await intents.wait_for(lambda v: len(v) == 21)
            # Inputs the stop left uncommitted are read again too: duplicates as well.
            assert worker.metrics.outcomes.labels("signal", "duplicate")._value.get() >= 1
            assert len(worker.portfolios["demo"].signals) == 7
    ids = [i["intent_id"] for i in intents.values]
    assert len(ids) == len(set(ids)) == 21
