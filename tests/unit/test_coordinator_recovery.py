"""Failure recovery (AC5) through the decider: each reject reason's path, the circuit breaker,
unknown outcomes, and interventions resolved by a control command or by their timeout."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from orch_worker.domain import ids
from orch_worker.domain.audit import verify_chain
from orch_worker.domain.coordinator import IntentStatus
from orch_worker.domain.decider import next_wake
from orch_worker.domain.models import IntentKind, Intervention, ResultStatus
from orch_worker.domain.recovery import backoff_s
from tests import factories as f
from tests.unit.execution_helpers import Run, config

FAST = {"retry_base_s": 1, "retry_cap_s": 8, "ack_timeout_s": 10, "intervention_timeout_s": 60}


def planned(**portfolio: Any) -> Run:
    run = Run(config(**{"execution": FAST, **portfolio}))
    run.signal()
    return run


# --- transient rejects: same account, exponential backoff with full jitter ---------------------


@pytest.mark.parametrize("code", ["connection_error", "timeout", "rate_limited"])
def test_a_transient_reject_is_retried_on_the_same_account_after_a_seeded_backoff(
    code: str,
) -> None:
    run = planned()
    first = run.last("ACC-1")

    d = run.at(1).report(first, "rejected", code=code)

    assert d.intents == ()  # waits for its backoff
    retry = run.last("ACC-1")
    assert retry.status is IntentStatus.SCHEDULED
    assert (retry.intent.kind, retry.intent.attempt) == (IntentKind.RETRY, 2)
    assert retry.intent.parent_intent_id == first.intent.intent_id
    assert retry.intent.intent_id == ids.intent_id("sig-1", "ACC-1", 2, "retry")
    delay = backoff_s("sig-1", "ACC-1", 1, 1, 8)
    assert retry.intent.scheduled_at == run.now + timedelta(seconds=delay)
    assert next_wake(run.st(), run.cfg) == retry.intent.scheduled_at
    [scheduled] = run.of_type("intent_scheduled")
    assert scheduled.data["recovery"] == code
    assert "full jitter" in scheduled.rationale

    d = run.wake()

    assert [(i.account_id, i.kind.value, i.attempt) for i in d.intents] == [("ACC-1", "retry", 2)]


def test_transient_retries_are_bounded_then_given_up_with_the_reason() -> None:
    run = planned(execution={**FAST, "retry_max_attempts": 2})
    for _ in range(3):
        run.report(run.last("ACC-1"), "rejected", code="timeout")
        if run.last("ACC-1").status is IntentStatus.SCHEDULED:
            run.wake()

    kinds = [i.intent.kind.value for i in run.on("ACC-1")]
    assert kinds == ["initial", "retry", "retry"]
    [gave_up] = run.of_type("recovery_gave_up")
    assert gave_up.data["reason"].startswith("RETRIES_EXHAUSTED: 2 retries")


def test_backoff_doubles_per_retry_within_the_cap() -> None:
    run = planned(execution={**FAST, "retry_max_attempts": 3})
    delays = []
    for n in (1, 2, 3):
        run.report(run.last("ACC-1"), "rejected", code="rate_limited")
        scheduled = run.last("ACC-1").intent.scheduled_at
        delays.append((scheduled - run.now).total_seconds())
        assert delays[-1] == pytest.approx(backoff_s("sig-1", "ACC-1", n, 1, 8), abs=1e-6)
        assert delays[-1] <= min(8, 2 ** (n - 1))
        run.wake()


# --- insufficient margin: reduce and retry, bounded ---------------------------------------------


def test_insufficient_margin_retries_a_reduced_order_at_once() -> None:
    run = planned()
    first = run.last("ACC-2")  # 0.33

    d = run.at(1).report(first, "rejected", code="insufficient_margin")

    [reduced] = d.intents
    assert (reduced.kind, reduced.account_id, reduced.attempt) == (IntentKind.REDUCED, "ACC-2", 2)
    assert reduced.quantity == Decimal("0.23")  # 0.7 x 0.33 rounded down to the lot
    assert reduced.parent_intent_id == first.intent.intent_id


def test_reductions_are_bounded_and_stop_below_the_minimum_quantity() -> None:
    run = planned(execution={**FAST, "max_reduce_attempts": 5})
    sizes = []
    for _ in range(12):
        d = run.report(run.last("ACC-1"), "rejected", code="insufficient_margin")
        if not d.intents:
            break
        sizes.append(str(d.intents[0].quantity))

    assert sizes == ["0.23", "0.16", "0.11", "0.07", "0.04"]
    [gave_up] = run.of_type("recovery_gave_up")
    assert gave_up.data["reason"].startswith("REDUCE_EXHAUSTED")


def test_a_reduced_fill_leaves_the_signal_partially_completed_with_honest_lines() -> None:
    run = planned()
    for it in run.intents():
        if it.intent.account_id != "ACC-1":
            run.report(it, "filled", str(it.intent.quantity))
    run.report(run.last("ACC-1"), "rejected", code="insufficient_margin")
    reduced = run.last("ACC-1")

    run.report(reduced, "filled", str(reduced.intent.quantity))

    assert run.status() is ResultStatus.PARTIALLY_COMPLETED
    line = next(ln for ln in run.decisions[-1].results[-1].lines if ln.account_id == "ACC-1")
    assert (line.requested, line.filled, line.attempts) == (
        Decimal("0.23"),
        Decimal("0.23"),
        2,
    )


# --- account suspended: rest the account, reroute ---------------------------------------------


def test_a_suspended_account_rests_for_the_cooldown_and_its_order_is_rerouted() -> None:
    run = planned(max_accounts=2)
    [alternative] = run.st().plan.alternatives
    first = run.last("ACC-1")

    d = run.at(1).report(first, "rejected", code="account_suspended")

    [reroute] = d.intents
    assert (reroute.kind, reroute.account_id) == (IntentKind.REROUTE, alternative)
    assert reroute.quantity == first.intent.quantity
    assert run.pf.account_health["ACC-1"].suspended_until == run.now + timedelta(hours=24)
    [started] = run.of_type("account_cooldown_started")
    assert started.account_id == "ACC-1"

    # the next signal plans without it, and records why
    d = run.at(2).signal(f.signal("sig-2"))
    assert "ACC-1" not in {i.account_id for i in d.intents}
    plan = run.st("sig-2").plan
    assert [e.reasons for e in plan.exclusions if e.account_id == "ACC-1"] != []

    # a day later it plans again, and the end of its cooldown is audited
    d = run.at(86_402).signal(f.signal("sig-3", at=run.now))
    assert "ACC-1" in {i.account_id for i in d.intents}
    assert "account_cooldown_ended" in [e.type for e in d.audit]


def test_a_suspended_account_without_an_alternative_gives_up_with_the_reason() -> None:
    run = planned()  # every account allocated

    run.report(run.last("ACC-1"), "rejected", code="account_suspended")

    [gave_up] = run.of_type("recovery_gave_up")
    assert gave_up.data["reason"].startswith("NO_ALTERNATIVE")


# --- market closed: next session, or expired -------------------------------------------------


def test_market_closed_waits_for_the_next_session_in_the_calendar() -> None:
    run = planned(instrument={"sessions": ("Mon-Fri 13:00-17:00",)})  # NOW is a Saturday noon

    run.report(run.last("ACC-1"), "rejected", code="market_closed")

    retry = run.last("ACC-1")
    assert retry.status is IntentStatus.SCHEDULED
    monday = f.NOW.replace(hour=13) + timedelta(days=2)
    assert retry.intent.scheduled_at == monday
    assert retry.recovery == "market_closed"


def test_market_closed_expires_when_the_signal_expires_before_the_next_session() -> None:
    run = Run(config(execution=FAST, instrument={"sessions": ("Mon-Fri 13:00-17:00",)}))
    run.signal(f.signal(expires_at=f.NOW + timedelta(hours=1)))
    for it in run.intents():
        run.report(it, "rejected", code="market_closed")

    assert run.status() is ResultStatus.EXPIRED
    expired = run.of_type("intent_expired")
    assert len(expired) == 3
    assert "after the signal expires" in expired[0].rationale
    assert all(i.intent.kind is IntentKind.RETRY for i in run.intents() if i.recovery)


def test_market_closed_without_a_calendar_is_not_retried() -> None:
    run = planned()

    run.report(run.last("ACC-1"), "rejected", code="market_closed")

    [gave_up] = run.of_type("recovery_gave_up")
    assert gave_up.data["reason"] == "MARKET_CLOSED: no session calendar for EURUSD"


# --- invalid stops: adjust once --------------------------------------------------------------


def test_invalid_stops_are_moved_to_the_minimum_distance_once_then_given_up() -> None:
    run = planned(instrument={"min_stop_distance": Decimal("0.0100")})
    first = run.last("ACC-1")  # 0.34, stop 50 pips below 1.1000

    d = run.report(first, "rejected", code="invalid_stops")

    [retry] = d.intents
    assert retry.stop_loss == Decimal("1.0900")
    assert retry.quantity == Decimal("0.17")  # half the size at twice the stop distance
    run.report(retry, "rejected", code="invalid_stops")
    [gave_up] = run.of_type("recovery_gave_up")
    assert gave_up.data["reason"].startswith("INVALID_STOPS: adjusted once already")


def test_invalid_stops_without_a_minimum_distance_give_up() -> None:
    run = planned()

    run.report(run.last("ACC-1"), "rejected", code="invalid_stops")

    assert run.of_type("recovery_gave_up")[0].data["reason"].startswith("INVALID_STOPS")


# --- invalid symbol / other: escalate --------------------------------------------------------


@pytest.mark.parametrize("code", ["invalid_symbol", "other"])
def test_an_unrecoverable_reject_escalates_and_holds_the_signal_open(code: str) -> None:
    run = planned()
    for it in run.intents()[1:]:
        run.report(it, "filled", str(it.intent.quantity))

    d = run.report(run.last("ACC-1"), "rejected", code=code)

    [iv] = d.interventions
    assert (iv.reason_code, iv.account_id, iv.signal_id) == (code, "ACC-1", "sig-1")
    assert iv.default_action.value == "accept_partial"
    assert iv.timeout_at == run.now + timedelta(seconds=60)
    assert run.status() is ResultStatus.EXECUTING  # a retry may still come
    assert next_wake(run.st(), run.cfg) == iv.timeout_at


def escalated() -> tuple[Run, Intervention]:
    run = planned(max_accounts=2)
    for it in run.intents()[1:]:
        run.report(it, "filled", str(it.intent.quantity))
    [iv] = run.report(run.last("ACC-1"), "rejected", code="other").interventions
    return run, iv


def test_resolve_retry_sends_the_order_again_with_a_new_id() -> None:
    run, iv = escalated()

    d = run.resolve(iv, "retry")

    assert d.outcome == "applied"
    [retry] = d.intents
    assert (retry.kind, retry.account_id, retry.attempt) == (IntentKind.RETRY, "ACC-1", 2)
    assert [e.type for e in d.audit][:2] == ["control_applied", "intervention_resolved"]
    run.report(retry, "filled", str(retry.quantity))
    assert run.status() is ResultStatus.COMPLETED


def test_resolve_reroute_to_a_named_account_rechecks_it() -> None:
    run, iv = escalated()
    [alternative] = run.st().plan.alternatives

    d = run.resolve(iv, "reroute", reroute_account_id=alternative)

    [reroute] = d.intents
    assert (reroute.kind, reroute.account_id) == (IntentKind.REROUTE, alternative)


def test_a_reroute_no_account_can_take_is_refused_and_the_intervention_stays_open() -> None:
    run, iv = escalated()
    [alternative] = run.st().plan.alternatives
    run.accounts[alternative] = f.account(alternative, margin_available="1")

    d = run.resolve(iv, "reroute")

    assert d.outcome == "refused"
    assert "INSUFFICIENT_MARGIN" in d.audit[0].rationale
    assert run.st().open_interventions


def test_resolve_accept_partial_ends_the_signal_on_what_filled() -> None:
    run, iv = escalated()

    run.resolve(iv, "accept_partial")

    assert run.status() is ResultStatus.PARTIALLY_COMPLETED


def test_resolve_cancel_cancels_the_signal() -> None:
    run = planned()
    [iv] = run.report(run.last("ACC-1"), "rejected", code="other").interventions

    d = run.resolve(iv, "cancel")

    assert len(d.intents) == 2  # cancels for the two open orders
    assert all(i.kind is IntentKind.CANCEL for i in d.intents)
    for it in run.intents()[1:]:
        run.report(it, "cancelled")
    assert run.status() is ResultStatus.CANCELLED


def test_a_resolution_twice_or_with_an_action_not_offered_changes_nothing() -> None:
    run, iv = escalated()
    run.resolve(iv, "accept_partial")
    before = run.pf

    again = run.resolve(iv, "retry", command_id="c-2")
    same = run.resolve(iv, "accept_partial")

    assert again.outcome == "no_op"
    assert again.intents == ()
    assert same.outcome == "duplicate"
    assert run.st().intents == before.signals["sig-1"].intents


def test_an_unknown_intervention_is_an_unknown_target() -> None:
    run = planned()

    d = run.control("c-1", "resolve_intervention", intervention_id="nope", action="retry")

    assert d.outcome == "unknown_target"


def test_an_unresolved_intervention_takes_its_default_at_the_timeout() -> None:
    run, iv = escalated()

    d = run.wake()

    assert run.status() is ResultStatus.PARTIALLY_COMPLETED
    [resolved] = [e for e in d.audit if e.type == "intervention_resolved"]
    assert resolved.data == {
        "intervention_id": iv.intervention_id,
        "reason_code": "other",
        "action": "accept_partial",
        "resolved_by": "timeout",
        "note": "accept_partial",
    }


def test_a_default_that_cannot_be_carried_out_falls_back_to_accept_partial() -> None:
    run = planned(execution={**FAST, "intervention_default_action": "reroute"})  # no alternatives
    [iv] = run.report(run.last("ACC-1"), "rejected", code="other").interventions
    for it in run.intents()[1:3]:
        run.report(it, "filled", str(it.intent.quantity))

    d = run.wake()

    [resolved] = [e for e in d.audit if e.type == "intervention_resolved"]
    assert resolved.data["action"] == "accept_partial"
    assert "default reroute not possible" in resolved.data["note"]
    assert iv.default_action.value == "reroute"
    assert run.status() is ResultStatus.PARTIALLY_COMPLETED


# --- unknown outcome: never re-sent blindly ----------------------------------------------------


def test_no_report_within_the_ack_timeout_escalates_and_sends_nothing() -> None:
    run = planned()
    first = run.last("ACC-1")
    assert first.deadline == run.now + timedelta(seconds=10)

    d = run.at(10).due()

    assert d.intents == ()
    assert {i.reason_code for i in d.interventions} == {"unknown_outcome"}
    assert run.last("ACC-1").status is IntentStatus.UNKNOWN
    assert run.status() is ResultStatus.EXECUTING


def test_a_timeout_that_ran_out_while_nobody_listened_counts_from_the_restart() -> None:
    run = planned()
    first = run.last("ACC-1")
    assert first.deadline == run.now + timedelta(seconds=10)

    # Down from t=2 to t=50: the fill came at t=3 and waits unread in the backlog.
    d = run.at(50).restart().due()
    assert d.interventions == ()
    assert run.last("ACC-1").status is IntentStatus.RELEASED
    assert next_wake(run.st(), run.cfg, run.listening_since["demo"]) == f.NOW + timedelta(
        seconds=60
    )
    run.at(51).report(first, "filled", "0.33")
    assert run.last("ACC-1").status is IntentStatus.FILLED


def test_a_silent_order_is_still_escalated_one_window_after_the_restart() -> None:
    run = planned()
    run.at(50).restart().due()

    d = run.wake()

    assert run.t == 60
    assert {i.reason_code for i in d.interventions} >= {"unknown_outcome"}
    assert run.last("ACC-1").status is IntentStatus.UNKNOWN


def test_a_completion_timeout_after_a_restart_also_waits_a_full_window() -> None:
    run = planned(execution={**FAST, "completion_timeout_s": 20, "partial_fill_threshold": 1.0})
    for account in ("ACC-1", "ACC-2", "ACC-3"):
        run.at(1).report(run.last(account), "partially_filled", "0.10")
    assert run.last("ACC-1").deadline == f.NOW + timedelta(seconds=21)

    run.at(100).restart().due()
    assert run.last("ACC-1").status is IntentStatus.PARTIALLY_FILLED  # nothing cancelled yet

    run.wake()
    assert run.t == 120
    assert run.last("ACC-1").status is IntentStatus.CANCEL_REQUESTED


def test_an_unknown_outcome_timing_out_is_never_retried_on_the_same_account() -> None:
    run = planned(execution={**FAST, "intervention_default_action": "retry"})
    run.at(10).due()

    d = run.wake()

    assert {i.kind for i in d.intents} == {IntentKind.CANCEL}  # a safety cancel, no re-send
    assert [i.intent.kind for i in run.on("ACC-1")] == [IntentKind.INITIAL]
    assert run.last("ACC-1").status is IntentStatus.FAILED
    assert run.status() is ResultStatus.FAILED


def test_an_operator_retry_of_an_unknown_outcome_uses_a_new_id_and_cancels_the_old() -> None:
    run = planned()
    [iv, *_] = run.at(10).due().interventions

    d = run.resolve(iv, "retry")

    kinds = sorted((i.kind.value, i.account_id) for i in d.intents)
    assert kinds == [("cancel", iv.account_id), ("retry", iv.account_id)]
    retry = next(i for i in d.intents if i.kind is IntentKind.RETRY)
    assert retry.intent_id != iv.intent_id


def test_a_late_report_after_the_escalation_settles_it() -> None:
    run = planned()
    run.at(10).due()
    first = run.on("ACC-1")[0]

    d = run.at(11).report(first, "filled", str(first.intent.quantity))

    assert run.last("ACC-1").status is IntentStatus.FILLED
    assert "intervention_resolved" in [e.type for e in d.audit]
    assert not [iv for iv in run.st().open_interventions if iv.intervention.account_id == "ACC-1"]


def test_a_fill_after_the_order_was_given_up_is_counted_flagged_and_escalated() -> None:
    run = planned()
    run.at(10).due()
    run.wake()  # defaults: accept_partial -> failed
    first = run.on("ACC-1")[0]
    assert first.status is IntentStatus.FAILED

    d = run.report(first, "filled", str(first.intent.quantity))

    assert run.on("ACC-1")[0].filled == first.intent.quantity
    assert run.on("ACC-1")[0].status is IntentStatus.FAILED
    assert [e.type for e in d.audit][:3] == [
        "intent_transition",
        "late_fill_detected",
        "intervention_opened",
    ]
    assert [i.reason_code for i in d.interventions] == ["late_fill"]


# --- the circuit breaker -----------------------------------------------------------------------


def test_repeated_failures_open_the_breaker_and_it_closes_after_the_cooldown() -> None:
    exe = {**FAST, "breaker_failures": 3, "breaker_window_s": 60, "breaker_cooldown_s": 120}
    run = Run(config(execution=exe))
    for n in range(3):
        run.at(n).signal(f.signal(f"s-{n}"))
        it = run.last("ACC-1", f"s-{n}")
        run.report(it, "rejected", code="connection_error", signal_id=f"s-{n}")

    [opened] = run.of_type("circuit_opened")
    assert opened.account_id == "ACC-1"
    assert opened.data["until"] == "2026-11-21T12:02:02.000000Z"
    assert "3 failures within 60s" in opened.rationale
    # the third order is not retried into the open breaker (and has nowhere else to go)
    assert run.last("ACC-1", "s-2").status is IntentStatus.REJECTED
    assert run.of_type("recovery_gave_up")[-1].data["reason"].startswith("ACCOUNT_RESTING")

    d = run.at(10).signal(f.signal("s-next"))
    assert "ACC-1" not in {i.account_id for i in d.intents}
    assert run.st("s-next").plan.exclusions[0].account_id == "ACC-1"

    d = run.at(123).signal(f.signal("s-later", at=run.now))
    assert "circuit_closed" in [e.type for e in d.audit]
    assert "ACC-1" in {i.account_id for i in d.intents}
    assert verify_chain(run.audit) is None


def test_recent_failures_lower_the_accounts_planning_score() -> None:
    run = Run(config(max_accounts=2, execution=FAST))
    run.signal()
    run.report(run.last("ACC-1"), "rejected", code="connection_error")

    run.at(1).signal(f.signal("sig-2"))

    [created] = [e for e in run.audit if e.type == "plan_created" and e.signal_id == "sig-2"]
    assert created.data["plan_context"]["health"] == {"ACC-1": 0.8}


# --- control commands stand over recovery ------------------------------------------------------


def test_no_follow_up_is_sent_while_the_portfolio_is_halted() -> None:
    run = planned()
    run.control("c-halt", "halt", portfolio="demo")

    d = run.report(run.last("ACC-1"), "rejected", code="insufficient_margin")

    assert d.intents == ()
    assert run.last("ACC-1").status is IntentStatus.CANCELLED
    assert run.last("ACC-1").intent.kind is IntentKind.REDUCED
    [held] = [e for e in d.audit if e.type == "release_cancelled"]
    assert "HALTED" in held.rationale


def test_no_retry_goes_to_a_paused_account() -> None:
    run = planned()
    run.control("c-pause", "pause_account", account_id="ACC-1")

    run.report(run.last("ACC-1"), "rejected", code="timeout")
    d = run.wake()

    assert d.intents == ()
    assert run.last("ACC-1").status is IntentStatus.CANCELLED
    [held] = [e for e in d.audit if e.type == "release_cancelled"]
    assert "PAUSED: ACC-1" in held.rationale
