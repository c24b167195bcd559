"""Correlation-aware concentration (AC2): the matrix, correlated exposure per account, and the
portfolio's cluster cap.

Open risk of a position is proxied as risk_proxy_pct (1% by default) of its notional: long
1.00 GBPUSD at 1.27 is 1.00 x 100000 x 1.27 x 1% = 1270.00 at risk. With EURUSD/GBPUSD
correlated at 0.85, a EURUSD buy counts 0.85 x 1270.00 = 1079.50 of it as the same bet.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import numpy as np
import pytest

from orch_worker.domain.correlation import (
    CorrelationError,
    CorrelationMatrix,
    cluster_limit,
    correlated_open_risk,
)
from tests.unit.planning_helpers import (
    EURUSD,
    GBPUSD,
    codes,
    config,
    plan,
    reason,
    shares,
    signal,
    state,
    states,
)

USDJPY = {**EURUSD, "value_per_unit": "1000"}
INSTRUMENTS = {"EURUSD": EURUSD, "GBPUSD": GBPUSD, "USDJPY": USDJPY}
CORRELATED = {"EURUSD/GBPUSD": 0.85}
LONG_CABLE = (("GBPUSD", "1.00", "1.27"),)


def cfg(accounts: Any = 2, **kw: Any) -> Any:
    return config(accounts, instruments=INSTRUMENTS, correlations=CORRELATED, **kw)


# --- the matrix ---------------------------------------------------------------------------------


def test_matrix_from_pairs_is_symmetric_with_a_unit_diagonal_and_zero_elsewhere() -> None:
    m = CorrelationMatrix.from_pairs(["EURUSD", "GBPUSD", "USDJPY"], {"GBPUSD/EURUSD": 0.85})

    assert m.matrix.tolist() == [[1.0, 0.85, 0.0], [0.85, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert m.get("EURUSD", "GBPUSD") == m.get("GBPUSD", "EURUSD") == 0.85
    assert m.get("EURUSD", "XAUUSD") == 0.0
    assert m.get("XAUUSD", "XAUUSD") == 1.0


def test_matrix_from_configuration_covers_every_instrument() -> None:
    m = CorrelationMatrix.from_config(cfg())

    assert m.symbols == ("EURUSD", "GBPUSD", "USDJPY")
    assert m.get("GBPUSD", "EURUSD") == 0.85


@pytest.mark.parametrize(
    "matrix",
    [
        [[1.0, 0.5], [0.4, 1.0]],  # not symmetric
        [[1.0, 1.2], [1.2, 1.0]],  # outside [-1, 1]
        [[0.9, 0.0], [0.0, 1.0]],  # diagonal not 1
        [[1.0, float("nan")], [float("nan"), 1.0]],
    ],
)
def test_a_matrix_that_is_not_a_correlation_matrix_is_refused(matrix: list[list[float]]) -> None:
    with pytest.raises(CorrelationError):
        CorrelationMatrix(("A", "B"), np.array(matrix))


def test_matrix_from_prices_follows_the_returns() -> None:
    a = np.array([100.0, 101.0, 99.5, 102.0, 103.5, 101.0, 104.0])
    prices = np.column_stack([a, 2 * a, 1000 / a, np.full(len(a), 50.0)])

    m = CorrelationMatrix.from_prices(["A", "TWICE_A", "INVERSE_A", "FLAT"], prices)

    assert m.get("A", "TWICE_A") == pytest.approx(1.0)
    assert m.get("A", "INVERSE_A") == pytest.approx(-1.0)
    assert m.get("A", "FLAT") == 0.0
    assert m.get("FLAT", "FLAT") == 1.0


def test_matrix_from_prices_matches_numpys_pearson_correlation_of_log_returns() -> None:
    rng = np.random.default_rng(3)
    prices = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, size=(250, 3)), axis=0))

    m = CorrelationMatrix.from_prices(["X", "Y", "Z"], prices)

    expected = np.corrcoef(np.diff(np.log(prices), axis=0), rowvar=False)
    assert np.allclose(m.matrix, expected)


@pytest.mark.parametrize(
    "prices",
    [[[1.0, 2.0], [1.1, 2.1]], [[1.0, 2.0], [0.0, 2.0], [1.0, 2.0]], [[1.0], [2.0], [3.0]]],
)
def test_too_few_or_bad_prices_are_refused(prices: list[list[float]]) -> None:
    with pytest.raises(CorrelationError):
        CorrelationMatrix.from_prices(["A", "B"], prices)


# --- correlated open risk -----------------------------------------------------------------------


def test_correlated_open_risk_counts_same_direction_bets_by_their_correlation() -> None:
    rho = np.array([1.0, 0.85, -0.5])  # EURUSD with EURUSD, GBPUSD, USDJPY
    long_risk = np.array([[550.0, 1270.0, 0.0]])
    short_risk = np.array([[0.0, 0.0, 300.0]])

    buy = correlated_open_risk(long_risk, short_risk, rho, +1)
    sell = correlated_open_risk(long_risk, short_risk, rho, -1)

    # buy: the long EURUSD in full, 0.85 of the long GBPUSD, 0.5 of the short anti-correlated
    assert buy.tolist() == [pytest.approx(550 + 0.85 * 1270 + 0.5 * 300)]
    assert sell.tolist() == [0.0]


def test_account_exposure_limit_reduces_the_order_to_what_is_left() -> None:
    c = cfg(1, rules={"max_correlated_risk_pct": "2"})

    p = plan(signal("3.00"), states(state("ACC-1", positions=LONG_CABLE)), c)

    # limit 2% of 100000 = 2000; 1079.50 already correlated; 920.50 left = 184 lots of 5.00
    [a] = p.allocations
    assert a.quantity == Decimal("1.84")
    assert a.numbers["capped_by"] == "CORRELATED_EXPOSURE"


def test_account_over_its_exposure_limit_is_excluded_with_the_numbers() -> None:
    c = cfg(2, rules={"max_correlated_risk_pct": "2"})
    accounts = states(state("ACC-1", positions=(("GBPUSD", "2.00", "1.27"),)), state("ACC-2"))

    p = plan(signal(), accounts, c)

    assert reason(p, "ACC-1", "CORRELATED_EXPOSURE") == (
        "CORRELATED_EXPOSURE: needed=5.00 left=-159.00 correlated_open=2159.00 limit=2000.00 "
        "quantity=0.01"
    )
    assert shares(p) == {"ACC-2": "1.00"}


def test_opposite_direction_holdings_are_not_the_same_bet() -> None:
    c = cfg(1, rules={"max_correlated_risk_pct": "2"}, cross_account_hedging_allowed=True)

    p = plan(signal("3.00"), states(state("ACC-1", positions=(("GBPUSD", "-2.00", "1.27"),))), c)

    assert shares(p) == {"ACC-1": "3.00"}  # short cable vs a EURUSD buy: no correlated risk


def test_correlations_from_the_context_replace_the_configured_ones() -> None:
    c = cfg(1, rules={"max_correlated_risk_pct": "2"})
    accounts = states(state("ACC-1", positions=(("GBPUSD", "2.00", "1.27"),)))
    uncorrelated = CorrelationMatrix.identity(["EURUSD", "GBPUSD", "USDJPY"])

    configured = plan(signal(), accounts, c)
    from_prices = plan(signal(), accounts, c, correlations=uncorrelated)

    assert codes(configured) == {"ACC-1": ["CORRELATED_EXPOSURE"]}
    assert shares(from_prices) == {"ACC-1": "1.00"}


def test_risk_proxy_is_configurable_per_instrument() -> None:
    instruments = {**INSTRUMENTS, "GBPUSD": {**GBPUSD, "risk_proxy_pct": "0.1"}}
    c = config(
        1, instruments=instruments, correlations=CORRELATED, rules={"max_correlated_risk_pct": "2"}
    )

    p = plan(signal("3.00"), states(state("ACC-1", positions=(("GBPUSD", "2.00", "1.27"),))), c)

    # 0.1% of 254000 notional = 254 at risk, 215.90 correlated: 1784.10 left = 356 lots
    assert shares(p) == {"ACC-1": "3.00"}


# --- the portfolio's cluster cap ----------------------------------------------------------------


def cluster_accounts() -> dict[str, Any]:
    # ACC-1: long GBPUSD, 1270.00 at risk, in the EURUSD-buy cluster (0.85 >= 0.7)
    # ACC-2: long USDJPY 1.00 at 150, 1.00 x 1000 x 150 x 1% = 1500.00 at risk, not in it
    return states(
        state("ACC-1", positions=LONG_CABLE),
        state("ACC-2", positions=(("USDJPY", "1.00", "150"),)),
    )


def test_cluster_cap_reduces_the_plan_to_the_largest_share_it_allows() -> None:
    c = cfg(2, max_cluster_risk_share=0.5)

    p = plan(signal("1.00"), cluster_accounts(), c)

    # (1270 + N) / (2770 + N) <= 0.5  ->  N <= (0.5 x 2770 - 1270) / 0.5 = 230 = 46 lots of 5.00
    assert p.rejected_reason is None
    assert p.planned_total == Decimal("0.46")
    assert shares(p) == {"ACC-1": "0.23", "ACC-2": "0.23"}
    assert p.numbers["cluster"] == {
        "cluster_risk": "1270.00",
        "portfolio_risk": "2770.00",
        "floor": "2000.00",
        "new_risk": "230.00",
        "share_after": "0.5000",
        "max_share": "0.5",
        "max_new_risk": "230.00",
        "reduced_from": "1.00",
    }


def test_cluster_cap_rejects_with_correlation_limit_when_asked_to() -> None:
    c = cfg(2, max_cluster_risk_share=0.5, correlation_limit_action="reject")

    p = plan(signal("1.00"), cluster_accounts(), c)

    assert p.rejected_reason == (
        "CORRELATION_LIMIT: cluster_risk=1270.00 portfolio_risk=2770.00 floor=2000.00 "
        "new_risk=500.00 share_after=0.5413 max_share=0.5 max_new_risk=230.00 quantity=1.00"
    )
    assert p.allocations == ()


def test_cluster_already_over_its_cap_rejects_even_when_reducing() -> None:
    c = cfg(2, max_cluster_risk_share=0.45)

    p = plan(signal("1.00"), cluster_accounts(), c)

    assert p.rejected_reason is not None
    assert p.rejected_reason.startswith("CORRELATION_LIMIT: cluster_risk=1270.00")


def test_a_flat_portfolios_first_trade_is_measured_against_the_floor() -> None:
    c = cfg(2, max_cluster_risk_share=0.5)

    p = plan(signal("1.00"), states(state("ACC-1"), state("ACC-2")), c)

    # no open risk: 500 / max(500, 1% of 200000) = 0.25
    assert p.planned_total == Decimal("1.00")
    assert p.numbers["cluster"]["share_after"] == "0.2500"  # type: ignore[index]


def test_cluster_limit_arithmetic() -> None:
    totals_long = np.array([0.0, 1270.0, 1500.0])
    limit = cluster_limit(
        totals_long,
        np.zeros(3),
        rho_row=np.array([1.0, 0.85, 0.0]),
        side_sign=1,
        threshold=0.7,
        cap=0.5,
        portfolio_equity=200_000.0,
        floor_pct=1.0,
    )

    assert (limit.cluster_risk, limit.total_risk, limit.floor) == (1270.0, 2770.0, 2000.0)
    assert limit.max_new_risk == pytest.approx(230.0)
    assert limit.share(230.0) == pytest.approx(0.5)


# --- correlation in the ranking -----------------------------------------------------------------


def test_ranking_prefers_the_account_the_trade_adds_least_correlated_risk_to() -> None:
    c = cfg(2, max_accounts=1)

    p = plan(signal(), states(state("ACC-1", positions=LONG_CABLE), state("ACC-2")), c)

    assert shares(p) == {"ACC-2": "1.00"}
    assert p.alternatives == ("ACC-1",)
