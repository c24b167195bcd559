"""Eligibility (AC1): every exclusion reason, with its numbers, and every reason an account has.

The order throughout: buy EURUSD at 1.1000 with the stop at 1.0950 (a 0.0050 distance).
One 0.01 lot then needs 0.01 x 100000 x 1.1 x 0.0333 = 36.63 margin and risks
0.01 x 100000 x 0.0050 = 5.00 at its stop: the "needed" of most reasons below.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from orch_worker.domain.timewindows import parse_window
from orch_worker.settings import ConfigError, load_config
from tests.unit.planning_helpers import (
    codes,
    config,
    plan,
    reason,
    shares,
    signal,
    state,
    states,
)

SATURDAY = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
MONDAY = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def three(**overrides: dict[str, object]) -> dict[str, object]:
    return {"ACC-1": overrides.get("ACC-1", {}), "ACC-2": {}, "ACC-3": {}}


def healthy(*ids: str) -> dict[str, object]:
    return {a: state(a) for a in ids}


# --- gates: reasons that do not depend on the size ----------------------------------------------


def test_account_without_a_state_has_only_that_reason() -> None:
    p = plan(signal(), states(state("ACC-1")), config(2))

    assert codes(p) == {"ACC-2": ["NO_ACCOUNT_STATE"]}
    assert shares(p) == {"ACC-1": "1.00"}


def test_state_claiming_another_portfolio_is_excluded() -> None:
    p = plan(signal(), states(state("ACC-1"), state("ACC-2", portfolio="other")), config(2))

    assert reason(p, "ACC-2", "PORTFOLIO_MISMATCH") == (
        "PORTFOLIO_MISMATCH: state says portfolio=other config says demo"
    )


@pytest.mark.parametrize("status", ["suspended", "disabled"])
def test_inactive_account_is_excluded(status: str) -> None:
    p = plan(signal(), states(state("ACC-1"), state("ACC-2", status=status)), config(2))

    assert reason(p, "ACC-2", "STATUS") == f"STATUS: status={status}"


def test_paused_and_cooling_down_accounts_are_excluded() -> None:
    p = plan(
        signal(),
        states(state("ACC-1"), state("ACC-2"), state("ACC-3")),
        config(3),
        paused_accounts=frozenset({"ACC-1"}),
        cooldown_accounts=frozenset({"ACC-2"}),
    )

    assert reason(p, "ACC-1", "PAUSED") == "PAUSED: paused by a control command"
    assert reason(p, "ACC-2", "COOLDOWN") == "COOLDOWN: in failure cooldown after errors"
    assert shares(p) == {"ACC-3": "1.00"}


def test_symbol_outside_the_allowed_list_or_on_the_blocked_list_is_refused() -> None:
    cfg = config(
        {
            "ACC-1": {"rules": {"allowed_symbols": ["GBPUSD"]}},
            "ACC-2": {"rules": {"blocked_symbols": ["EURUSD", "XAUUSD"]}},
            "ACC-3": {"rules": {"allowed_symbols": ["EURUSD"], "blocked_symbols": ["GBPUSD"]}},
        }
    )

    p = plan(signal(), states(state("ACC-1"), state("ACC-2"), state("ACC-3")), cfg)

    assert reason(p, "ACC-1", "SYMBOL_NOT_ALLOWED") == (
        "SYMBOL_NOT_ALLOWED: EURUSD not in allowed_symbols=GBPUSD"
    )
    assert reason(p, "ACC-2", "SYMBOL_BLOCKED") == "SYMBOL_BLOCKED: EURUSD"
    assert shares(p) == {"ACC-3": "1.00"}


def test_outside_the_trading_windows_is_refused_and_the_time_comes_from_the_context() -> None:
    cfg = config(2, rules={"trading_windows": ["Mon-Fri 08:00-17:00"]})
    accounts = healthy("ACC-1", "ACC-2")

    weekend = plan(signal(), accounts, cfg, now=SATURDAY)
    weekday = plan(signal(), accounts, cfg, now=MONDAY)

    assert reason(weekend, "ACC-1", "OUTSIDE_TRADING_WINDOW") == (
        "OUTSIDE_TRADING_WINDOW: now=Sat 12:00 UTC windows=Mon-Fri 08:00-17:00"
    )
    assert weekend.rejected_reason is not None
    assert weekday.rejected_reason is None
    assert set(shares(weekday)) == {"ACC-1", "ACC-2"}


def test_without_a_time_in_the_context_the_signals_creation_time_is_used() -> None:
    cfg = config(1, rules={"trading_windows": ["Mon-Fri 00:00-24:00"]})

    p = plan(signal(), healthy("ACC-1"), cfg)  # f.NOW, the signal's created_at, is a Saturday

    assert codes(p) == {"ACC-1": ["OUTSIDE_TRADING_WINDOW"]}


def test_blackout_window_refuses_new_orders_until_its_end() -> None:
    cfg = config(1, rules={"blackout_windows": ["Mon 09:55-10:05", "12:00-12:30"]})
    accounts = healthy("ACC-1")

    during = plan(signal(), accounts, cfg, now=MONDAY)
    at_end = plan(signal(), accounts, cfg, now=MONDAY.replace(hour=10, minute=5))

    assert reason(during, "ACC-1", "IN_BLACKOUT_WINDOW") == (
        "IN_BLACKOUT_WINDOW: now=Mon 10:00 UTC window=Mon 09:55-10:05"
    )
    assert at_end.rejected_reason is None


def test_windows_wrap_midnight_and_name_the_day_they_start() -> None:
    w = parse_window("Fri 22:00-02:00")

    assert w.contains(datetime(2026, 11, 27, 23, 0, tzinfo=UTC))  # Friday night
    assert w.contains(datetime(2026, 11, 28, 1, 59, tzinfo=UTC))  # Saturday small hours
    assert not w.contains(datetime(2026, 11, 28, 2, 0, tzinfo=UTC))
    assert not w.contains(datetime(2026, 11, 28, 23, 0, tzinfo=UTC))  # Saturday night
    assert parse_window("Sat-Mon 00:00-24:00").days == frozenset({5, 6, 0})


@pytest.mark.parametrize(
    "bad", ["8:00-17:00", "08:00-08:00", "25:00-26:00", "Mon-Fry 08:00-17:00", "08:00"]
)
def test_malformed_windows_are_configuration_errors(bad: str) -> None:
    with pytest.raises(ValueError, match=r"window|weekday"):
        config(1, rules={"trading_windows": [bad]})


def test_opposite_position_in_the_account_is_refused_unless_hedging_is_allowed() -> None:
    cfg = config(
        {"ACC-1": {}, "ACC-2": {"rules": {"hedging_allowed": True}}},
        cross_account_hedging_allowed=True,
    )
    short = (("EURUSD", "-1.00", "1.1000"),)

    p = plan(
        signal(), states(state("ACC-1", positions=short), state("ACC-2", positions=short)), cfg
    )

    assert reason(p, "ACC-1", "HEDGING") == (
        "HEDGING: position=-1 EURUSD is opposite and hedging_allowed is off"
    )
    assert shares(p) == {"ACC-2": "1.00"}


def test_opposite_position_elsewhere_in_the_portfolio_blocks_the_others() -> None:
    cfg = config({"ACC-1": {"rules": {"hedging_allowed": True}}, "ACC-2": {}, "ACC-3": {}})
    accounts = states(
        state("ACC-1", positions=(("EURUSD", "-0.50", "1.1000"),)),
        state("ACC-2", positions=(("EURUSD", "2.00", "1.0900"),)),  # same direction: fine
        state("ACC-3"),
    )

    p = plan(signal(), accounts, cfg)

    why = "opposite EURUSD position in ACC-1; the portfolio forbids hedging across accounts"
    assert reason(p, "ACC-2", "CROSS_ACCOUNT_HEDGING") == f"CROSS_ACCOUNT_HEDGING: {why}"
    assert reason(p, "ACC-3", "CROSS_ACCOUNT_HEDGING") == f"CROSS_ACCOUNT_HEDGING: {why}"
    assert shares(p) == {"ACC-1": "1.00"}  # its own hedge is its own rule's business


def test_max_open_positions_counts_symbols_held_and_adding_to_one_opens_nothing() -> None:
    cfg = config(3, rules={"max_open_positions": 2})
    accounts = states(
        state("ACC-1", positions=(("GBPUSD", "1", "1.27"), ("USDJPY", "-2", "150"))),
        state("ACC-2", positions=(("GBPUSD", "1", "1.27"), ("EURUSD", "1", "1.09"))),
        state("ACC-3", positions=(("GBPUSD", "1", "1.27"), ("USDJPY", "0", "150"))),
    )

    p = plan(signal("0.90"), accounts, cfg)

    assert reason(p, "ACC-1", "MAX_OPEN_POSITIONS") == "MAX_OPEN_POSITIONS: open=2 max=2"
    assert shares(p) == {"ACC-2": "0.45", "ACC-3": "0.45"}


def test_risk_rules_without_a_stop_loss_cannot_be_checked() -> None:
    cfg = config(
        {"ACC-1": {"rules": {"max_daily_loss_pct": "5", "max_drawdown_pct": "10"}}, "ACC-2": {}}
    )

    p = plan(signal(stop_loss=None), healthy("ACC-1", "ACC-2"), cfg)

    assert reason(p, "ACC-1", "NO_STOP_LOSS") == (
        "NO_STOP_LOSS: max_daily_loss_pct,max_drawdown_pct cannot be checked without the "
        "order's stop loss"
    )
    assert shares(p) == {"ACC-2": "1.00"}


def test_risk_sizing_needs_each_accounts_risk_per_trade() -> None:
    cfg = config(
        {"ACC-1": {"rules": {"risk_per_trade_pct": "0.5"}}, "ACC-2": {}}, allocation="risk"
    )

    p = plan(signal(None), healthy("ACC-1", "ACC-2"), cfg)

    assert codes(p) == {"ACC-2": ["NO_RISK_PER_TRADE"]}
    assert shares(p) == {"ACC-1": "1.00"}  # 0.5% of 100000 = 500 at 500 per 1.00


# --- limits: excluded when not even the minimum quantity fits -----------------------------------


def test_free_margin_below_the_minimum_order_is_insufficient_margin() -> None:
    p = plan(signal(), states(state("ACC-1", margin_available="30")), config(1))

    assert p.rejected_reason == "NO_ELIGIBLE_ACCOUNT: every account was excluded"
    assert reason(p, "ACC-1", "INSUFFICIENT_MARGIN") == (
        "INSUFFICIENT_MARGIN: needed=36.63 left=30.00 available=30.00 quantity=0.01"
    )


def test_margin_exactly_enough_for_the_minimum_is_enough() -> None:
    exact = plan(signal(), states(state("ACC-1", margin_available="36.63")), config(1))
    short = plan(signal(), states(state("ACC-1", margin_available="36.62")), config(1))

    assert shares(exact) == {"ACC-1": "0.01"}
    assert codes(short) == {"ACC-1": ["INSUFFICIENT_MARGIN"]}


def test_min_free_margin_must_stay_free_after_the_order() -> None:
    cfg = config(1, rules={"min_free_margin": "1000"})

    p = plan(signal(), states(state("ACC-1", margin_available="1030")), cfg)

    assert reason(p, "ACC-1", "INSUFFICIENT_MARGIN") == (
        "INSUFFICIENT_MARGIN: needed=36.63 left=30.00 available=1030.00 min_free=1000.00 "
        "quantity=0.01"
    )


def test_margin_use_above_the_maximum_after_the_order_is_refused() -> None:
    cfg = config(1, rules={"max_margin_use_pct": "10"})

    p = plan(signal(), states(state("ACC-1", margin_used="9980")), cfg)

    assert reason(p, "ACC-1", "MAX_MARGIN_USE") == (
        "MAX_MARGIN_USE: needed=36.63 left=20.00 margin_used=9980.00 equity=100000.00 "
        "max_use=10% quantity=0.01"
    )


def test_risk_per_trade_below_one_lots_risk_is_refused() -> None:
    cfg = config(1, rules={"risk_per_trade_pct": "0.004"})

    p = plan(signal(), healthy("ACC-1"), cfg)

    assert reason(p, "ACC-1", "RISK_PER_TRADE") == (
        "RISK_PER_TRADE: needed=5.00 left=4.00 equity=100000.00 risk_per_trade=0.004% quantity=0.01"
    )


def test_daily_risk_budget_counts_the_risk_already_used_today() -> None:
    cfg = config(1, rules={"daily_risk_budget_pct": "1"})

    p = plan(signal(), healthy("ACC-1"), cfg, risk_used_today={"ACC-1": Decimal(997)})

    assert reason(p, "ACC-1", "DAILY_RISK_BUDGET") == (
        "DAILY_RISK_BUDGET: needed=5.00 left=3.00 used=997.00 budget=1000.00 quantity=0.01"
    )


def test_daily_loss_is_projected_with_the_new_orders_stop_loss_risk() -> None:
    cfg = config(1, rules={"max_daily_loss_pct": "5"})

    p = plan(signal(), states(state("ACC-1", equity="95003", day_start_equity="100000")), cfg)

    # today's loss 4997 + a stop-out of 5.00 would pass the 5000 limit
    assert reason(p, "ACC-1", "DAILY_LOSS_HEADROOM") == (
        "DAILY_LOSS_HEADROOM: needed=5.00 left=3.00 loss_today=4997.00 limit=5000.00 quantity=0.01"
    )


def test_daily_loss_headroom_reduces_the_size_to_what_a_stop_out_could_lose() -> None:
    cfg = config(1, rules={"max_daily_loss_pct": "5"})

    p = plan(signal(), states(state("ACC-1", equity="95012", day_start_equity="100000")), cfg)

    [a] = p.allocations
    assert a.quantity == Decimal("0.02")  # 12.00 left buys two 5.00 lots
    assert a.numbers["capped_by"] == "DAILY_LOSS_HEADROOM"
    assert a.numbers["risk"] == "10.00"


def test_static_drawdown_floor_comes_from_the_initial_balance() -> None:
    cfg = config(
        {"ACC-1": {}, "ACC-2": {"initial_balance": "95000"}}, rules={"max_drawdown_pct": "10"}
    )
    # ACC-1: floor 90% of its balance 100000; ACC-2: 90% of the configured 95000 = 85500
    accounts = states(
        state("ACC-1", equity="90003", balance="100000"),
        state("ACC-2", equity="90003", balance="100000"),
    )

    p = plan(signal("0.10"), accounts, cfg)

    assert reason(p, "ACC-1", "DRAWDOWN_HEADROOM") == (
        "DRAWDOWN_HEADROOM: needed=5.00 left=3.00 equity=90003.00 floor=90000.00 mode=static "
        "quantity=0.01"
    )
    assert shares(p) == {"ACC-2": "0.10"}


def test_trailing_drawdown_floor_follows_the_peak() -> None:
    cfg = config(1, rules={"max_drawdown_pct": "10", "drawdown_mode": "trailing"})

    p = plan(signal(), states(state("ACC-1", equity="108003", peak_equity="120000")), cfg)

    assert reason(p, "ACC-1", "DRAWDOWN_HEADROOM") == (
        "DRAWDOWN_HEADROOM: needed=5.00 left=3.00 equity=108003.00 floor=108000.00 "
        "mode=trailing quantity=0.01"
    )


def test_quantity_per_symbol_counts_the_position_already_held() -> None:
    cfg = config(2, rules={"max_quantity_per_symbol": "2"}, cross_account_hedging_allowed=True)
    accounts = states(
        state("ACC-1", positions=(("EURUSD", "2.00", "1.09"),)),
        state("ACC-2", positions=(("EURUSD", "1.50", "1.09"),)),
    )

    p = plan(signal(), accounts, cfg)

    assert reason(p, "ACC-1", "MAX_QUANTITY_PER_SYMBOL") == (
        "MAX_QUANTITY_PER_SYMBOL: needed=0.01 left=0.00 position=2 max=2 quantity=0.01"
    )
    [a] = p.allocations
    assert (a.account_id, a.quantity, a.numbers["capped_by"]) == (
        "ACC-2",
        Decimal("0.50"),
        "MAX_QUANTITY_PER_SYMBOL",
    )


def test_selling_against_a_long_position_may_go_to_the_limit_on_the_other_side() -> None:
    cfg = config(1, rules={"max_quantity_per_symbol": "2", "hedging_allowed": True})
    accounts = states(state("ACC-1", positions=(("EURUSD", "1.50", "1.09"),)))

    p = plan(signal("5.00", side="sell", stop_loss="1.1050"), accounts, cfg)

    assert shares(p) == {"ACC-1": "3.50"}  # from +1.50 down to -2.00


def test_every_failing_reason_is_listed_not_just_the_first() -> None:
    cfg = config(
        2,
        rules={
            "trading_windows": ["Mon-Fri 08:00-17:00"],
            "max_daily_loss_pct": "5",
            "max_margin_use_pct": "10",
        },
    )
    accounts = states(
        state(
            "ACC-1",
            status="suspended",
            equity="95000",
            day_start_equity="100000",
            margin_available="20",
            margin_used="9500",
        ),
        state("ACC-2"),
    )

    p = plan(signal(), accounts, cfg, now=SATURDAY, paused_accounts=frozenset({"ACC-1"}))

    assert codes(p)["ACC-1"] == [
        "STATUS",
        "PAUSED",
        "OUTSIDE_TRADING_WINDOW",
        "INSUFFICIENT_MARGIN",
        "MAX_MARGIN_USE",
        "DAILY_LOSS_HEADROOM",
    ]
    assert codes(p)["ACC-2"] == ["OUTSIDE_TRADING_WINDOW"]


def test_rules_merge_portfolio_defaults_with_account_overrides() -> None:
    cfg = config(
        {"ACC-1": {"rules": {"max_open_positions": 5}}, "ACC-2": {}},
        rules={"max_open_positions": 1},
    )
    held = (("GBPUSD", "1", "1.27"),)

    p = plan(signal(), states(state("ACC-1", positions=held), state("ACC-2", positions=held)), cfg)

    assert codes(p) == {"ACC-2": ["MAX_OPEN_POSITIONS"]}


# --- configuration ------------------------------------------------------------------------------


def test_new_rule_keys_load_from_toml_and_old_files_stay_valid(tmp_path: Path) -> None:
    good = tmp_path / "rules.toml"
    good.write_text(
        '[instruments.EURUSD]\nvalue_per_unit = "100000"\n'
        '[instruments.GBPUSD]\nvalue_per_unit = "100000"\nrisk_proxy_pct = "2"\n'
        '[correlations]\n"EURUSD/GBPUSD" = 0.85\n'
        '[portfolios.p]\nallocation = "risk"\nmax_cluster_risk_share = 0.6\n'
        "score_weights = { margin = 1, correlation = 0 }\n"
        "[portfolios.p.rules]\n"
        'risk_per_trade_pct = "0.5"\ndaily_risk_budget_pct = "2"\ndrawdown_mode = "trailing"\n'
        'trading_windows = ["Mon-Fri 07:00-21:00"]\nblackout_windows = ["Fri 20:00-23:59"]\n'
        'max_correlated_risk_pct = "3"\n'
        '[accounts.A]\nportfolio = "p"\ninitial_balance = "50000"\n'
    )

    cfg = load_config(good, env={})

    assert cfg.rules_for("A").drawdown_mode == "trailing"
    assert cfg.accounts["A"].initial_balance == Decimal(50000)
    assert cfg.correlations == {"EURUSD/GBPUSD": 0.85}
    assert float(cfg.portfolios["p"].score_weights.health) == 0.20


def test_bad_new_keys_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[instruments.EURUSD]\nvalue_per_unit = "100000"\n'
        '[correlations]\n"EURUSD/XAUUSD" = 0.5\n"EURUSD" = 0.3\n'
        '[portfolios.p.rules]\ndrawdown_mode = "sideways"\ntrading_windows = ["9-5"]\n'
    )

    with pytest.raises(ConfigError) as err:
        load_config(bad, env={})

    text = str(err.value)
    assert "portfolios.p.rules.drawdown_mode" in text
    assert "portfolios.p.rules.trading_windows" in text
    assert "correlations.EURUSD/XAUUSD: unknown instrument XAUUSD" in text
    assert 'correlations.EURUSD: key must be "SYMBOL/SYMBOL"' in text


# --- exactness at whole-lot boundaries ----------------------------------------------------------


def test_a_cap_exactly_on_a_whole_lot_is_honoured_despite_float_rounding() -> None:
    # 476.19 of margin is exactly 13 lots of 36.63; in binary floating point 476.19 / 36.63 is
    # 12.999999999999998, which a plain floor would turn into 12.
    exact = plan(signal(), states(state("ACC-1", margin_available="476.19")), config(1))
    short = plan(signal(), states(state("ACC-1", margin_available="476.18")), config(1))

    assert shares(exact) == {"ACC-1": "0.13"}
    assert shares(short) == {"ACC-1": "0.12"}


def test_eligibility_at_exactly_the_minimum_quantity_is_settled_exactly() -> None:
    instruments = {"EURUSD": {"value_per_unit": "100000", "min_quantity": "0.13"}}
    instruments["EURUSD"]["margin_rate"] = "0.0333"
    cfg = config(1, instruments=instruments)

    p = plan(signal(), states(state("ACC-1", margin_available="476.19")), cfg)

    assert shares(p) == {"ACC-1": "0.13"}
