"""The intent state machine (a literal transition table) and a signal's aggregated result."""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from orch_worker.domain.coordinator import (
    OPEN,
    REPORT_TRIGGERS,
    TERMINAL,
    TRANSITIONS,
    IntentState,
    IntentStatus,
    ReportOutcome,
    SignalState,
    aggregate_status,
    apply_report,
    build_result,
)
from orch_worker.domain.models import (
    ExecutionReport,
    IntentKind,
    OrderIntent,
    ReportStatus,
    ResultStatus,
)
from orch_worker.domain.planner import PlanContext, plan_signal
from tests import factories as f

ALL_PAIRS = list(itertools.product(IntentStatus, ReportStatus))


def intent(
    account_id: str = "ACC-1",
    quantity: str = "0.50",
    intent_id: str | None = None,
    **kw: Any,
) -> OrderIntent:
    return OrderIntent.model_validate(
        {
            "intent_id": intent_id or f"int-{account_id}",
            "plan_id": "plan-1",
            "signal_id": "sig-1",
            "portfolio": "demo",
            "account_id": account_id,
            "broker": "paper",
            "symbol": "EURUSD",
            "side": "buy",
            "order_type": "market",
            "quantity": quantity,
            "scheduled_at": f.NOW,
            "released_at": f.NOW,
            "rationale": "test",
            **kw,
        }
    )


def state(status: IntentStatus = IntentStatus.RELEASED, **kw: Any) -> IntentState:
    it = kw.pop("intent", None) or intent()
    return IntentState(intent=it, status=status, **kw)


def rep(
    status: ReportStatus | str,
    filled: str = "0",
    n: int = 1,
    price: str = "1.1001",
    target: IntentState | None = None,
) -> ExecutionReport:
    status = ReportStatus(status)
    it = (target or state()).intent
    return f.report(
        it.intent_id,
        it.account_id,
        status.value,
        filled,
        n=n,
        price=price,
        reason_code="other" if status is ReportStatus.REJECTED else None,
    )


def test_states_split_into_open_and_terminal() -> None:
    assert set(IntentStatus) == OPEN | TERMINAL
    assert not OPEN & TERMINAL
    assert {
        IntentStatus.FILLED,
        IntentStatus.CANCELLED,
        IntentStatus.REJECTED,
        IntentStatus.EXPIRED,
        IntentStatus.FAILED,
    } == TERMINAL


# Every (state, trigger) pair of the table is covered in test_coordinator_table.py; these are
# the report-level behaviours of `apply_report`.

END_OF = {
    ReportStatus.FILLED: IntentStatus.FILLED,
    ReportStatus.REJECTED: IntentStatus.REJECTED,
    ReportStatus.CANCELLED: IntentStatus.CANCELLED,
    ReportStatus.EXPIRED: IntentStatus.EXPIRED,
}


@pytest.mark.parametrize(
    "status",
    [
        IntentStatus.RELEASED,
        IntentStatus.ACCEPTED,
        IntentStatus.PARTIALLY_FILLED,
        IntentStatus.CANCEL_REQUESTED,
        IntentStatus.UNKNOWN,
    ],
)
@pytest.mark.parametrize("report_status", list(END_OF))
def test_a_final_report_ends_every_order_at_the_venue_in_the_matching_state(
    status: IntentStatus, report_status: ReportStatus
) -> None:
    got = apply_report(state(status), rep(report_status))

    assert got.outcome is ReportOutcome.APPLIED
    assert got.state.status is END_OF[report_status]
    assert got.state.deadline is None


def test_a_pending_cancel_stays_pending_until_the_venue_ends_the_order() -> None:
    for n, report_status in enumerate(("accepted", "partially_filled"), start=1):
        got = apply_report(state(IntentStatus.CANCEL_REQUESTED), rep(report_status, "0.1", n=n))
        assert got.state.status is IntentStatus.CANCEL_REQUESTED


