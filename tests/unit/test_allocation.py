"""Sizing and allocation methods: published worked examples, rounding, remainders and caps.

The worked examples are the ones brokers publish for their own multi-account allocation, with
their numbers, reproduced through the planner:

* Interactive Brokers, TWS API documentation, "Financial Advisors: Allocation Methods and
  Groups" (https://interactivebrokers.github.io/tws-api/financial_advisor.html), and the TWS
  Users' Guide "Set Default Allocations" (ibkrguides.com/traderworkstation/
  set-default-allocations.htm): *EqualQuantity*, *NetLiq* and *AvailableEquity*.
* Interactive Brokers, TWS Users' Guide "Create Allocation Profiles"
  (interactivebrokers.co.in/en/software/advisors/topics/createallocationprofiles.htm):
  *Financial Ratios*.
* FXClearing, "Allocation Methods" for its MAM software (https://www.fxclearing.com/lo/
  allocation-methods): *Equity* (pro rata by equity in 0.01 lots, the residual lot to the
  largest equity) and *Even* (residual volume from the first account on the list).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orch_worker.domain.allocation import first, priority, round_down, split, water_fill
from tests.unit.planning_helpers import (
    SHARES,
    codes,
    config,
    plan,
    shares,
    signal,
    state,
    states,
)

STOCK = {"XYZ": SHARES}


def stock_signal(quantity: str | None, **kw: str) -> object:
    return signal(quantity, symbol="XYZ", reference_price="100", stop_loss="95", **kw)


def rich(account_id: str, equity: str = "1000000", margin: str | None = None) -> object:
    return state(account_id, equity=equity, margin_available=margin or equity)


# --- published worked examples -------------------------------------------------------------------


def test_ib_equal_quantity_400_shares_over_six_accounts() -> None:
    """IB EqualQuantity: "If your Account Group includes six accounts, each account receives 66
    shares, and then 1 share is allocated to each account until all are distributed"
    (400 = 6 x 66 + 4: four accounts get 67)."""
    ids = ["A", "B", "C", "D", "E", "F"]
    cfg = config(ids, instruments=STOCK)

    p = plan(stock_signal("400"), {a: rich(a) for a in ids}, cfg)

    assert shares(p) == {"A": "67", "B": "67", "C": "67", "D": "67", "E": "66", "F": "66"}
    assert p.numbers["remainder"] == {
        "lots": 4,
        "owners": ["A", "B", "C", "D"],
        "rule": "largest share first, ties in account id order rotated by `rotation`",
    }


def test_ib_equal_quantity_400_shares_over_four_accounts() -> None:
    """IB EqualQuantity: "If your Account Group includes four accounts, each account receives
    100 shares"."""
    ids = ["A", "B", "C", "D"]
    p = plan(stock_signal("400"), {a: rich(a) for a in ids}, config(ids, instruments=STOCK))

    assert set(shares(p).values()) == {"100"}


def test_ib_netliq_700_shares_by_net_liquidation_value() -> None:
    """IB NetLiq: 700 shares, Net Liquidation values $25,000, $50,000 and $100,000: "The system
    calculates a ratio of 1:2:4 and allocates 100 shares to Client A, 200 shares to Client B,
    and 400 shares to Client C". Net liquidation value is the account state's equity."""
    cfg = config(["A", "B", "C"], allocation="equity", instruments=STOCK)
    accounts = states(rich("A", "25000"), rich("B", "50000"), rich("C", "100000"))

    p = plan(stock_signal("700"), accounts, cfg)

    assert shares(p) == {"A": "100", "B": "200", "C": "400"}
    assert [a.numbers["weight"] for a in p.allocations] == ["25000", "50000", "100000"]


def test_ib_available_equity_700_shares_by_available_equity() -> None:
    """IB AvailableEquity: the same 700 shares and 1:2:4 ratio, from available equity rather
    than net liquidation value -- here `margin_available`, with equal equity everywhere."""
    cfg = config(["A", "B", "C"], allocation="available_margin", instruments=STOCK)
    accounts = states(
        state("A", equity="500000", margin_available="25000"),
        state("B", equity="500000", margin_available="50000"),
        state("C", equity="500000", margin_available="100000"),
    )

    p = plan(stock_signal("700"), accounts, cfg)

    assert shares(p) == {"A": "100", "B": "200", "C": "400"}


