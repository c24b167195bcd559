"""The paper venue's scripted faults: accounts rejected by reason, silent accounts, and faults
limited to early attempts so that a retry or completion goes through."""

from __future__ import annotations

import pytest

from orch_worker.domain.models import IntentKind, ReasonCode, ReportStatus
from orch_worker.venue.fill_model import simulate
from tests.unit.test_fill_model import NOW, make_intent, statuses, venue


def test_an_account_reject_rejects_its_orders_with_that_reason() -> None:
    cfg = venue(account_reject={"ACC-1": "account_suspended"})

    mine = simulate(make_intent(), cfg, NOW)
    other = simulate(make_intent(account_id="ACC-2"), cfg, NOW)

    assert statuses(mine) == [ReportStatus.ACCEPTED, ReportStatus.REJECTED]
    assert mine[-1].report.reason_code is ReasonCode.ACCOUNT_SUSPENDED
    assert "ACC-1 is suspended" in (mine[-1].report.reason_text or "")
    assert statuses(other)[-1] is ReportStatus.FILLED


def test_an_unknown_reason_code_for_an_account_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="unknown reason codes: nope"):
        venue(account_reject={"ACC-1": "nope"})


def test_a_silent_account_gets_no_report_at_all_not_even_for_a_cancel() -> None:
    cfg = venue(silent_accounts=("ACC-1",))

    assert simulate(make_intent(), cfg, NOW) == ()
    cancel = make_intent("C-1", kind=IntentKind.CANCEL, parent_intent_id="I-1")
    assert simulate(cancel, cfg, NOW) == ()


def test_faults_hit_only_early_attempts_and_leave_the_other_draws_alone() -> None:
    faulty = venue(
        reject_probability={"connection_error": 1.0},
        account_reject={"ACC-1": "other"},
        partial_fill_probability=1.0,
        faults_max_attempt=1,
    )
    clean = venue()

    first = simulate(make_intent(attempt=1), faulty, NOW)
    retry = simulate(make_intent(attempt=2), faulty, NOW)
    limit = simulate(make_intent(attempt=2, order_type="limit", limit_price="1.08"), faulty, NOW)

    assert statuses(first)[-1] is ReportStatus.REJECTED
    assert statuses(retry) == [ReportStatus.ACCEPTED, ReportStatus.FILLED]
    assert statuses(limit) == [ReportStatus.ACCEPTED, ReportStatus.FILLED]  # no partial
    # the same latency draws as with no faults configured at all
    assert [s.delay_s for s in retry] == [
        s.delay_s for s in simulate(make_intent(attempt=2), clean, NOW)
    ]
