"""Replay: the recorded planner inputs re-make the recorded plan, and every difference is named."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import numpy as np
import pytest

from orch_worker.domain.correlation import CorrelationMatrix
from orch_worker.domain.decider import Context, PortfolioState, on_control, on_signal
from orch_worker.domain.models import AuditEvent
from orch_worker.domain.planner import PlanContext, plan_signal
from orch_worker.domain.recording import (
    config_digest,
    config_from_snapshot,
    config_snapshot,
    plan_context_from_record,
    plan_context_record,
)
from orch_worker.replay import ReplayError, diff_json, replay_plan, timeline
from tests import factories as f


def _ctx(**overrides: Any) -> Context:
    accounts = {a: f.account(a) for a in ("ACC-1", "ACC-2", "ACC-3")}
    accounts.update(overrides)
    return Context(config=f.config(n_accounts=3), now=f.NOW, accounts=accounts)


def _plan_events(pf: PortfolioState, signal_id: str, ctx: Context) -> list[AuditEvent]:
    return list(on_signal(pf, f.signal(signal_id), ctx).audit)


def _with_data(events: list[AuditEvent], **changes: Any) -> list[AuditEvent]:
    """The events with the plan record's data changed (the hash no longer matters here)."""
    return [
        e.model_copy(update={"data": {**e.data, **changes}})
        if e.type in ("plan_created", "signal_rejected")
        else e
        for e in events
    ]


def test_a_recorded_plan_replays_to_the_same_plan() -> None:
    events = _plan_events(PortfolioState(portfolio="demo"), "sig-1", _ctx())

    outcome = replay_plan(events)

    assert outcome.same, outcome.differences
    assert outcome.replayed


def test_excluded_accounts_states_are_recorded_and_needed() -> None:
    suspended = f.account("ACC-2", status="suspended")
    events = _plan_events(PortfolioState(portfolio="demo"), "sig-1", _ctx(**{"ACC-2": suspended}))
    [record] = [e for e in events if e.type == "plan_created"]

    assert set(record.data["account_states"]) == {"ACC-1", "ACC-3"}  # type: ignore[arg-type]
    assert set(record.data["other_account_states"]) == {"ACC-2"}  # type: ignore[arg-type]
    assert replay_plan(events).same
    # Without ACC-2's state the planner gives a different reason for leaving it out.
    dropped = replay_plan(_with_data(events, other_account_states={}))
    assert any(d.startswith("plan.exclusions[ACC-2].reasons") for d in dropped.differences)


def test_paused_accounts_and_rotation_come_from_the_record() -> None:
    pf = PortfolioState(portfolio="demo")
    pf = on_control(pf, f.control("c-1", "pause_account", account_id="ACC-3"), _ctx()).state
    pf = on_signal(pf, f.signal("sig-0", quantity="1.00"), _ctx()).state  # rotation moves on
    events = list(on_signal(pf, f.signal("sig-1", quantity="1.01"), _ctx()).audit)
    [record] = [e for e in events if e.type == "plan_created"]
    context = record.data["plan_context"]
    assert isinstance(context, dict)
    assert (context["paused_accounts"], context["rotation"]) == (["ACC-3"], 1)

    assert replay_plan(events).same
    unpaused = {**context, "paused_accounts": []}
    assert not replay_plan(_with_data(events, plan_context=unpaused)).same
    other_turn = {**context, "rotation": 0}
    moved = replay_plan(_with_data(events, plan_context=other_turn)).differences
    assert "plan.numbers.rotation: recorded 1, replay 0" in moved


def test_a_changed_recorded_plan_is_reported_field_by_field() -> None:
    events = _plan_events(PortfolioState(portfolio="demo"), "sig-1", _ctx())
    [record] = [e for e in events if e.type == "plan_created"]
    plan = dict(record.data["plan"])  # type: ignore[arg-type]
    allocations = [dict(a) for a in plan["allocations"]]
    allocations[1]["quantity"] = "0.50"
    del allocations[2]
    plan["allocations"] = allocations

    outcome = replay_plan(_with_data(events, plan=plan))

    first, second = outcome.differences
    assert first == "plan.allocations[ACC-2].quantity: recorded 0.50, replay 0.33"
    assert second.startswith("plan.allocations[ACC-3]: absent in the record, replay {")


def test_a_configuration_that_does_not_match_its_digest_is_a_difference() -> None:
    events = _plan_events(PortfolioState(portfolio="demo"), "sig-1", _ctx())

    outcome = replay_plan(_with_data(events, config_digest="0" * 64))

    assert outcome.differences[0].startswith("config_digest: recorded 000")


def test_another_configuration_is_a_what_if() -> None:
    events = _plan_events(PortfolioState(portfolio="demo"), "sig-1", _ctx())
    equity = f.config(n_accounts=3, allocation="equity")

    outcome = replay_plan(events, equity)

    assert "plan.method: recorded equal, replay equity" in outcome.differences
    assert any("config.portfolios.demo.allocation" in n for n in outcome.notes)


