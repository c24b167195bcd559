"""The intent state machine, pair by pair: every (state, trigger), allowed and not.

`MATRIX` below is a second, independent writing of the table's targets (a reviewer reads it as a
grid); the tests check the code's table against it, then check `step` against the table for
every pair, with its effects and timers, and finally check the rules that make the table safe
(terminal states absorb, no edge goes backwards, a cancel is always possible, silence escalates).
"""

from __future__ import annotations

import itertools
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from orch_worker.domain.coordinator import (
    OPEN,
    TERMINAL,
    TRANSITIONS,
    CancelPurpose,
    Effect,
    IntentEvent,
    IntentState,
    IntentStatus,
    InvalidTransitionError,
    ReportOutcome,
    Timing,
    Trigger,
    report_trigger,
    step,
    transition,
)
from orch_worker.domain.models import OrderIntent, ReportStatus
from tests import factories as f

S, T, E = IntentStatus, Trigger, Effect

COLUMNS = (
    T.RELEASE,
    T.ACCEPTED,
    T.PARTIAL_FILL,
    T.PARTIAL_FILL_ENOUGH,
    T.FILL,
    T.REJECT,
    T.CANCEL_CONFIRMED,
    T.EXPIRED,
    T.TIMEOUT,
    T.CANCEL,
    T.CANCEL_REFUSED,
    T.RESOLVED,
)
MATRIX = """
                 rel  acc  part enuf fill rej  cxl  exp  tmo  cncl refu reso
scheduled        REL  .    .    .    .    .    .    EXP  .    CXD  .    .
released         .    ACC  PF   CRQ  FIL  REJ  CXD  EXP  UNK  CRQ  .    .
accepted         .    ACC  PF   CRQ  FIL  REJ  CXD  EXP  CRQ  CRQ  .    .
partially_filled .    PF   PF   CRQ  FIL  REJ  CXD  EXP  CRQ  CRQ  .    .
cancel_requested .    CRQ  CRQ  CRQ  FIL  REJ  CXD  EXP  UNK  CRQ  CRQ  .
unknown          .    ACC  PF   CRQ  FIL  REJ  CXD  EXP  .    FLD  UNK  FLD
filled           .    .    .    .    .    .    .    .    .    .    .    .
cancelled        .    .    .    .    .    .    .    .    .    .    .    .
rejected         .    .    .    .    .    .    .    .    .    .    .    .
expired          .    .    .    .    .    .    .    .    .    .    .    .
failed           .    .    .    .    .    .    .    .    .    .    .    .
"""
"""Rows are states, columns the triggers in `COLUMNS` order; `.` = not allowed (a counted
no-op)."""

SHORT = {
    "REL": S.RELEASED,
    "ACC": S.ACCEPTED,
    "PF": S.PARTIALLY_FILLED,
    "CRQ": S.CANCEL_REQUESTED,
    "FIL": S.FILLED,
    "REJ": S.REJECTED,
    "CXD": S.CANCELLED,
    "EXP": S.EXPIRED,
    "UNK": S.UNKNOWN,
    "FLD": S.FAILED,
}


def _matrix() -> dict[tuple[IntentStatus, Trigger], IntentStatus]:
    rows = [line.split() for line in MATRIX.strip().splitlines()[1:]]
    out: dict[tuple[IntentStatus, Trigger], IntentStatus] = {}
    for state_name, *cells in rows:
        assert len(cells) == len(COLUMNS), state_name
        for trigger, cell in zip(COLUMNS, cells, strict=True):
            if cell != ".":
                out[IntentStatus(state_name), trigger] = SHORT[cell]
    return out


EXPECTED = _matrix()
ALL_PAIRS = list(itertools.product(IntentStatus, Trigger))
TIMING = Timing(ack_timeout_s=5, completion_timeout_s=30)
REPORT_OF = {
    T.ACCEPTED: ("accepted", "0"),
    T.PARTIAL_FILL: ("partially_filled", "0.10"),
    T.PARTIAL_FILL_ENOUGH: ("partially_filled", "0.45"),
    T.FILL: ("filled", "0.50"),
    T.REJECT: ("rejected", "0"),
    T.CANCEL_CONFIRMED: ("cancelled", "0"),
    T.EXPIRED: ("expired", "0"),
    T.CANCEL_REFUSED: ("rejected", "0"),
}


