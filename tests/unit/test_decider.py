"""The portfolio decider: signals, reports and control commands in; state and outputs out."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from orch_worker.domain import ids
from orch_worker.domain.audit import verify_chain
from orch_worker.domain.coordinator import IntentStatus
from orch_worker.domain.decider import (
    Context,
    Decision,
    PortfolioState,
    on_control,
    on_report,
    on_signal,
)
from orch_worker.domain.models import (
    AuditEvent,
    ExecutionReport,
    IntentKind,
    OrderIntent,
    ResultStatus,
    Signal,
)
from tests import factories as f

ACCOUNTS = ("ACC-1", "ACC-2", "ACC-3")


def ctx(now_offset_s: float = 0) -> Context:
    return Context(
        config=f.config(),
        now=f.NOW + timedelta(seconds=now_offset_s),
        accounts={a: f.account(a) for a in ACCOUNTS},
    )


class Run:
    """Feeds inputs through the decider, keeping the state and every output in order."""

    def __init__(self) -> None:
        self.pf = PortfolioState(portfolio="demo")
        self.decisions: list[Decision] = []
        self.clock = 0

    def _keep(self, d: Decision) -> Decision:
        self.pf = d.state
        self.decisions.append(d)
        return d

    def _ctx(self) -> Context:
        self.clock += 1
        return ctx(self.clock)

    def signal(self, sig: Signal | None = None) -> Decision:
        return self._keep(on_signal(self.pf, sig or f.signal(), self._ctx()))

    def report(self, r: ExecutionReport, signal_id: str = "sig-1") -> Decision:
        return self._keep(on_report(self.pf, signal_id, r, self._ctx()))

    def control(self, command_id: str, type_: str, **targets: Any) -> Decision:
        cmd = f.control(command_id, type_, **targets)
        return self._keep(on_control(self.pf, cmd, self._ctx()))

    @property
    def audit(self) -> list[AuditEvent]:
        return [e for d in self.decisions for e in d.audit]

    def status(self, signal_id: str = "sig-1") -> ResultStatus:
        return self.pf.signals[signal_id].status


def planned() -> tuple[Run, tuple[OrderIntent, ...]]:
    run = Run()
    d = run.signal()
    assert d.outcome == "planned"
    return run, d.intents


def by_account(intents: tuple[OrderIntent, ...]) -> dict[str, OrderIntent]:
    return {i.account_id: i for i in intents}


def fill(
    it: OrderIntent, qty: str | None = None, n: int = 1, price: str = "1.1001"
) -> ExecutionReport:
    status = "filled" if qty is None else "partially_filled"
    return f.report(it.intent_id, it.account_id, status, qty or str(it.quantity), n=n, price=price)


def reject(it: OrderIntent, n: int = 1, code: str = "insufficient_margin") -> ExecutionReport:
    return f.report(it.intent_id, it.account_id, "rejected", n=n, reason_code=code)


# --- on_signal -----------------------------------------------------------------------------------


def test_signal_is_planned_and_released_with_deterministic_intent_ids() -> None:
    _, intents = planned()

    assert [(i.account_id, str(i.quantity)) for i in intents] == [
        ("ACC-1", "0.34"),
        ("ACC-2", "0.33"),
        ("ACC-3", "0.33"),
    ]
    assert [i.intent_id for i in intents] == [ids.intent_id("sig-1", a, 1) for a in ACCOUNTS]
    assert {i.plan_id for i in intents} == {ids.plan_id("sig-1")}
    assert all(i.kind is IntentKind.INITIAL and i.attempt == 1 for i in intents)


def test_released_intent_carries_the_signals_order_terms() -> None:
    _, intents = planned()
    it = intents[0]

    assert (it.symbol, it.side.value, it.order_type.value) == ("EURUSD", "buy", "market")
    assert (it.stop_loss, it.reference_price) == (Decimal("1.0950"), Decimal("1.1000"))
    assert it.released_at == it.scheduled_at == f.NOW + timedelta(seconds=1)
    assert (it.portfolio, it.broker, it.signal_id) == ("demo", "paper", "sig-1")


def test_same_signal_on_a_fresh_state_gives_the_same_decision() -> None:
    a = on_signal(PortfolioState(portfolio="demo"), f.signal(), ctx())
    b = on_signal(PortfolioState(portfolio="demo"), f.signal(), ctx())

    assert a.intents == b.intents
    assert a.audit == b.audit
    assert a.state == b.state


def test_planning_is_audited_in_order_in_a_valid_chain() -> None:
    run, intents = planned()

    assert [e.type for e in run.audit] == [
        "signal_received",
        "plan_created",
        "schedule_created",
        "intent_released",
        "intent_released",
        "intent_released",
        "signal_status",
    ]
    assert verify_chain(run.audit) is None
    released = [e for e in run.audit if e.type == "intent_released"]
    assert [e.intent_id for e in released] == [i.intent_id for i in intents]
    assert (run.pf.audit_seq, run.pf.audit_hash) == (7, run.audit[-1].hash)


def test_plan_created_records_the_inputs_needed_for_replay() -> None:
    run, _ = planned()
    [created] = [e for e in run.audit if e.type == "plan_created"]

    assert set(created.data) >= {"signal", "plan", "account_states"}
    assert created.data["signal_status"] == "planned"
    states = created.data["account_states"]
    assert isinstance(states, dict)
    assert sorted(states) == list(ACCOUNTS)


def test_planned_signal_publishes_a_first_result_as_executing() -> None:
    run, _ = planned()
    [result] = run.decisions[0].results

    assert result.seq == 1
    assert result.status is ResultStatus.EXECUTING
    assert result.requested_total == Decimal("1.00")
    assert run.status() is ResultStatus.EXECUTING


def test_a_second_identical_signal_is_a_duplicate_with_no_outputs() -> None:
    run, _ = planned()
    before = run.pf

    d = run.signal()

    assert d.outcome == "duplicate"
    assert not d.has_outputs
    assert d.state is before


def test_a_redelivered_rejected_signal_is_also_a_duplicate() -> None:
    run = Run()
    run.signal(f.signal(symbol="GBPJPY"))

    d = run.signal(f.signal(symbol="GBPJPY"))

    assert d.outcome == "duplicate"
    assert not d.has_outputs


def rejected_signal(run: Run, sig: Signal) -> Decision:
    d = run.signal(sig)
    assert d.outcome == "rejected"
    assert d.intents == ()
    assert verify_chain(run.audit) is None
    return d


def test_signal_for_a_halted_portfolio_is_rejected() -> None:
    run = Run()
    run.control("c-halt", "halt", portfolio="demo")

    d = rejected_signal(run, f.signal())

    assert run.status() is ResultStatus.REJECTED
    assert run.pf.signals["sig-1"].reason.startswith("HALTED")
    assert [e.type for e in d.audit] == ["signal_received", "signal_rejected", "signal_status"]
    assert d.results[0].status is ResultStatus.REJECTED


def test_expired_signal_is_rejected_as_expired() -> None:
    run = Run()
    sig = f.signal(at=f.NOW - timedelta(minutes=10), expires_at=f.NOW - timedelta(minutes=1))

    d = rejected_signal(run, sig)

    assert run.status() is ResultStatus.EXPIRED
    assert d.results[0].reason.startswith("EXPIRED: expires_at=")


def test_signal_expiring_exactly_now_is_expired() -> None:
    sig = f.signal(at=f.NOW - timedelta(minutes=1), expires_at=f.NOW)

    d = on_signal(PortfolioState(portfolio="demo"), sig, ctx())

    assert d.outcome == "rejected"
    assert d.state.signals["sig-1"].status is ResultStatus.EXPIRED


def test_stale_signal_is_rejected_with_its_age() -> None:
    run = Run()
    sig = f.signal(at=f.NOW - timedelta(hours=2))

    rejected_signal(run, sig)

    assert run.status() is ResultStatus.REJECTED
    assert run.pf.signals["sig-1"].reason == "STALE: signal is 7201s old, max_signal_age_s=3600"


def test_signal_just_inside_the_max_age_is_planned() -> None:
    sig = f.signal(at=f.NOW - timedelta(seconds=3600))

    assert on_signal(PortfolioState(portfolio="demo"), sig, ctx()).outcome == "planned"


def test_unplannable_signal_is_rejected_with_the_planners_reason() -> None:
    run = Run()

    d = rejected_signal(run, f.signal(symbol="GBPJPY"))

    assert run.pf.signals["sig-1"].reason.startswith("UNKNOWN_SYMBOL")
    rejected = [e for e in d.audit if e.type == "signal_rejected"]
    assert rejected[0].data["signal_status"] == "rejected"


def test_excluded_accounts_are_audited_with_their_reasons() -> None:
    c = ctx()
    c = Context(
        config=c.config,
        now=c.now,
        accounts={**c.accounts, "ACC-2": f.account("ACC-2", status="suspended")},
    )

    d = on_signal(PortfolioState(portfolio="demo"), f.signal(), c)

    [excluded] = [e for e in d.audit if e.type == "account_excluded"]
    assert excluded.account_id == "ACC-2"
    assert excluded.data == {"reasons": ["STATUS: status=suspended"]}
    assert [i.account_id for i in d.intents] == ["ACC-1", "ACC-3"]


# --- on_report -----------------------------------------------------------------------------------


def test_all_fills_complete_the_signal() -> None:
    run, intents = planned()

    for it in intents:
        run.report(fill(it))

    assert run.status() is ResultStatus.COMPLETED
    final = run.decisions[-1].results[-1]
    assert final.status is ResultStatus.COMPLETED
    assert final.filled_total == Decimal("1.00")
    assert final.avg_price == Decimal("1.10010000")


def test_partial_fill_then_fill_completes_the_signal() -> None:
    run, intents = planned()
    acc1 = by_account(intents)["ACC-1"]

    run.report(fill(acc1, "0.10", n=1))
    assert run.status() is ResultStatus.EXECUTING
    run.report(fill(acc1, n=2))
    for it in intents[1:]:
        run.report(fill(it))

    assert run.status() is ResultStatus.COMPLETED


def test_partial_fill_then_rejection_of_the_rest_is_partially_completed() -> None:
    run, intents = planned()
    acc1, acc2, acc3 = intents

    run.report(fill(acc1))
    run.report(fill(acc2, "0.10", n=1))
    # market_closed without a session calendar is not retried (issue 5: other codes recover)
    run.report(reject(acc2, n=2, code="market_closed"))
    run.report(reject(acc3, code="market_closed"))

    assert run.status() is ResultStatus.PARTIALLY_COMPLETED
    final = run.decisions[-1].results[-1]
    assert final.filled_total == Decimal("0.44")
    assert [ln.status for ln in final.lines] == ["filled", "rejected", "rejected"]


def test_every_order_rejected_fails_the_signal_with_the_reasons() -> None:
    run, intents = planned()

    for it in intents:
        run.report(reject(it, code="market_closed"))

    assert run.status() is ResultStatus.FAILED
    assert run.pf.signals["sig-1"].reason == "market_closed: simulated"
    assert run.audit[-1].type == "signal_status"
    assert run.audit[-1].data["signal_status"] == "failed"


def test_every_change_publishes_a_result_with_increasing_seq() -> None:
    run, intents = planned()

    run.report(f.report(intents[0].intent_id, "ACC-1", "accepted"))
    run.report(fill(intents[0], n=2))
    run.report(fill(intents[1]))
    run.report(fill(intents[2]))

    seqs = [r.seq for d in run.decisions for r in d.results]
    assert seqs == [1, 2, 3, 4, 5]
    assert run.pf.signals["sig-1"].result_seq == 5
    assert [r.status for r in run.decisions[-1].results] == [ResultStatus.COMPLETED]


def test_a_redelivered_report_is_a_duplicate_with_no_outputs() -> None:
    run, intents = planned()
    run.report(fill(intents[0]))
    before = run.pf

    d = run.report(fill(intents[0]))

    assert d.outcome == "duplicate"
    assert not d.has_outputs
    assert d.state is before


def test_report_transition_is_audited_with_its_numbers() -> None:
    run, intents = planned()

    d = run.report(fill(intents[0], "0.10"))

    [e] = d.audit
    assert e.type == "intent_transition"
    assert e.rationale.startswith("released -> partially_filled on partially_filled report")
    assert e.data["fill_delta"] == "0.10"
    assert e.data["filled_quantity"] == "0.10"
    assert e.data["outcome"] == "applied"
    assert verify_chain(run.audit) is None


def test_overfill_is_audited_once() -> None:
    run, intents = planned()
    it = intents[0]

    d = run.report(f.report(it.intent_id, it.account_id, "partially_filled", "0.40", n=1))
    # escalated too since issue 5: an overfill needs a human
    assert [e.type for e in d.audit] == [
        "intent_transition",
        "overfill_detected",
        "intervention_opened",
    ]
    assert [i.reason_code for i in d.interventions] == ["overfill"]
    d = run.report(f.report(it.intent_id, it.account_id, "filled", "0.45", n=2))

    assert "overfill_detected" not in [e.type for e in d.audit]
    assert d.interventions == ()


def test_signal_status_change_is_audited_only_when_it_changes() -> None:
    run, intents = planned()

    d1 = run.report(fill(intents[0]))
    d2 = run.report(fill(intents[1]))
    d3 = run.report(fill(intents[2]))

    assert "signal_status" not in [e.type for e in (*d1.audit, *d2.audit)]
    assert [e.type for e in d3.audit][-1] == "signal_status"


def test_report_for_an_intent_outside_the_signal_is_counted_not_raised() -> None:
    # Changed with issue 5: a report naming no intent of the signal is counted (the outcome
    # feeds the metrics), and changes nothing; it used to raise.
    run, _ = planned()
    before = run.pf

    d = run.report(f.report("no-such-intent", "ACC-1", "accepted"))

    assert d.outcome == "unknown_intent"
    assert not d.has_outputs
    assert d.state is before
    assert run.report(f.report("x", "ACC-1", "accepted"), "no-such-signal").outcome == (
        "unknown_intent"
    )


# --- on_control ----------------------------------------------------------------------------------


def test_paused_account_is_excluded_from_the_next_plan() -> None:
    run = Run()
    run.control("c-1", "pause_account", account_id="ACC-2")

    d = run.signal()

    assert run.pf.paused_accounts == frozenset({"ACC-2"})
    assert [i.account_id for i in d.intents] == ["ACC-1", "ACC-3"]
    assert run.pf.signals["sig-1"].plan.exclusions[0].reasons == (
        "PAUSED: paused by a control command",
    )


def test_resumed_account_is_included_again() -> None:
    run = Run()
    run.control("c-1", "pause_account", account_id="ACC-2")
    run.control("c-2", "resume_account", account_id="ACC-2")

    d = run.signal()

    assert run.pf.paused_accounts == frozenset()
    assert [i.account_id for i in d.intents] == list(ACCOUNTS)


def test_halt_then_resume_plans_again() -> None:
    run = Run()
    run.control("c-1", "halt", portfolio="demo")
    assert run.signal(f.signal("sig-1")).outcome == "rejected"
    run.control("c-2", "resume", portfolio="demo")

    d = run.signal(f.signal("sig-2"))

    assert d.outcome == "planned"
    assert not run.pf.halted


def test_control_is_audited_in_the_same_chain() -> None:
    run = Run()
    d = run.control("c-1", "pause_account", account_id="ACC-2", reason="broker maintenance")
    run.signal()

    [e] = d.audit
    assert e.type == "control_applied"
    assert e.account_id == "ACC-2"
    assert "broker maintenance" in e.rationale
    assert e.data["outcome"] == "applied"
    assert verify_chain(run.audit) is None


def test_cancel_signal_emits_a_cancel_intent_for_every_open_order() -> None:
    run, intents = planned()
    run.report(fill(intents[0]))

    d = run.control("c-1", "cancel_signal", signal_id="sig-1")

    assert d.outcome == "applied"
    assert [c.parent_intent_id for c in d.intents] == [i.intent_id for i in intents[1:]]
    for c, parent in zip(d.intents, intents[1:], strict=True):
        assert c.kind is IntentKind.CANCEL
        assert c.intent_id == ids.intent_id("sig-1", parent.account_id, 1, "cancel")
        assert (c.account_id, c.quantity) == (parent.account_id, parent.quantity)
    states = {i.intent.account_id: i.status for i in run.pf.signals["sig-1"].intents}
    assert states == {
        "ACC-1": IntentStatus.FILLED,
        "ACC-2": IntentStatus.CANCEL_REQUESTED,
        "ACC-3": IntentStatus.CANCEL_REQUESTED,
    }


def test_a_duplicate_control_command_is_a_no_op() -> None:
    run, _ = planned()
    run.control("c-1", "cancel_signal", signal_id="sig-1")
    before = run.pf

    d = run.control("c-1", "cancel_signal", signal_id="sig-1")

    assert d.outcome == "duplicate"
    assert not d.has_outputs
    assert d.state is before


def test_a_duplicate_pause_does_not_undo_a_later_resume() -> None:
    run = Run()
    run.control("c-1", "pause_account", account_id="ACC-2")
    run.control("c-2", "resume_account", account_id="ACC-2")

    run.control("c-1", "pause_account", account_id="ACC-2")

    assert run.pf.paused_accounts == frozenset()


def test_a_second_cancel_command_asks_for_no_new_cancels() -> None:
    run, _ = planned()
    run.control("c-1", "cancel_signal", signal_id="sig-1")

    d = run.control("c-2", "cancel_signal", signal_id="sig-1")

    assert d.intents == ()


def test_cancel_of_an_unknown_signal_is_recorded_as_unknown_target() -> None:
    run = Run()

    d = run.control("c-1", "cancel_signal", signal_id="sig-404")

    assert d.outcome == "unknown_target"
    assert d.intents == ()
    assert d.audit[0].data["outcome"] == "unknown_target"


def test_cancel_of_a_finished_signal_is_a_no_op() -> None:
    run, intents = planned()
    for it in intents:
        run.report(fill(it))

    d = run.control("c-1", "cancel_signal", signal_id="sig-1")

    assert d.outcome == "no_op"
    assert d.intents == ()
    assert run.status() is ResultStatus.COMPLETED


def test_cancelled_signal_ends_cancelled_once_its_orders_are_cancelled() -> None:
    run, intents = planned()
    run.control("c-1", "cancel_signal", signal_id="sig-1")

    for it in intents:
        run.report(f.report(it.intent_id, it.account_id, "cancelled"))

    assert run.status() is ResultStatus.CANCELLED
