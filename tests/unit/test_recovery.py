"""The failure-recovery policy, pure: classification, backoff, breaker, sessions, new terms."""

from __future__ import annotations

import statistics
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orch_worker.domain.config import ExecutionConfig, InstrumentConfig
from orch_worker.domain.interventions import (
    ALL_ACTIONS,
    LATE_FILL,
    OVERFILL,
    UNKNOWN_OUTCOME,
    default_action,
    options_for,
)
from orch_worker.domain.models import InterventionAction, OrderIntent, ReasonCode, Signal
from orch_worker.domain.recovery import (
    BREAKER_CODES,
    REMEDIES,
    AccountHealth,
    Remedy,
    adjusted_stop,
    backoff_s,
    classify,
    next_session_open,
    record_failure,
    repriced_limit,
    suspend,
)
from tests import factories as f

R = ReasonCode


@pytest.mark.parametrize(
    ("code", "remedy"),
    [
        (R.CONNECTION_ERROR, Remedy.RETRY),
        (R.TIMEOUT, Remedy.RETRY),
        (R.RATE_LIMITED, Remedy.RETRY),
        (R.INSUFFICIENT_MARGIN, Remedy.REDUCE),
        (R.ACCOUNT_SUSPENDED, Remedy.REROUTE),
        (R.MARKET_CLOSED, Remedy.NEXT_SESSION),
        (R.INVALID_STOPS, Remedy.ADJUST_STOPS),
        (R.INVALID_SYMBOL, Remedy.ESCALATE),
        (R.OTHER, Remedy.ESCALATE),
        (None, Remedy.ESCALATE),
    ],
)
def test_every_reason_code_has_its_remedy(code: ReasonCode | None, remedy: Remedy) -> None:
    assert classify(code) is remedy


def test_the_remedy_table_names_every_reason_code() -> None:
    assert set(REMEDIES) == set(ReasonCode)


def test_only_account_health_failures_count_toward_the_breaker() -> None:
    assert {R.CONNECTION_ERROR, R.TIMEOUT, R.RATE_LIMITED, R.OTHER} == BREAKER_CODES


# --- backoff ------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    signal_id=st.text(min_size=1, max_size=12),
    attempt=st.integers(min_value=1, max_value=12),
    base=st.floats(min_value=0, max_value=5),
    cap=st.floats(min_value=5, max_value=60),
)
def test_backoff_is_full_jitter_below_the_capped_exponential_and_reproducible(
    signal_id: str, attempt: int, base: float, cap: float
) -> None:
    delay = backoff_s(signal_id, "ACC-1", attempt, base, cap)

    assert 0 <= delay <= min(cap, base * 2 ** (attempt - 1)) + 1e-6
    assert delay == backoff_s(signal_id, "ACC-1", attempt, base, cap)


def test_backoff_jitter_spreads_orders_over_the_whole_range() -> None:
    delays = [backoff_s(f"s-{i}", "ACC-1", 3, 1.0, 30.0) for i in range(2000)]

    assert min(delays) < 0.1
    assert max(delays) > 3.9
    assert statistics.mean(delays) == pytest.approx(2.0, abs=0.15)  # uniform on [0, 4]


def test_backoff_grows_exponentially_until_the_cap() -> None:
    ceilings = [
        max(backoff_s(f"s-{i}", "A", n, 1.0, 10.0) for i in range(400)) for n in (1, 2, 3, 4, 5)
    ]

    assert ceilings[0] <= 1.0 < ceilings[1] <= 2.0 < ceilings[2] <= 4.0 < ceilings[3] <= 8.0
    assert ceilings[4] <= 10.0


# --- account health -----------------------------------------------------------------------------

EXE = ExecutionConfig(breaker_failures=3, breaker_window_s=60, breaker_cooldown_s=300)