@pytest.mark.parametrize(
    ("status", "report_status"), ALL_PAIRS, ids=[f"{s.value}-{r.value}" for s, r in ALL_PAIRS]
)
def test_every_state_and_report_pair_follows_the_table(
    status: IntentStatus, report_status: ReportStatus
) -> None:
    before = state(status, report_ids=("earlier",))
    report = rep(report_status, target=before)
    trigger = REPORT_TRIGGERS[report_status]

    got = apply_report(before, report)

    assert got.state.report_ids == ("earlier", report.report_id)
    if status in TERMINAL:
        assert got.outcome is ReportOutcome.LATE
        assert got.state.status is status
    elif (status, trigger) in TRANSITIONS:
        assert got.outcome is ReportOutcome.APPLIED
        assert (got.state.status, got.effects) == TRANSITIONS[status, trigger]
    else:
        assert got.outcome is ReportOutcome.OUT_OF_ORDER
        assert got.state.status is status
        assert got.effects == ()


def test_a_report_for_a_scheduled_intent_is_out_of_order() -> None:
    got = apply_report(state(IntentStatus.SCHEDULED), rep("accepted"))

    assert got.outcome is ReportOutcome.OUT_OF_ORDER
    assert got.state.status is IntentStatus.SCHEDULED


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_a_terminal_intent_keeps_its_state_but_counts_and_flags_a_late_fill(
    terminal: IntentStatus,
) -> None:
    # Changed with issue 5: a fill reported after the order ended is a real position, so it is
    # counted and flagged (and escalated by the decider), never silently dropped.
    before = state(terminal, filled=Decimal("0.20"), notional=Decimal("0.22"))

    got = apply_report(before, rep("filled", "0.50", price="1.1000"))

    assert got.outcome is ReportOutcome.LATE
    assert got.fill_delta == Decimal("0.30")
    assert (got.state.status, got.state.filled, got.state.late_fill) == (
        terminal,
        Decimal("0.50"),
        True,
    )
    assert got.effects == ()


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_a_terminal_intent_absorbs_a_report_that_adds_no_fill(terminal: IntentStatus) -> None:
    before = state(terminal, filled=Decimal("0.20"), notional=Decimal("0.22"))

    got = apply_report(before, rep("cancelled", "0.20"))

    assert got.outcome is ReportOutcome.LATE
    assert (got.state.status, got.state.filled, got.state.late_fill) == (
        terminal,
        Decimal("0.20"),
        False,
    )


def test_a_duplicate_report_id_is_a_no_op() -> None:
    first = apply_report(state(), rep("partially_filled", "0.20"))

    again = apply_report(first.state, rep("partially_filled", "0.20"))

    assert again.outcome is ReportOutcome.DUPLICATE
    assert again.state == first.state
    assert again.fill_delta == 0


def test_a_duplicate_report_id_with_different_content_is_still_ignored() -> None:
    first = apply_report(state(), rep("partially_filled", "0.20", n=1))

    again = apply_report(first.state, rep("filled", "0.50", n=1))

    assert again.outcome is ReportOutcome.DUPLICATE
    assert again.state.status is IntentStatus.PARTIALLY_FILLED
    assert again.state.filled == Decimal("0.20")


def test_partial_fills_add_only_the_cumulative_increase() -> None:
    s = state()
    steps = [("partially_filled", "0.10", "1.1000"), ("partially_filled", "0.30", "1.2000")]
    deltas = []
    for n, (status, filled, price) in enumerate(steps, start=1):
        got = apply_report(s, rep(status, filled, n=n, price=price))
        deltas.append(got.fill_delta)
        s = got.state

    assert deltas == [Decimal("0.10"), Decimal("0.20")]
    assert s.filled == Decimal("0.30")
    assert s.notional == Decimal("0.10") * Decimal("1.1000") + Decimal("0.20") * Decimal("1.2000")
    assert s.avg_price == Decimal("1.16666667")


def test_a_stale_lower_cumulative_fill_adds_nothing() -> None:
    s = apply_report(state(), rep("partially_filled", "0.30", n=1)).state

    got = apply_report(s, rep("partially_filled", "0.20", n=2, price="9.9999"))

    assert got.fill_delta == 0
    assert got.state.filled == Decimal("0.30")
    assert got.state.notional == s.notional
    assert got.outcome is ReportOutcome.APPLIED