def test_ib_financial_ratios_4_2_1_1_of_1000_shares() -> None:
    """IB Financial Ratios: "an order for 1000 shares using a profile with four accounts set to
    a ratio of 4, 2, 1, 1 would allocate 500, 250, 125 and 125 shares"."""
    cfg = config(
        {"A": {"ratio": "4"}, "B": {"ratio": "2"}, "C": {"ratio": "1"}, "D": {"ratio": "1"}},
        allocation="ratio",
        instruments=STOCK,
    )

    p = plan(stock_signal("1000"), {a: rich(a) for a in "ABCD"}, cfg)

    assert shares(p) == {"A": "500", "B": "250", "C": "125", "D": "125"}


def test_fxclearing_mam_equity_method_with_the_residual_lot_to_the_largest_equity() -> None:
    """FXClearing MAM, Equity: investor equity $10,000 / $7,000 / $2,000 (shares 0.5263,
    0.3684, 0.1052 of $19,000), master lot 10.00 -> 5.26 / 3.68 / 1.05; "The residual volume
    of 0.01 lot ... will be further allocated ... starting with the Account with the largest
    equity", so Investor 1 takes 5.27."""
    cheap_margin = {
        "EURUSD": {
            "value_per_unit": "100000",
            "lot_step": "0.01",
            "min_quantity": "0.01",
            "max_quantity": "50",
            "margin_rate": "0.001",
        }
    }
    cfg = config(["INV-1", "INV-2", "INV-3"], allocation="equity", instruments=cheap_margin)
    accounts = states(
        state("INV-1", equity="10000"), state("INV-2", equity="7000"), state("INV-3", equity="2000")
    )

    p = plan(signal("10.00"), accounts, cfg)

    assert shares(p) == {"INV-1": "5.27", "INV-2": "3.68", "INV-3": "1.05"}
    assert [a.numbers["remainder_lot"] for a in p.allocations] == [True, False, False]
    assert "+1 remainder lot" in p.allocations[0].rationale


def test_fxclearing_mam_even_method_residual_from_the_first_account_on_the_list() -> None:
    """FXClearing MAM, Even: "Any residual volume will be evenly distributed between all your
    Investors, starting with the first Investor Account on the list and working down"."""
    p = plan(
        signal("1.00"),
        states(rich("INV-1"), rich("INV-2"), rich("INV-3")),
        config(["INV-1", "INV-2", "INV-3"]),
    )

    assert shares(p) == {"INV-1": "0.34", "INV-2": "0.33", "INV-3": "0.33"}


# --- the risk method ----------------------------------------------------------------------------


def test_risk_method_sizes_each_account_to_its_risk_per_trade_at_the_stop_distance() -> None:
    # q = equity x pct / 100 / (value_per_unit x |entry - stop|) = 100000 x 0.5% / (100000 x
    # 0.0050) = 1.00; 50000 -> 0.50; 23000 -> 0.23
    cfg = config(3, allocation="risk", rules={"risk_per_trade_pct": "0.5"})
    accounts = states(
        state("ACC-1", equity="100000"),
        state("ACC-2", equity="50000"),
        state("ACC-3", equity="23000"),
    )

    p = plan(signal(None), accounts, cfg)

    assert shares(p) == {"ACC-1": "1.00", "ACC-2": "0.50", "ACC-3": "0.23"}
    assert p.requested == Decimal("1.73")
    a = p.allocations[0]
    assert a.numbers["risk"] == "500.00"
    assert a.numbers["risk_per_trade_pct"] == "0.5"
    assert a.numbers["capped_by"] is None
    assert "0.5% of equity 100000 = 500.00 to risk" in a.rationale


