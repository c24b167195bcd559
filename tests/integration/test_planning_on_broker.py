"""Issue 3 on the real broker: account states in, a risk-sized signal in, intents out only to
the accounts inside their rules, every exclusion's coded reason and every size's numbers in the
audit trail."""

from __future__ import annotations

from decimal import Decimal

import pytest

from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.config import KafkaConfig
from tests import factories as f
from tests.integration.kafka_io import Collector, publish
from tests.integration.test_worker import running

pytestmark = pytest.mark.integration


async def test_risk_sized_signal_reaches_only_accounts_inside_their_rules(
    kafka: KafkaConfig,
) -> None:
    cfg = f.config(
        kafka,
        n_accounts=4,
        allocation="risk",
        rules={"risk_per_trade_pct": "0.5", "max_daily_loss_pct": "5"},
    )
    accounts = cfg.accounts | {
        "ACC-3": cfg.accounts["ACC-3"].model_copy(
            update={
                "rules": cfg.accounts["ACC-3"].rules.model_copy(
                    update={"blocked_symbols": ("EURUSD",)}
                )
            }
        )
    }
    cfg = cfg.model_copy(update={"accounts": accounts})
    t = Topics(kafka.topic_prefix)
    states = [
        f.account("ACC-1", equity="100000"),
        # Lost 5,260 of a 5,263 daily limit (5% of 105,260): even the minimum 0.01 lot
        # (5.00 of stop-loss risk) would breach it, so the account is excluded, not capped.
        f.account("ACC-2", equity="100000").model_copy(
            update={"day_start_equity": Decimal("105260")}
        ),
        f.account("ACC-3", equity="100000"),
        f.account("ACC-4", equity="50000"),
    ]
    await publish(kafka, t.account_state, [(s.account_id, s) for s in states])
    async with (
        Collector(kafka, t.order_intents) as intents,
        Collector(kafka, t.audit) as audit,
        running(cfg),
    ):
        # Stop 50 pips away: 0.5% of 100,000 = 500 risk / (100,000 x 0.0050) = 1.00 lots.
        await publish(kafka, t.signals, [("demo", f.signal("sig-r", quantity=None))])
        got = await intents.wait_for(lambda v: len(v) == 2)
        events = await audit.wait_for(
            lambda v: (
                any(e["type"] == "plan_created" for e in v)
                and sum(e["type"] == "account_excluded" for e in v) == 2
            )
        )
    assert {i["account_id"]: i["quantity"] for i in got} == {"ACC-1": "1.00", "ACC-4": "0.50"}
    excluded = {e["account_id"]: e["rationale"] for e in events if e["type"] == "account_excluded"}
    assert set(excluded) == {"ACC-2", "ACC-3"}
    assert "DAILY_LOSS_HEADROOM" in excluded["ACC-2"]
    assert "SYMBOL_BLOCKED: EURUSD" in excluded["ACC-3"]
    plan = next(e for e in events if e["type"] == "plan_created")["data"]["plan"]
    assert plan["method"] == "risk"
    sized = {a["account_id"]: a["numbers"] for a in plan["allocations"]}
    assert set(sized) == {"ACC-1", "ACC-4"}
    assert all(numbers for numbers in sized.values()), "every size carries its numbers"
    inputs = next(e for e in events if e["type"] == "plan_created")["data"]["account_states"]
    assert set(inputs) == {"ACC-1", "ACC-4"}, "the states that sized the plan are recorded"