def test_partial_fill_then_fill_reaches_filled_with_the_full_quantity() -> None:
    s = apply_report(state(), rep("partially_filled", "0.20", n=1)).state
    s = apply_report(s, rep("filled", "0.50", n=2)).state

    assert s.status is IntentStatus.FILLED
    assert s.filled == Decimal("0.50")
    assert not s.overfilled


def test_a_fill_beyond_the_intent_quantity_is_flagged_as_overfill() -> None:
    got = apply_report(state(), rep("filled", "0.60"))

    assert got.state.overfilled
    assert got.state.filled == Decimal("0.60")


def test_a_fill_of_exactly_the_quantity_is_not_an_overfill() -> None:
    assert not apply_report(state(), rep("filled", "0.50")).state.overfilled


def test_fills_racing_a_cancel_are_counted_while_the_cancel_is_pending() -> None:
    got = apply_report(state(IntentStatus.CANCEL_REQUESTED), rep("partially_filled", "0.10"))

    assert got.state.status is IntentStatus.CANCEL_REQUESTED
    assert got.state.filled == Decimal("0.10")


def test_a_rejected_report_records_its_reason_code_and_text() -> None:
    got = apply_report(
        state(), f.report("int-ACC-1", "ACC-1", "rejected", reason_code="insufficient_margin")
    )

    assert got.state.status is IntentStatus.REJECTED
    assert got.state.reason == "insufficient_margin: simulated"


def test_the_venue_order_id_is_remembered() -> None:
    assert apply_report(state(), rep("accepted")).state.order_id == "ord-int-ACC-1"


def test_a_fill_reported_without_a_price_is_refused_by_the_model() -> None:
    with pytest.raises(ValidationError, match="needs"):
        ExecutionReport.model_validate(
            {**rep("filled", "0.50").model_dump(), "last_price": None, "avg_price": None}
        )


# --- properties ---------------------------------------------------------------------------------

report_statuses = st.sampled_from(list(ReportStatus))
fills = st.integers(min_value=0, max_value=80).map(lambda k: str(Decimal(k) / 100))
reports = st.builds(
    lambda status, filled, n, cents: rep(status, filled, n=n, price=f"1.{cents:04d}"),
    report_statuses,
    fills,
    st.integers(min_value=1, max_value=6),  # a small id pool so duplicates happen
    st.integers(min_value=0, max_value=9999),
)
start_states = st.sampled_from(list(IntentStatus)).map(state)


@settings(max_examples=150, deadline=None)
@given(start=start_states, history=st.lists(reports, max_size=6), report=reports)
def test_applying_the_same_report_twice_equals_applying_it_once(
    start: IntentState, history: list[ExecutionReport], report: ExecutionReport
) -> None:
    s = start
    for r in history:
        s = apply_report(s, r).state

    once = apply_report(s, report)
    twice = apply_report(once.state, report)

    assert twice.state == once.state
    assert twice.outcome is ReportOutcome.DUPLICATE
    assert twice.fill_delta == 0


@settings(max_examples=150, deadline=None)
@given(start=start_states, history=st.lists(reports, max_size=12))
def test_filled_quantity_never_decreases_over_any_sequence_of_reports(
    start: IntentState, history: list[ExecutionReport]
) -> None:
    s = start
    for r in history:
        got = apply_report(s, r)
        assert got.state.filled >= s.filled
        assert got.state.notional >= s.notional
        assert got.state.filled - s.filled == got.fill_delta
        s = got.state


@settings(max_examples=150, deadline=None)
@given(start=start_states, history=st.lists(reports, max_size=12))
def test_once_terminal_an_intent_stays_in_the_same_terminal_state(
    start: IntentState, history: list[ExecutionReport]
) -> None:
    s = start
    terminal_at: IntentStatus | None = None
    for r in history:
        s = apply_report(s, r).state
        if terminal_at is None and s.terminal:
            terminal_at = s.status
        if terminal_at is not None:
            assert s.status is terminal_at