def test_the_breaker_opens_at_n_failures_within_the_window() -> None:
    h = AccountHealth()
    opened = []
    for k in range(3):
        h, was_opened = record_failure(h, f.NOW + timedelta(seconds=k * 10), EXE, "boom")
        opened.append(was_opened)

    assert opened == [False, False, True]
    assert h.breaker_until == f.NOW + timedelta(seconds=20 + 300)
    assert h.resting(f.NOW + timedelta(seconds=319))
    assert not h.resting(f.NOW + timedelta(seconds=320))


def test_failures_spread_wider_than_the_window_do_not_open_the_breaker() -> None:
    h = AccountHealth()
    for k in range(6):
        h, opened = record_failure(h, f.NOW + timedelta(seconds=k * 31), EXE, "boom")
        assert not opened
    assert h.breaker_until is None
    assert len(h.failures) == 2


def test_an_open_breaker_is_not_opened_again() -> None:
    h = AccountHealth(breaker_until=f.NOW + timedelta(seconds=100))
    for k in range(5):
        h, opened = record_failure(h, f.NOW + timedelta(seconds=k), EXE, "boom")
        assert not opened
    assert h.breaker_until == f.NOW + timedelta(seconds=100)


def test_health_score_falls_with_recent_failures() -> None:
    h = AccountHealth(failures=(f.NOW, f.NOW))

    assert h.score(f.NOW, EXE) == pytest.approx(1 / 3)
    assert h.score(f.NOW + timedelta(seconds=61), EXE) == 1.0


def test_a_suspension_rests_the_account_for_the_cooldown_and_never_shortens() -> None:
    h = suspend(AccountHealth(), f.NOW, ExecutionConfig(), "suspended")
    assert h.suspended_until == f.NOW + timedelta(hours=24)
    again = suspend(h, f.NOW - timedelta(hours=1), ExecutionConfig(), "suspended")
    assert again.suspended_until == f.NOW + timedelta(hours=24)


# --- sessions, re-pricing, stops ----------------------------------------------------------------

MON = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)  # a Monday


@pytest.mark.parametrize(
    ("sessions", "after", "expected"),
    [
        (("Mon-Fri 08:00-17:00",), MON.replace(hour=7), MON.replace(hour=8)),
        (("Mon-Fri 08:00-17:00",), MON.replace(hour=18), MON.replace(hour=8) + timedelta(days=1)),
        # strictly after: a session the calendar thinks is open now is not retried into
        (("Mon-Fri 08:00-17:00",), MON.replace(hour=8), MON.replace(hour=8) + timedelta(days=1)),
        (
            ("Mon-Fri 08:00-17:00",),
            MON + timedelta(days=4, hours=8),
            MON.replace(hour=8) + timedelta(days=7),
        ),
        (("Sun 22:00-02:00",), MON, MON.replace(hour=22) + timedelta(days=6)),
        (("08:00-09:00", "13:00-14:00"), MON, MON.replace(hour=13)),
    ],
)
def test_next_session_open_is_the_next_start_in_the_calendar(
    sessions: tuple[str, ...], after: datetime, expected: datetime
) -> None:
    assert next_session_open(sessions, after) == expected


def limit_signal(side: str = "buy", stop: str | None = "1.0950") -> Signal:
    price, stop_loss = "1.1000", stop
    if side == "sell" and stop is not None:
        stop_loss = "1.1050"
    return f.signal(
        order_type="limit",
        limit_price=price,
        reference_price=None,
        side=side,
        stop_loss=stop_loss,
    )


@pytest.mark.parametrize(
    ("side", "market", "max_bps", "expected"),
    [
        ("buy", "1.1005", 20, Decimal("1.1005")),  # toward the market
        ("buy", "1.1100", 20, Decimal("1.1022")),  # at most 20 bps above the signal's limit
        ("buy", "1.0990", 20, None),  # the market is inside the limit: nothing to chase
        ("buy", "1.1005", 0, None),  # re-pricing switched off
        ("sell", "1.0990", 20, Decimal("1.0990")),
        ("sell", "1.0900", 20, Decimal("1.0978")),
    ],
)
def test_a_limit_is_repriced_toward_the_market_within_the_signals_budget(
    side: str, market: str, max_bps: float, expected: Decimal | None
) -> None:
    sig = limit_signal(side)
    assert repriced_limit(sig, Decimal("1.1000"), Decimal(market), max_bps) == expected