def intent(**kw: Any) -> OrderIntent:
    return OrderIntent.model_validate(
        {
            "intent_id": "int-1",
            "plan_id": "plan-1",
            "signal_id": "sig-1",
            "portfolio": "demo",
            "account_id": "ACC-1",
            "broker": "paper",
            "symbol": "EURUSD",
            "side": "buy",
            "order_type": "limit",
            "limit_price": "1.1000",
            "quantity": "0.50",
            "scheduled_at": f.NOW,
            "released_at": f.NOW,
            "rationale": "test",
            **kw,
        }
    )


def state(status: IntentStatus, **kw: Any) -> IntentState:
    return IntentState(intent=intent(), status=status, deadline=f.NOW + timedelta(seconds=99), **kw)


def event(trigger: Trigger, **kw: Any) -> IntentEvent:
    report = None
    if trigger in REPORT_OF:
        status, filled = REPORT_OF[trigger]
        report = f.report(
            "int-1", "ACC-1", status, filled, reason_code="other" if status == "rejected" else None
        )
    return IntentEvent(trigger, f.NOW, report, **kw)


def test_the_code_table_is_the_reviewed_matrix() -> None:
    assert {pair: target for pair, (target, _) in TRANSITIONS.items()} == EXPECTED


@pytest.mark.parametrize(
    ("status", "trigger"), ALL_PAIRS, ids=[f"{s.value}-{t.value}" for s, t in ALL_PAIRS]
)
def test_every_state_and_trigger_pair_is_applied_or_refused_as_the_table_says(
    status: IntentStatus, trigger: Trigger
) -> None:
    before = state(status)

    got = step(before, event(trigger), TIMING)

    if status in TERMINAL:
        assert got.outcome is ReportOutcome.LATE
        assert got.state.status is status
        assert got.effects == ()
        with pytest.raises(InvalidTransitionError, match=f"{status.value.upper()} -> "):
            transition(status, trigger)
    elif (status, trigger) in TRANSITIONS:
        target, effects = TRANSITIONS[status, trigger]
        assert got.outcome is ReportOutcome.APPLIED
        assert (got.state.status, got.effects) == (target, effects)
        assert transition(status, trigger) == (target, effects)
    else:
        assert got.outcome is ReportOutcome.OUT_OF_ORDER
        assert got.state.status is status
        assert got.effects == ()
        assert got.state.deadline == before.deadline
        with pytest.raises(
            InvalidTransitionError,
            match=f"{status.value.upper()} -> {trigger.value.upper()}",
        ):
            transition(status, trigger)


@pytest.mark.parametrize(
    ("pair", "row"), list(TRANSITIONS.items()), ids=[f"{s.value}-{t.value}" for s, t in TRANSITIONS]
)
def test_timers_are_armed_kept_or_cleared_by_each_row(
    pair: tuple[IntentStatus, Trigger], row: tuple[IntentStatus, tuple[Effect, ...]]
) -> None:
    target, effects = row

    got = step(state(pair[0]), event(pair[1]), TIMING)

    if target in TERMINAL or target is S.UNKNOWN:
        assert got.state.deadline is None
    elif E.ARM_ACK_TIMER in effects:
        assert got.state.deadline == f.NOW + timedelta(seconds=5)
    elif E.ARM_COMPLETION_TIMER in effects:
        assert got.state.deadline == f.NOW + timedelta(seconds=30)
    else:  # e.g. a partial fill does not restart the completion clock
        assert got.state.deadline == f.NOW + timedelta(seconds=99)


# --- the rules that make the table safe -----------------------------------------------------------

PROGRESS = {
    S.SCHEDULED: 0,
    S.RELEASED: 1,
    S.ACCEPTED: 2,
    S.PARTIALLY_FILLED: 3,
    S.CANCEL_REQUESTED: 3,
    **dict.fromkeys(TERMINAL, 4),
}


def test_no_row_leaves_a_terminal_state() -> None:
    assert not [pair for pair in TRANSITIONS if pair[0] in TERMINAL]


ROWS = list(TRANSITIONS.items())
ROW_IDS = [f"{s.value}-{t.value}" for s, t in TRANSITIONS]


@pytest.mark.parametrize(("pair", "row"), ROWS, ids=ROW_IDS)
def test_no_row_moves_an_order_backwards(
    pair: tuple[IntentStatus, Trigger], row: tuple[IntentStatus, tuple[Effect, ...]]
) -> None:
    # e.g. a late accept after a partial fill must not step back to accepted. `unknown` is off
    # the line: knowledge lost by a timeout (escalated), regained by any report.
    if S.UNKNOWN not in (pair[0], row[0]):
        assert PROGRESS[row[0]] >= PROGRESS[pair[0]]