def test_risk_method_rounds_each_target_down_to_the_lot_step() -> None:
    cfg = config(1, allocation="risk", rules={"risk_per_trade_pct": "0.5"})

    p = plan(signal(None), states(state("ACC-1", equity="12345")), cfg)

    assert shares(p) == {"ACC-1": "0.12"}  # 61.725 to risk at 500 per 1.00 = 0.12345


def test_risk_method_with_a_quantity_treats_it_as_a_ceiling_on_the_total() -> None:
    cfg = config(3, allocation="risk", rules={"risk_per_trade_pct": "0.5"})
    accounts = states(
        state("ACC-1", equity="100000"),
        state("ACC-2", equity="50000"),
        state("ACC-3", equity="20000"),
    )

    p = plan(signal("1.00"), accounts, cfg)

    # targets 1.00 / 0.50 / 0.20 (1.70) shrink pro rata to 1.00: 0.588 / 0.294 / 0.118
    assert shares(p) == {"ACC-1": "0.59", "ACC-2": "0.30", "ACC-3": "0.11"}
    assert p.planned_total == Decimal("1.00")


def test_risk_method_without_a_stop_loss_rejects_the_signal() -> None:
    cfg = config(1, allocation="risk", rules={"risk_per_trade_pct": "0.5"})

    p = plan(signal(None, stop_loss=None), states(state("ACC-1")), cfg)

    assert p.rejected_reason == (
        "NO_STOP_LOSS: this portfolio sizes by risk, which needs the stop distance"
    )


def test_account_whose_risk_target_is_below_the_minimum_is_excluded() -> None:
    cfg = config(2, allocation="risk", rules={"risk_per_trade_pct": "0.5"})

    p = plan(signal(None), states(state("ACC-1"), state("ACC-2", equity="900")), cfg)

    assert codes(p) == {"ACC-2": ["RISK_PER_TRADE"]}  # 4.50 to risk, one lot risks 5.00


# --- rounding, remainder, minimum ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        ("1.00", {"ACC-1": "0.50", "ACC-2": "0.30", "ACC-3": "0.20"}),
        ("0.99", {"ACC-1": "0.50", "ACC-2": "0.30", "ACC-3": "0.19"}),  # 0.495/0.297/0.198
        ("0.07", {"ACC-1": "0.04", "ACC-2": "0.02", "ACC-3": "0.01"}),  # 0.035/0.021/0.014
        ("0.999", {"ACC-1": "0.50", "ACC-2": "0.30", "ACC-3": "0.19"}),  # sub-lot tail dropped
    ],
)
def test_equity_split_rounds_down_and_gives_remainder_lots_to_the_largest_shares(
    quantity: str, expected: dict[str, str]
) -> None:
    cfg = config(3, allocation="equity")
    accounts = states(rich("ACC-1", "500000"), rich("ACC-2", "300000"), rich("ACC-3", "200000"))

    p = plan(signal(quantity), accounts, cfg)

    assert shares(p) == expected


def test_remainder_ties_rotate_with_the_context_rotation() -> None:
    accounts = states(rich("ACC-1"), rich("ACC-2"), rich("ACC-3"))

    owners = [
        plan(signal("0.04"), accounts, config(3), rotation=r).numbers["remainder"]["owners"]  # type: ignore[index]
        for r in range(4)
    ]

    assert owners == [["ACC-1"], ["ACC-2"], ["ACC-3"], ["ACC-1"]]


def test_fewer_lots_than_accounts_keeps_the_largest_weights_and_drops_the_rest() -> None:
    cfg = config(3, allocation="equity")
    accounts = states(rich("ACC-1", "100000"), rich("ACC-2", "300000"), rich("ACC-3", "200000"))

    p = plan(signal("0.02"), accounts, cfg)

    # Two lots can reach two accounts at most: ACC-1 (smallest) is left out first. The two lots
    # split 1.2 / 0.8 by equity, round to 1 / 0, and the remainder lot goes to the largest
    # share: ACC-3's share rounds to nothing and it is dropped too.
    assert shares(p) == {"ACC-2": "0.02"}
    assert {e.account_id: e.reasons for e in p.exclusions} == {
        "ACC-1": ("BELOW_MIN_QUANTITY: share=0.00 min=0.01",),
        "ACC-3": ("BELOW_MIN_QUANTITY: share=0.00 min=0.01",),
    }


