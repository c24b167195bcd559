"""Partial fills (AC4): accept at the threshold, else complete the remainder after the completion
timeout by re-pricing, rerouting or accepting the partial, bounded, every attempt a new intent."""

from __future__ import annotations

from decimal import Decimal

from orch_worker.domain import ids
from orch_worker.domain.audit import verify_chain
from orch_worker.domain.coordinator import CancelPurpose, IntentStatus
from orch_worker.domain.models import IntentKind, OrderIntent, ResultStatus
from tests import factories as f
from tests.unit.execution_helpers import Run, config, limit_signal

EXE = {"completion_timeout_s": 30, "ack_timeout_s": 10}


def one_account_limit(**exe: object) -> tuple[Run, OrderIntent]:
    """A limit signal planned on ACC-1 alone (ACC-2, ACC-3 are alternatives), accepted."""
    run = Run(config(max_accounts=1, execution={**EXE, **exe}))
    d = run.signal(limit_signal(quantity="1.00"))
    [it] = d.intents
    assert it.account_id == "ACC-1"
    run.at(1).report(it, "accepted")
    return run, it


def test_a_limit_partial_fill_at_the_threshold_is_accepted_and_the_rest_cancelled() -> None:
    run, it = one_account_limit()

    d = run.at(2).report(it, "partially_filled", "0.85", price="1.1000")

    [cancel] = d.intents
    assert cancel.kind is IntentKind.CANCEL
    assert cancel.parent_intent_id == it.intent_id
    assert cancel.intent_id == ids.intent_id("sig-1", "ACC-1", 1, "cancel")
    state = run.last("ACC-1")
    assert (state.status, state.cancel_purpose) == (
        IntentStatus.CANCEL_REQUESTED,
        CancelPurpose.ACCEPT,
    )
    d = run.at(3).report(it, "cancelled", "0.85", price="1.1000")

    assert d.intents == ()
    assert run.status() is ResultStatus.PARTIALLY_COMPLETED
    [accepted] = run.of_type("partial_accepted")
    assert accepted.data["filled_quantity"] == "0.85"
    assert d.results[-1].filled_total == Decimal("0.85")
    assert verify_chain(run.audit) is None


def test_a_partial_below_the_threshold_waits_for_the_completion_timeout() -> None:
    run, it = one_account_limit()
    run.at(2).report(it, "partially_filled", "0.40", price="1.1000")

    assert run.last("ACC-1").deadline == f.NOW.replace(second=31)  # 30 s after acceptance
    assert run.at(30).due().outcome == "nothing_due"
    d = run.at(31).due()

    [cancel] = d.intents
    assert cancel.kind is IntentKind.CANCEL
    assert run.last("ACC-1").cancel_purpose is CancelPurpose.COMPLETE
    [timeout] = run.of_type("intent_timeout")
    assert timeout.rationale.startswith("partially_filled -> cancel_requested on timeout")
    assert "COMPLETION_TIMEOUT: 0.40 of 1.00 filled" in timeout.rationale


def test_the_remainder_is_repriced_toward_the_market_and_the_result_averages_by_quantity() -> None:
    run, it = one_account_limit()
    run.prices["EURUSD"] = Decimal("1.1008")
    run.at(2).report(it, "partially_filled", "0.40", price="1.1000")
    run.at(31).due()

    d = run.at(32).report(it, "cancelled", "0.40", price="1.1000")

    [completion] = d.intents
    assert completion.kind is IntentKind.COMPLETION
    assert completion.parent_intent_id == it.intent_id
    assert completion.account_id == "ACC-1"
    assert (completion.attempt, completion.quantity) == (2, Decimal("0.60"))
    assert completion.limit_price == Decimal("1.1008")
    assert completion.intent_id == ids.intent_id("sig-1", "ACC-1", 2, "completion")
    [scheduled] = run.of_type("intent_scheduled")
    assert "re-priced 1.1000 -> 1.1008" in scheduled.rationale
    run.at(33).report(completion, "filled", "0.60", price="1.1008")

    assert run.status() is ResultStatus.COMPLETED
    result = run.decisions[-1].results[-1]
    assert result.filled_total == Decimal("1.00")
    # (0.40 x 1.1000 + 0.60 x 1.1008) / 1.00
    assert result.avg_price == Decimal("1.10048000")
    [line] = result.lines
    assert (line.requested, line.filled, line.attempts) == (Decimal("1.00"), Decimal("1.00"), 2)


def test_repricing_stays_within_the_signals_budget() -> None:
    run, it = one_account_limit(max_reprice_bps=5)
    run.prices["EURUSD"] = Decimal("1.1200")
    run.at(2).report(it, "partially_filled", "0.40", price="1.1000")
    run.at(31).due()

    [completion] = run.at(32).report(it, "cancelled", "0.40").intents

    assert completion.limit_price == Decimal("1.1005")  # 5 bps above the signal's 1.1000


def test_without_a_price_the_remainder_goes_to_the_best_alternative_rechecked_now() -> None:
    run, it = one_account_limit()
    run.at(2).report(it, "partially_filled", "0.40", price="1.1000")
    run.at(31).due()

    d = run.at(32).report(it, "cancelled", "0.40")

    [reroute] = d.intents
    assert reroute.kind is IntentKind.REROUTE
    assert reroute.account_id == run.st().plan.alternatives[0]
    assert reroute.parent_intent_id == it.intent_id
    assert reroute.quantity == Decimal("0.60")
    assert reroute.limit_price == Decimal("1.1000")  # the parent's terms
    [scheduled] = run.of_type("intent_scheduled")
    assert "re-checked now" in scheduled.rationale


