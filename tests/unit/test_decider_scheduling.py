"""The decider with a stagger window: intents wait for their time, timers release them, and
halt, pause, expiry and price drift stop releases that have not happened yet."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from orch_worker.domain.audit import verify_chain
from orch_worker.domain.coordinator import IntentStatus
from orch_worker.domain.decider import (
    Context,
    Decision,
    PortfolioState,
    on_control,
    on_due,
    on_signal,
)
from orch_worker.domain.models import ResultStatus
from tests import factories as f

ACCOUNTS = ("ACC-1", "ACC-2", "ACC-3")


def cfg(**stagger: Any) -> Any:
    return f.config(stagger={"min_s": 1, "max_s": 10, **stagger})


def ctx(at_s: float, config: Any = None, prices: dict[str, Decimal] | None = None) -> Context:
    return Context(
        config=config or cfg(),
        now=f.NOW + timedelta(seconds=at_s),
        accounts={a: f.account(a) for a in ACCOUNTS},
        prices=prices or {},
    )


def statuses(pf: PortfolioState, sid: str = "sig-1") -> list[IntentStatus]:
    return [i.status for i in pf.signals[sid].intents]


def test_staggered_signal_waits_and_timers_release_each_at_its_time() -> None:
    d = on_signal(PortfolioState(portfolio="demo"), f.signal(), ctx(0))
    assert d.intents == ()
    assert statuses(d.state) == [IntentStatus.SCHEDULED] * 3
    times = sorted(i.intent.scheduled_at for i in d.state.signals["sig-1"].intents)
    assert times[0] == f.NOW + timedelta(seconds=1)
    sched = next(e for e in d.audit if e.type == "schedule_created")
    assert sched.data["order"] == ["ACC-1", "ACC-2", "ACC-3"]

    pf = d.state
    released = []
    for t in times:
        step = on_due(pf, ["sig-1"], ctx((t - f.NOW).total_seconds()))
        pf = step.state
        assert len(step.intents) == 1
        assert step.intents[0].released_at == t == step.intents[0].scheduled_at
        released.append(step.intents[0].account_id)
    assert released == ["ACC-1", "ACC-2", "ACC-3"]
    assert statuses(pf) == [IntentStatus.RELEASED] * 3
    # before the acknowledgement timeouts (30 s after each release), nothing else is due
    assert on_due(pf, ["sig-1"], ctx(20)).outcome == "nothing_due"


def test_a_late_timer_releases_everything_due_at_once_with_its_lag() -> None:
    d = on_signal(PortfolioState(portfolio="demo"), f.signal(), ctx(0))
    step = on_due(d.state, ["sig-1"], ctx(30))
    assert len(step.intents) == 3
    lags = [e.data["release_lag_s"] for e in step.audit if e.type == "intent_released"]
    assert all(lag > 0 for lag in lags)


def test_halt_cancels_every_pending_release_and_resume_does_not_bring_them_back() -> None:
    d = on_signal(PortfolioState(portfolio="demo"), f.signal(), ctx(0))
    pf = on_due(d.state, ["sig-1"], ctx(1)).state  # ACC-1 released at 1 s
    halted = on_control(pf, f.control("h", "halt", portfolio="demo"), ctx(2))
    assert statuses(halted.state) == [
        IntentStatus.RELEASED,
        IntentStatus.CANCELLED,
        IntentStatus.CANCELLED,
    ]
    assert [e.type for e in halted.audit][:3] == [
        "control_applied",
        "release_cancelled",
        "release_cancelled",
    ]
    assert "2 pending releases cancelled" in halted.audit[0].rationale
    resumed = on_control(halted.state, f.control("r", "resume", portfolio="demo"), ctx(3))
    later = on_due(resumed.state, ["sig-1"], ctx(60))
    assert later.intents == ()
    assert statuses(later.state)[1:] == [IntentStatus.CANCELLED] * 2


def test_pause_account_cancels_only_that_accounts_pending_release() -> None:
    d = on_signal(PortfolioState(portfolio="demo"), f.signal(), ctx(0))
    paused = on_control(d.state, f.control("p", "pause_account", account_id="ACC-2"), ctx(0.5))
    by_account = {i.intent.account_id: i.status for i in paused.state.signals["sig-1"].intents}
    assert by_account == {
        "ACC-1": IntentStatus.SCHEDULED,
        "ACC-2": IntentStatus.CANCELLED,
        "ACC-3": IntentStatus.SCHEDULED,
    }
    done = on_due(paused.state, ["sig-1"], ctx(60))
    assert sorted(i.account_id for i in done.intents) == ["ACC-1", "ACC-3"]


def test_nothing_is_released_after_the_signal_expires() -> None:
    sig = f.signal(expires_at=f.NOW + timedelta(seconds=5))
    d = on_signal(PortfolioState(portfolio="demo"), sig, ctx(0))
    step = on_due(d.state, ["sig-1"], ctx(6))
    assert step.intents == ()
    assert statuses(step.state) == [IntentStatus.EXPIRED] * 3
    assert all("EXPIRED" in e.rationale for e in step.audit if e.type == "intent_expired")
    assert step.state.signals["sig-1"].status is ResultStatus.EXPIRED
    assert step.results[-1].status is ResultStatus.EXPIRED


def test_price_drift_past_the_budget_expires_the_release_with_the_numbers() -> None:
    config = cfg(max_drift_bps=20)
    d = on_signal(PortfolioState(portfolio="demo"), f.signal(), ctx(0, config))
    calm = on_due(d.state, ["sig-1"], ctx(1, config, {"EURUSD": Decimal("1.1010")}))
    assert len(calm.intents) == 1  # 9.1 bps from 1.1000: inside the budget
    moved = on_due(calm.state, ["sig-1"], ctx(30, config, {"EURUSD": Decimal("1.1050")}))
    assert moved.intents == ()
    expired = [e for e in moved.audit if e.type == "intent_expired"]
    assert len(expired) == 2
    assert "PRICE_DRIFT" in expired[0].rationale
    assert "45.5 bps" in expired[0].rationale


def test_urgent_signal_is_released_at_once_in_the_same_decision() -> None:
    d: Decision = on_signal(PortfolioState(portfolio="demo"), f.signal(urgency="high"), ctx(0))
    assert len(d.intents) == 3
    assert verify_chain(d.audit) is None