def test_share_below_the_minimum_is_dropped_and_re_split() -> None:
    instruments = {"EURUSD": {"value_per_unit": "100000", "min_quantity": "0.10"}}
    cfg = config(3, allocation="equity", instruments=instruments)
    accounts = states(rich("ACC-1", "1000000"), rich("ACC-2", "1000000"), rich("ACC-3", "50000"))

    p = plan(signal("1.00"), accounts, cfg)

    # shares 0.488 / 0.488 / 0.024: ACC-3's 0.02 < 0.10, re-split 0.50 / 0.50
    assert shares(p) == {"ACC-1": "0.50", "ACC-2": "0.50"}
    assert [e.reasons for e in p.exclusions] == [("BELOW_MIN_QUANTITY: share=0.02 min=0.10",)]


def test_minimum_quantity_that_is_not_a_whole_number_of_steps_rounds_up_to_one() -> None:
    instruments = {"EURUSD": {"value_per_unit": "100000", "min_quantity": "0.015"}}

    p = plan(
        signal("0.03"), states(rich("ACC-1"), rich("ACC-2")), config(2, instruments=instruments)
    )

    # the smallest order is 0.02 (two steps), so three lots can go to one account only
    assert shares(p) == {"ACC-1": "0.03"}
    assert [e.reasons for e in p.exclusions] == [("BELOW_MIN_QUANTITY: share=0.01 min=0.015",)]


# --- caps and redistribution --------------------------------------------------------------------


def test_what_a_capped_account_cannot_take_goes_to_the_others() -> None:
    # ACC-1 has margin for 27 lots (1000 / 36.63); the 73 lots it cannot take split 36.5 each.
    accounts = states(state("ACC-1", margin_available="1000"), rich("ACC-2"), rich("ACC-3"))

    p = plan(signal("1.00"), accounts, config(3))

    assert shares(p) == {"ACC-1": "0.27", "ACC-2": "0.37", "ACC-3": "0.36"}
    capped = p.allocations[0]
    assert capped.numbers["capped_by"] == "INSUFFICIENT_MARGIN"
    assert "capped at 0.27 by INSUFFICIENT_MARGIN" in capped.rationale


def test_redistribution_repeats_until_nobody_is_over_their_cap() -> None:
    cfg = config(
        {"ACC-1": {}, "ACC-2": {"rules": {"max_quantity_per_symbol": "0.30"}}, "ACC-3": {}},
        rules={"max_quantity_per_symbol": "10"},
    )
    accounts = states(state("ACC-1", margin_available="400"), rich("ACC-2"), rich("ACC-3"))

    p = plan(signal("1.50"), accounts, cfg)

    # equal 0.50 each; ACC-1 fits 0.10 (400 / 36.63), ACC-2 0.30: ACC-3 takes the other 1.10
    assert shares(p) == {"ACC-1": "0.10", "ACC-2": "0.30", "ACC-3": "1.10"}


def test_when_every_account_is_capped_less_than_requested_is_planned() -> None:
    accounts = states(state("ACC-1", margin_available="100"), state("ACC-2", margin_available="80"))

    p = plan(signal("5.00"), accounts, config(2))

    assert shares(p) == {"ACC-1": "0.02", "ACC-2": "0.02"}
    assert p.numbers["unallocated_lots"] == 496


def test_share_is_capped_at_the_instruments_maximum_per_order() -> None:
    p = plan(signal("150"), states(rich("ACC-1", "1e9"), rich("ACC-2", "1e9")), config(2))

    assert shares(p) == {"ACC-1": "50.00", "ACC-2": "50.00"}
    assert p.allocations[0].numbers["capped_by"] == "MAX_QUANTITY"


# --- the arithmetic on its own ------------------------------------------------------------------