# --- a signal's aggregate status and result -------------------------------------------------------

ACCOUNTS = ("ACC-1", "ACC-2", "ACC-3")


def signal_state(
    statuses: dict[str, tuple[IntentStatus, str, str]] | None = None,
    status: ResultStatus = ResultStatus.EXECUTING,
    quantity: str = "1.00",
    reason: str = "",
) -> SignalState:
    """A planned signal (equal split over three accounts) with intents at given fills/prices."""
    sig = f.signal(quantity=quantity)
    plan = plan_signal(sig, {a: f.account(a) for a in ACCOUNTS}, f.config(), PlanContext())
    intents = []
    for a in plan.allocations:
        st_, filled, price = (statuses or {}).get(a.account_id, (IntentStatus.RELEASED, "0", "0"))
        intents.append(
            IntentState(
                intent=intent(a.account_id, str(a.quantity)),
                status=st_,
                filled=Decimal(filled),
                notional=Decimal(filled) * Decimal(price),
                reason="rejected: other" if st_ is IntentStatus.REJECTED else None,
            )
        )
    return SignalState(signal=sig, plan=plan, status=status, intents=tuple(intents), reason=reason)


FILLED, REJECTED, RELEASED = IntentStatus.FILLED, IntentStatus.REJECTED, IntentStatus.RELEASED


@pytest.mark.parametrize(
    ("intents", "expected"),
    [
        (
            {
                a: (FILLED, q, "1.1")
                for a, q in zip(ACCOUNTS, ("0.34", "0.33", "0.33"), strict=True)
            },
            ResultStatus.COMPLETED,
        ),
        (
            {
                "ACC-1": (FILLED, "0.34", "1.1"),
                "ACC-2": (REJECTED, "0", "0"),
                "ACC-3": (REJECTED, "0", "0"),
            },
            ResultStatus.PARTIALLY_COMPLETED,
        ),
        (
            {
                "ACC-1": (IntentStatus.CANCELLED, "0.10", "1.1"),
                "ACC-2": (REJECTED, "0", "0"),
                "ACC-3": (IntentStatus.EXPIRED, "0", "0"),
            },
            ResultStatus.PARTIALLY_COMPLETED,
        ),
        (dict.fromkeys(ACCOUNTS, (REJECTED, "0", "0")), ResultStatus.FAILED),
        (
            {
                "ACC-1": (FILLED, "0.34", "1.1"),
                "ACC-2": (FILLED, "0.33", "1.1"),
                "ACC-3": (IntentStatus.PARTIALLY_FILLED, "0.10", "1.1"),
            },
            ResultStatus.EXECUTING,
        ),
        ({}, ResultStatus.EXECUTING),
    ],
    ids=["all-filled", "one-filled", "partial-then-cancel", "none-filled", "one-open", "all-open"],
)
def test_aggregate_status_follows_the_intents(
    intents: dict[str, tuple[IntentStatus, str, str]], expected: ResultStatus
) -> None:
    assert aggregate_status(signal_state(intents))[0] is expected


def test_aggregate_reason_names_the_fill_and_the_failures() -> None:
    done = {a: (FILLED, q, "1.1") for a, q in zip(ACCOUNTS, ("0.34", "0.33", "0.33"), strict=True)}
    failed = dict.fromkeys(ACCOUNTS, (REJECTED, "0", "0"))

    assert aggregate_status(signal_state(done))[1] == "filled 1.00 of 1.00"
    assert aggregate_status(signal_state(failed))[1] == "rejected: other"


def test_a_rejected_signal_without_intents_stays_rejected() -> None:
    sig = f.signal()
    plan = plan_signal(sig, {}, f.config(), PlanContext())
    st_ = SignalState(signal=sig, plan=plan, status=ResultStatus.REJECTED, reason="why")

    assert aggregate_status(st_) == (ResultStatus.REJECTED, "why")


