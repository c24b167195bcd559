"""The report's numbers and compliance checks, on hand-made signals whose answers are known."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from orch_worker.report import (
    Fill,
    Release,
    SignalView,
    build,
    check_hedges,
    check_releases,
    render,
    slippage_bps,
)
from orch_worker.svgplot import bar_chart, histogram

T0 = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)


def view(
    signal_id: str,
    *,
    side: str = "buy",
    planned: dict[str, str],
    start_s: float = 0,
    end_s: float | None = 60,
    portfolio: str = "demo",
    hedging_allowed: bool = False,
) -> SignalView:
    allocations: list[dict[str, Any]] = [
        {
            "account_id": a,
            "quantity": q,
            "numbers": {"cap": "1.00", "margin": "10", "margin_available": "100"},
        }
        for a, q in planned.items()
    ]
    v = SignalView(signal_id, portfolio, T0 + timedelta(seconds=start_s))
    v.symbol, v.side = "EURUSD", side
    v.planned_at = v.received_at
    v.plan = {"allocations": allocations, "alternatives": []}
    v.config = {"portfolios": {portfolio: {"cross_account_hedging_allowed": hedging_allowed}}}
    v.status = "completed"
    v.ended_at = None if end_s is None else T0 + timedelta(seconds=end_s)
    return v


def release(
    v: SignalView, account: str, quantity: str, *, after_s: float = 0, kind: str = "initial"
) -> Release:
    at = v.received_at + timedelta(seconds=after_s)
    r = Release(
        intent_id=f"{v.signal_id}-{account}-{kind}",
        account_id=account,
        kind=kind,
        side=v.side or "buy",
        quantity=Decimal(quantity),
        reference=Decimal("1.1000"),
        scheduled_at=at,
        released_at=at,
        parent_intent_id=None,
        seq=len(v.releases) + 1,
    )
    v.releases.append(r)
    return r


def fill(v: SignalView, r: Release, quantity: str, price: str = "1.1000") -> None:
    v.fills.append(Fill(r.intent_id, r.account_id, Decimal(quantity), Decimal(price), 99))


def test_a_release_above_its_plan_or_to_an_unplanned_account_is_flagged() -> None:
    v = view("s1", planned={"A": "0.50", "B": "0.50"})
    release(v, "A", "0.50")
    release(v, "B", "0.60")
    release(v, "C", "0.10")

    check = check_releases([v])

    assert check.checked == 3
    assert len(check.violations) == 2
    assert "0.6 above the planned 0.5" in check.violations[0]
    assert "(C, initial): account not in the plan" in check.violations[1]


def test_opposite_net_fills_on_two_accounts_of_overlapping_signals_are_a_hedge() -> None:
    buy = view("s1", side="buy", planned={"A": "1"}, end_s=60)
    sell = view("s2", side="sell", planned={"B": "1"}, start_s=30, end_s=90)
    fill(buy, release(buy, "A", "1"), "1")
    fill(sell, release(sell, "B", "1"), "1")

    check = check_hedges([buy, sell])

    assert check.checked == 1
    assert check.violations == [
        "demo EURUSD (signals s1, s2): net long A while net short B",
    ]


def test_signals_that_do_not_overlap_or_that_net_out_per_account_are_no_hedge() -> None:
    buy = view("s1", side="buy", planned={"A": "1", "B": "1"}, end_s=60)
    sell = view("s2", side="sell", planned={"A": "2", "B": "2"}, start_s=30, end_s=90)
    for v, q in ((buy, "1"), (sell, "2")):
        for account in ("A", "B"):
            fill(v, release(v, account, q), q)
    later = view("s3", side="buy", planned={"C": "1"}, start_s=200, end_s=260)
    fill(later, release(later, "C", "1"), "1")

    check = check_hedges([buy, sell, later])

    assert check.checked == 2  # {s1, s2} overlap; s3 starts after both ended
    assert check.violations == []


def test_a_hedge_the_portfolio_allows_is_noted_not_flagged() -> None:
    buy = view("s1", side="buy", planned={"A": "1"}, hedging_allowed=True)
    sell = view("s2", side="sell", planned={"B": "1"}, start_s=1, hedging_allowed=True)
    fill(buy, release(buy, "A", "1"), "1")
    fill(sell, release(sell, "B", "1"), "1")

    check = check_hedges([buy, sell])

    assert check.violations == []
    assert "allowed by cross_account_hedging_allowed" in check.notes[0]


def test_rotation_counts_first_releases_against_the_expected_share() -> None:
    views = []
    for i in range(12):
        v = view(f"s{i}", planned={"A": "1", "B": "1", "C": "1"}, start_s=i * 100)
        for k, account in enumerate(("A", "B", "C")):
            # A goes first every time: the others never do.
            release(v, account, "1", after_s=k)
        views.append(v)

    report = build(views, generated_at=T0)

    lines = report.accounts
    assert (lines["A"].first, lines["B"].first, lines["C"].first) == (12, 0, 0)
    assert lines["A"].expected_first == 4.0
    rotation = next(c for c in report.checks if c.name == "rotation_fairness")
    assert rotation.checked == 3
    assert len(rotation.violations) == 3


def test_a_fair_rotation_passes_within_one_signal() -> None:
    views = []
    for i in range(7):
        v = view(f"s{i}", planned={"A": "1", "B": "1", "C": "1"}, start_s=i * 100)
        order = ["A", "B", "C"][i % 3 :] + ["A", "B", "C"][: i % 3]
        for k, account in enumerate(order):
            release(v, account, "1", after_s=k)
        views.append(v)

    report = build(views, generated_at=T0)

    assert [report.accounts[a].first for a in "ABC"] == [3, 2, 2]
    rotation = next(c for c in report.checks if c.name == "rotation_fairness")
    assert rotation.violations == []


def test_slippage_is_positive_when_worse_for_the_account() -> None:
    ref = Decimal("1.1000")

    assert slippage_bps("buy", Decimal("1.1011"), ref) == Decimal(10)
    assert slippage_bps("sell", Decimal("1.1011"), ref) == Decimal(-10)


def test_fill_rate_slippage_and_delay_per_account() -> None:
    v = view("s1", planned={"A": "1.00", "B": "1.00"})
    a = release(v, "A", "1.00", after_s=2)
    b = release(v, "B", "1.00", after_s=5)
    fill(v, a, "0.50", "1.1011")
    fill(v, a, "0.50", "1.1000")
    fill(v, b, "0.25", "1.0989")

    report = build([v], generated_at=T0)

    assert report.accounts["A"].fill_rate == 1.0
    assert report.accounts["A"].slippage_bps == 5.0
    assert report.accounts["B"].fill_rate == 0.25
    assert report.accounts["B"].slippage_bps == -10.0
    assert sorted(report.delays_s) == [2.0, 5.0]
    assert report.lags_s == [0.0, 0.0]


def test_the_page_is_self_contained_and_carries_its_numbers() -> None:
    v = view("s1", planned={"A": "1.00"})
    fill(v, release(v, "A", "1.00"), "1.00")

    page = render(build([v], generated_at=T0))

    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page
    assert 'data-metric="planned" data-account="A">1</td>' in page
    assert 'data-check="releases_within_plan" data-checked="1" data-violations="0"' in page


def test_charts_handle_negatives_missing_values_and_empty_data() -> None:
    svg = bar_chart("t", ["a", "b"], [("x", [-2.0, float("nan")])])

    assert svg.count("<rect") == 1
    assert "n/a" in svg
    assert "no data" in bar_chart("t", [], [])
    assert "no data" in histogram("t", [])
    assert ">3<" in histogram("t", [1.0, 1.0, 1.0])