def test_an_alternative_that_fails_its_rules_now_is_skipped_with_its_reasons() -> None:
    run, it = one_account_limit()
    first, second = run.st().plan.alternatives
    run.accounts[first] = f.account(first, status="suspended")
    run.at(2).report(it, "partially_filled", "0.40", price="1.1000")
    run.at(31).due()

    [reroute] = run.at(32).report(it, "cancelled", "0.40").intents

    assert reroute.account_id == second
    [refused] = run.of_type("alternative_refused")
    assert refused.account_id == first
    assert refused.data["reasons"] == ["STATUS: status=suspended"]


def test_with_no_price_and_no_alternative_the_partial_is_accepted() -> None:
    run = Run(config(execution=EXE))  # every account allocated: no alternatives
    d = run.signal(limit_signal(quantity="0.90"))
    it = d.intents[0]
    run.at(1).report(it, "partially_filled", "0.10", price="1.1000")
    run.at(31).due()

    d = run.at(32).report(it, "cancelled", "0.10")

    assert d.intents == ()
    [accepted] = run.of_type("partial_accepted")
    assert "no market price known" in accepted.rationale
    assert "no alternative account" in accepted.rationale


def test_completion_attempts_are_bounded_then_the_partial_is_accepted() -> None:
    run, it = one_account_limit(max_completion_attempts=2)
    run.prices["EURUSD"] = Decimal("1.1001")
    current = it
    made = []
    t = 1.0
    for k in range(3):
        run.at(t + 1).report(current, "partially_filled", "0.10", price="1.1000")
        run.at(t + 31).due()
        d = run.at(t + 32).report(current, "cancelled", "0.10")
        t += 32
        if not d.intents:
            break
        [current] = d.intents
        made.append(current.kind)
        run.prices["EURUSD"] += Decimal("0.0001")  # room to re-price each time
        del k

    assert made == [IntentKind.COMPLETION, IntentKind.COMPLETION]
    assert "2 of 2 completion attempts used" in run.of_type("partial_accepted")[-1].rationale
    assert run.status() is ResultStatus.PARTIALLY_COMPLETED
    assert run.decisions[-1].results[-1].filled_total == Decimal("0.30")


def test_a_market_order_partial_at_the_threshold_is_accepted_at_the_completion_timeout() -> None:
    run = Run(config(max_accounts=1, execution=EXE))
    [it] = run.signal(f.signal(quantity="1.00")).intents
    run.at(1).report(it, "partially_filled", "0.90")
    assert run.last("ACC-1").status is IntentStatus.PARTIALLY_FILLED  # not cancelled at once

    run.at(31).due()

    assert run.last("ACC-1").cancel_purpose is CancelPurpose.ACCEPT
    run.at(32).report(it, "cancelled", "0.90")
    assert run.status() is ResultStatus.PARTIALLY_COMPLETED


def test_fills_racing_the_cancel_are_counted_and_a_full_fill_wins() -> None:
    run, it = one_account_limit()
    run.at(2).report(it, "partially_filled", "0.40", price="1.1000")
    run.at(31).due()

    run.at(31.5).report(it, "partially_filled", "0.70", price="1.1000")
    d = run.at(32).report(it, "filled", "1.00", price="1.1000")

    assert d.intents == ()
    assert run.last("ACC-1").status is IntentStatus.FILLED
    assert run.status() is ResultStatus.COMPLETED


def test_a_refused_cancel_waits_for_the_orders_own_final_report() -> None:
    run, it = one_account_limit()
    run.at(2).report(it, "partially_filled", "0.40", price="1.1000")
    [cancel] = run.at(31).due().intents

    d = run.at(32).report(it, "rejected", code="other", intent_id=cancel.intent_id)

    assert d.outcome == "applied"
    assert run.last("ACC-1").status is IntentStatus.CANCEL_REQUESTED
    [refused] = [e for e in d.audit if e.type == "intent_transition"]
    assert refused.data["trigger"] == "cancel_refused"
    run.at(33).report(it, "filled", "1.00", price="1.1000")
    assert run.status() is ResultStatus.COMPLETED


def test_a_cancel_nobody_answers_escalates_as_an_unknown_outcome() -> None:
    run, it = one_account_limit()
    run.at(2).report(it, "partially_filled", "0.40", price="1.1000")
    run.at(31).due()

    d = run.at(41).due()  # ack timeout 10 s on the cancel

    assert run.last("ACC-1").status is IntentStatus.UNKNOWN
    [iv] = d.interventions
    assert iv.reason_code == "unknown_outcome"
    assert "no venue report on the cancel" in iv.reason


def test_a_late_cancel_confirmation_settles_the_escalation_and_completes() -> None:
    run, it = one_account_limit()
    run.prices["EURUSD"] = Decimal("1.1004")
    run.at(2).report(it, "partially_filled", "0.40", price="1.1000")
    run.at(31).due()
    run.at(41).due()

    d = run.at(42).report(it, "cancelled", "0.40")

    [completion] = d.intents
    assert completion.kind is IntentKind.COMPLETION
    [settled] = run.of_type("intervention_resolved")
    assert settled.data["resolved_by"] == "venue"
    assert not run.st().open_interventions