def test_a_cancelled_signal_is_executing_until_its_orders_are_terminal() -> None:
    pending = dict.fromkeys(ACCOUNTS, (IntentStatus.CANCEL_REQUESTED, "0", "0"))
    done = dict.fromkeys(ACCOUNTS, (IntentStatus.CANCELLED, "0", "0"))

    assert aggregate_status(signal_state(pending, ResultStatus.CANCELLED))[0] is (
        ResultStatus.EXECUTING
    )
    assert aggregate_status(signal_state(done, ResultStatus.CANCELLED, reason="ops")) == (
        ResultStatus.CANCELLED,
        "ops",
    )


def test_build_result_has_one_line_per_account_in_id_order() -> None:
    s = signal_state(
        {
            "ACC-2": (FILLED, "0.33", "1.2000"),
            "ACC-1": (IntentStatus.PARTIALLY_FILLED, "0.10", "1.1"),
        }
    )

    result = build_result(s, 4, f.NOW)

    assert [ln.account_id for ln in result.lines] == ["ACC-1", "ACC-2", "ACC-3"]
    assert [ln.requested for ln in result.lines] == [Decimal(x) for x in ("0.34", "0.33", "0.33")]
    assert [ln.filled for ln in result.lines] == [Decimal(x) for x in ("0.10", "0.33", "0")]
    assert [ln.status for ln in result.lines] == ["partially_filled", "filled", "released"]
    assert [ln.avg_price for ln in result.lines] == [Decimal("1.1"), Decimal("1.2"), None]
    assert [ln.attempts for ln in result.lines] == [1, 1, 1]
    assert (result.seq, result.updated_at, result.signal_id) == (4, f.NOW, "sig-1")


def test_build_result_average_price_is_weighted_by_quantity_across_intents() -> None:
    s = signal_state({"ACC-1": (FILLED, "0.30", "1.1000"), "ACC-2": (FILLED, "0.10", "1.2000")})

    result = build_result(s, 1, f.NOW)

    # (0.30 * 1.1 + 0.10 * 1.2) / 0.40 = 1.125, not the plain mean 1.15
    assert result.avg_price == Decimal("1.12500000")
    assert result.filled_total == Decimal("0.40")
    assert result.requested_total == Decimal("1.00")


def test_build_result_merges_several_intents_of_one_account_into_one_line() -> None:
    s = signal_state({"ACC-1": (REJECTED, "0.10", "1.0000")})
    retry = IntentState(
        intent=intent("ACC-1", "0.24", intent_id="int-ACC-1-2", kind="retry", attempt=2),
        status=FILLED,
        filled=Decimal("0.24"),
        notional=Decimal("0.24") * Decimal("1.1700"),
    )
    s = s.model_copy(update={"intents": (*s.intents, retry)})

    [line, *_] = build_result(s, 1, f.NOW).lines

    assert line.attempts == 2
    assert line.filled == Decimal("0.34")
    assert line.requested == Decimal("0.58")
    assert line.status == "filled"
    assert line.avg_price == Decimal("1.12000000")  # (0.10 * 1.00 + 0.24 * 1.17) / 0.34


def test_build_result_does_not_count_cancel_intents_as_requested() -> None:
    s = signal_state()
    cancel = IntentState(
        intent=intent("ACC-1", "0.34", intent_id="int-ACC-1-c", kind=IntentKind.CANCEL),
        status=IntentStatus.CANCELLED,
    )
    s = s.model_copy(update={"intents": (*s.intents, cancel)})

    assert build_result(s, 1, f.NOW).lines[0].requested == Decimal("0.34")


def test_build_result_of_a_rejected_plan_reports_the_requested_quantity() -> None:
    sig = f.signal(quantity="2.50")
    plan = plan_signal(sig, {}, f.config(), PlanContext())
    s = SignalState(signal=sig, plan=plan, status=ResultStatus.REJECTED, reason="NO_ELIGIBLE")

    result = build_result(s, 1, f.NOW)

    assert result.lines == ()
    assert result.requested_total == Decimal("2.50")
    assert result.filled_total == 0
    assert result.avg_price is None
    assert (result.status, result.reason) == (ResultStatus.REJECTED, "NO_ELIGIBLE")