@pytest.mark.parametrize("status", sorted(OPEN))
def test_every_open_state_can_be_cancelled(status: IntentStatus) -> None:
    assert (status, T.CANCEL) in TRANSITIONS


@pytest.mark.parametrize(
    "status", [S.RELEASED, S.ACCEPTED, S.PARTIALLY_FILLED, S.CANCEL_REQUESTED, S.UNKNOWN]
)
@pytest.mark.parametrize("trigger", [T.FILL, T.REJECT, T.CANCEL_CONFIRMED, T.EXPIRED])
def test_a_final_venue_report_ends_every_order_at_the_venue(
    status: IntentStatus, trigger: Trigger
) -> None:
    assert TRANSITIONS[status, trigger][0] in TERMINAL


def test_every_row_entering_cancel_requested_sends_a_cancel_and_arms_its_timer() -> None:
    for (before, _), (target, effects) in TRANSITIONS.items():
        if target is S.CANCEL_REQUESTED and before is not S.CANCEL_REQUESTED:
            assert {E.SEND_CANCEL, E.ARM_ACK_TIMER} <= set(effects), before


def test_silence_is_escalated_never_resent() -> None:
    for (before, trigger), (target, effects) in TRANSITIONS.items():
        if target is S.UNKNOWN and before is not S.UNKNOWN:
            assert trigger is T.TIMEOUT
            assert effects == (E.ESCALATE,)
        assert E.PUBLISH not in effects or (before, trigger) == (S.SCHEDULED, T.RELEASE)


def test_any_word_from_the_venue_settles_an_unknown_outcome() -> None:
    for (before, trigger), (target, effects) in TRANSITIONS.items():
        if before is S.UNKNOWN and target is not S.UNKNOWN and trigger is not T.RESOLVED:
            assert E.SETTLE_ESCALATION in effects, trigger


def test_a_reject_recovers_unless_we_were_already_cancelling() -> None:
    for (before, trigger), (_, effects) in TRANSITIONS.items():
        if trigger is T.REJECT:
            expected = E.FOLLOW_UP if before is S.CANCEL_REQUESTED else E.RECOVER
            assert expected in effects, before


# --- triggers from reports ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order_type", "filled", "expected"),
    [
        ("limit", "0.40", T.PARTIAL_FILL_ENOUGH),  # 80% of 0.50
        ("limit", "0.39", T.PARTIAL_FILL),
        ("market", "0.45", T.PARTIAL_FILL),  # a market order's rest fills at once
    ],
)
def test_a_partial_fill_at_the_threshold_of_a_limit_order_is_enough(
    order_type: str, filled: str, expected: Trigger
) -> None:
    kw: dict[str, Any] = {"order_type": order_type}
    if order_type == "market":
        kw["limit_price"] = None
    it = IntentState(intent=intent(**kw), status=S.ACCEPTED)
    report = f.report("int-1", "ACC-1", "partially_filled", filled)

    assert report_trigger(it, report, 0.8) is expected
    assert report_trigger(it, report, None) is T.PARTIAL_FILL


def test_a_cancel_row_remembers_why_the_cancel_was_sent() -> None:
    got = step(
        state(S.PARTIALLY_FILLED),
        IntentEvent(T.TIMEOUT, f.NOW, purpose=CancelPurpose.COMPLETE, reason="slow"),
        TIMING,
    )

    assert got.state.cancel_purpose is CancelPurpose.COMPLETE
    assert step(state(S.ACCEPTED), event(T.CANCEL), TIMING).state.cancel_purpose is (
        CancelPurpose.OPERATOR
    )


def test_a_refused_cancel_adds_its_report_id_but_no_fill_and_keeps_the_order_reason() -> None:
    before = state(S.CANCEL_REQUESTED, filled=Decimal("0.10"), reason="why")

    got = step(before, event(T.CANCEL_REFUSED), TIMING)

    assert got.state.filled == Decimal("0.10")
    assert got.state.reason == "why"
    assert len(got.state.report_ids) == 1
    assert step(got.state, event(T.CANCEL_REFUSED), TIMING).outcome is ReportOutcome.DUPLICATE


def test_timeout_reason_is_recorded_on_the_intent() -> None:
    got = step(state(S.RELEASED), IntentEvent(T.TIMEOUT, f.NOW, reason="no ack"), TIMING)

    assert (got.state.status, got.state.reason) == (S.UNKNOWN, "no ack")


def test_report_status_values_all_map_to_a_trigger() -> None:
    from orch_worker.domain.coordinator import REPORT_TRIGGERS

    assert set(REPORT_TRIGGERS) == set(ReportStatus)