def test_a_signal_refused_before_planning_has_nothing_to_rerun() -> None:
    stale = f.signal("sig-1", at=f.NOW - timedelta(days=1))
    events = list(on_signal(PortfolioState(portfolio="demo"), stale, _ctx()).audit)

    outcome = replay_plan(events)

    assert not outcome.replayed
    assert outcome.same
    assert "STALE" in outcome.notes[0]


def test_an_older_record_needs_a_configuration() -> None:
    events = _plan_events(PortfolioState(portfolio="demo"), "sig-1", _ctx())
    kept = ("signal", "plan", "account_states")
    older = [
        e.model_copy(update={"data": {k: v for k, v in e.data.items() if k in kept}})
        if e.type == "plan_created"
        else e
        for e in events
    ]

    with pytest.raises(ReplayError, match="--config"):
        replay_plan(older)
    outcome = replay_plan(older, f.config(n_accounts=3))
    assert outcome.same, outcome.differences
    assert "older record" in outcome.notes[0]


def test_timeline_tells_the_story_in_chain_order() -> None:
    events = _plan_events(PortfolioState(portfolio="demo"), "sig-1", _ctx())

    text = timeline("sig-1", events)

    assert text.index("signal_received") < text.index("plan_created")
    assert "plan (equal): requested 1.00, 3 accounts, 0 excluded" in text
    assert "planned at 2026-11-21T12:00:00.000000Z, rotation 0" in text


def test_diff_json_matches_accounts_not_positions_and_decimals_by_value() -> None:
    a = {"x": [{"account_id": "A", "q": "1.0"}, {"account_id": "B", "q": "2"}], "n": 1}
    b = {"x": [{"account_id": "B", "q": "2.00"}, {"account_id": "A", "q": "1"}], "n": 1}

    assert diff_json(a, b) == ["x: order differs: recorded ['A', 'B'], replay ['B', 'A']"]
    assert diff_json({"r": ["p", "q"]}, {"r": ["p"]}) == ["r[1]: recorded q, absent in the replay"]
    assert diff_json({"k": 1}, {"k": "1"}) == ["k: recorded 1, replay 1"]


def test_plan_context_round_trips_every_field() -> None:
    ctx = PlanContext(
        paused_accounts=frozenset({"B", "A"}),
        now=f.NOW,
        cooldown_accounts=frozenset({"C"}),
        risk_used_today={"A": Decimal("12.50")},
        health={"A": 0.1 + 0.2},
        quality={"B": 1 / 3},
        correlations=CorrelationMatrix(("X", "Y"), np.array([[1.0, 0.3], [0.3, 1.0]])),
        rotation=7,
    )

    assert plan_context_from_record(plan_context_record(ctx)) == ctx


def test_the_config_snapshot_plans_like_the_configuration() -> None:
    cfg = f.config(n_accounts=4, allocation="ratio")
    snapshot = config_snapshot(cfg, "demo")
    rebuilt = config_from_snapshot(snapshot)
    accounts = {a: f.account(a) for a in cfg.accounts}
    ctx = PlanContext(now=f.NOW, rotation=3)

    assert plan_signal(f.signal(quantity="1.03"), accounts, rebuilt, ctx) == plan_signal(
        f.signal(quantity="1.03"), accounts, cfg, ctx
    )
    assert config_digest(config_snapshot(rebuilt, "demo")) == config_digest(snapshot)
    assert "kafka" not in snapshot, "only what a plan depends on is recorded"


def test_a_large_portfolios_states_are_split_into_events_and_replay_gathers_them() -> None:
    from orch_worker.domain.recording import STATES_PER_EVENT

    n = 2 * STATES_PER_EVENT + 50
    cfg = f.config(n_accounts=n, max_accounts=5)
    accounts = {a: f.account(a) for a in cfg.accounts}
    ctx = Context(config=cfg, now=f.NOW, accounts=accounts)
    events = list(on_signal(PortfolioState(portfolio="demo"), f.signal(), ctx).audit)

    parts = [e for e in events if e.type == "plan_inputs"]
    [record] = [e for e in events if e.type == "plan_created"]
    assert [len(p.data["other_account_states"]) for p in parts] == [200, 200, 45]  # type: ignore[arg-type]
    assert record.data["other_account_states"] == {}
    assert record.data["other_account_states_parts"] == 3
    assert len(record.data["account_states"]) == 5  # type: ignore[arg-type]
    assert max(len(e.model_dump_json()) for e in events) < 300_000
    assert replay_plan(events).same

    with pytest.raises(ReplayError, match="3 plan_inputs events, 2 are in the store"):
        replay_plan([e for e in events if e is not parts[1]])