def test_no_repricing_without_a_market_price_or_past_the_stop() -> None:
    sig = limit_signal("sell")
    assert repriced_limit(sig, Decimal("1.1000"), None, 20) is None
    # a buy limit at or below its stop loss would be an order to lose
    close_stop = f.signal(
        order_type="limit", limit_price="1.1000", reference_price=None, stop_loss="1.0999"
    )
    assert repriced_limit(close_stop, Decimal("1.0990"), Decimal("1.0995"), 20) is None


def order(stop: str = "1.0990", quantity: str = "1.00", side: str = "buy") -> OrderIntent:
    return OrderIntent.model_validate(
        {
            "intent_id": "i",
            "plan_id": "p",
            "signal_id": "s",
            "portfolio": "demo",
            "account_id": "ACC-1",
            "broker": "paper",
            "symbol": "EURUSD",
            "side": side,
            "order_type": "market",
            "reference_price": "1.1000",
            "stop_loss": stop,
            "quantity": quantity,
            "scheduled_at": f.NOW,
            "released_at": f.NOW,
            "rationale": "t",
        }
    )


INST = InstrumentConfig(value_per_unit=Decimal(100000), min_stop_distance=Decimal("0.0040"))


def test_a_stop_too_close_moves_out_to_the_minimum_and_the_size_keeps_the_risk() -> None:
    # 10 pips of risk became 40: the order shrinks to a quarter so it risks no more
    assert adjusted_stop(order("1.0990"), INST, None) == (Decimal("1.0960"), Decimal("0.25"))
    sell = order("1.1010", side="sell")
    assert adjusted_stop(sell, INST, None) == (Decimal("1.1040"), Decimal("0.25"))


def test_the_stop_distance_is_measured_from_the_market_when_known() -> None:
    got = adjusted_stop(order("1.0960"), INST, Decimal("1.0980"))

    assert got == (Decimal("1.0940"), Decimal("0.66"))  # 40 -> 60 pips of risk: 1.00 x 40/60


@pytest.mark.parametrize(
    ("intent", "inst"),
    [
        (order("1.0950"), INST),  # already far enough
        (order("1.0990"), InstrumentConfig(value_per_unit=Decimal(100000))),  # no minimum known
        (order("1.0999", quantity="0.02"), INST),  # shrinks below the minimum quantity
    ],
)
def test_no_stop_adjustment_when_nothing_can_be_adjusted(
    intent: OrderIntent, inst: InstrumentConfig
) -> None:
    assert adjusted_stop(intent, inst, None) is None


# --- intervention options ----------------------------------------------------------------------

A = InterventionAction


def test_options_depend_on_why_a_human_is_asked() -> None:
    assert options_for(UNKNOWN_OUTCOME) == ALL_ACTIONS
    assert options_for("invalid_symbol") == ALL_ACTIONS
    assert options_for(OVERFILL) == (A.ACCEPT_PARTIAL, A.CANCEL)
    assert options_for(LATE_FILL) == (A.ACCEPT_PARTIAL, A.CANCEL)


@pytest.mark.parametrize(
    ("code", "configured", "expected"),
    [
        ("other", "retry", A.RETRY),
        ("other", "cancel", A.CANCEL),
        (UNKNOWN_OUTCOME, "retry", A.ACCEPT_PARTIAL),  # never a blind re-send
        (UNKNOWN_OUTCOME, "reroute", A.REROUTE),
        (OVERFILL, "reroute", A.ACCEPT_PARTIAL),  # not an option there
    ],
)
def test_the_default_action_is_the_configured_one_when_it_is_safe(
    code: str, configured: str, expected: InterventionAction
) -> None:
    assert default_action(code, configured) is expected