def test_water_fill_caps_and_spreads_the_rest_by_weight() -> None:
    x = water_fill(30.0, np.array([1.0, 1.0, 1.0]), np.array([1.0, 5.0, 100.0]))

    assert x.tolist() == [1.0, 5.0, 24.0]


def test_water_fill_with_weights_keeps_proportions_among_the_uncapped() -> None:
    x = water_fill(100.0, np.array([1.0, 2.0, 3.0, 4.0]), np.array([100.0, 10.0, 100.0, 100.0]))

    assert x[1] == 10.0
    assert x[0] * 3 == pytest.approx(x[2])
    assert x[0] * 4 == pytest.approx(x[3])
    assert x.sum() == pytest.approx(100.0)


def test_water_fill_gives_every_cap_when_they_add_up_to_less_than_the_total() -> None:
    assert water_fill(50.0, np.ones(2), np.array([3.0, 4.0])).tolist() == [3.0, 4.0]


def test_round_down_never_exceeds_the_total_or_a_cap() -> None:
    lots, extra = round_down(
        np.array([2.5, 2.5, 2.0]), np.array([2, 10, 10]), 7, np.array([0, 1, 2])
    )

    assert lots.tolist() == [2, 3, 2]  # ACC-1 is at its cap, so the remainder goes to ACC-2
    assert extra.tolist() == [0, 1, 0]


def test_split_reports_dropped_accounts_with_their_rounded_share() -> None:
    sp = split(10, np.array([100.0, 100.0, 1.0]), np.array([50, 50, 50]), 2, np.arange(3))

    assert sp.lots.tolist() == [5, 5, 0]
    assert sp.dropped == {2: 0}


# --- the fast paths agree with the plain algorithms ----------------------------------------------


def _water_fill_sorting_everything(total: float, weights: Any, caps: Any) -> Any:
    """The water-filling level found by sorting every ratio (what `water_fill` must match)."""
    n = len(weights)
    if caps.sum() <= total:
        return caps.astype(np.float64)
    weight_sum = weights.sum()
    if weight_sum > 0:
        plain = weights * (total / weight_sum)
        if (plain <= caps).all():
            return plain
    positive = weights > 0
    ratio = np.where(positive, caps / np.where(positive, weights, 1.0), np.inf)
    order = np.argsort(ratio, kind="stable")
    r = ratio[order]
    capped_before = np.concatenate(([0.0], np.cumsum(caps[order])[:-1]))
    weight_after = weight_sum - np.concatenate(([0.0], np.cumsum(weights[order])[:-1]))
    level = np.divide(
        total - capped_before, weight_after, out=np.full(n, np.inf), where=weight_after > 0
    )
    fits = np.flatnonzero(level <= r)
    lam = level[fits[0]] if len(fits) else 0.0
    return np.where(positive, np.minimum(caps, lam * weights), 0.0)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 50), st.integers(0, 400), st.sampled_from([1, 1, 10, 100])),
        min_size=1,
        max_size=400,
    ),
    st.integers(1, 60_000),
)
def test_water_fill_sorts_only_what_it_needs_and_gives_the_same_shares_bit_for_bit(
    rows: list[tuple[int, int, int]], total: int
) -> None:
    weights = np.array([w * scale / 7 for w, _, scale in rows], dtype=np.float64)
    caps = np.array([c for _, c, _ in rows], dtype=np.float64)

    fast = water_fill(float(total), weights, caps)

    assert fast.tolist() == _water_fill_sorting_everything(float(total), weights, caps).tolist()


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 20), min_size=1, max_size=200),
    st.integers(0, 250),
    st.integers(0, 500),
)
def test_first_picks_the_same_accounts_as_the_full_priority_order(
    shares: list[int], count: int, rotation: int
) -> None:
    values = np.array(shares, dtype=np.float64) / 4  # many ties
    n = len(values)
    tie = (np.arange(n) - rotation) % n

    picked = first(values, tie, count)

    assert sorted(picked.tolist()) == sorted(priority(values, tie)[:count].tolist())
