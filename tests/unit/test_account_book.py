"""The AccountBook keeps each portfolio's columns current, and plans the same as a plain dict."""

from __future__ import annotations

from decimal import Decimal

from orch_worker.domain.book import AccountBook, PortfolioColumns
from orch_worker.domain.planner import PlanContext, plan_signal
from tests.unit.planning_helpers import config, signal, state


def test_book_is_a_mapping_of_the_latest_state_per_account() -> None:
    cfg = config(2)
    book = AccountBook(cfg, [state("ACC-1"), state("ACC-2")])

    book.update(state("ACC-1", equity="5000"))

    assert set(book) == {"ACC-1", "ACC-2"}
    assert len(book) == 2
    assert book["ACC-1"].equity == Decimal(5000)
    assert book.columns("demo").equity.tolist() == [5000.0, 100000.0]


def test_a_new_state_replaces_the_old_positions_entirely() -> None:
    cfg = config(1)
    book = AccountBook(cfg, [state("ACC-1", positions=(("EURUSD", "1.00", "1.10"),))])

    book.update(state("ACC-1", positions=(("GBPUSD", "-2.00", "1.27"),)))

    cols = book.columns("demo")
    assert cols.symbols == ("EURUSD", "GBPUSD")
    assert cols.qty.tolist() == [[0.0, -2.0]]
    assert cols.open_positions.tolist() == [1]
    assert cols.long_risk.tolist() == [[0.0, 0.0]]
    assert cols.short_risk[0, 1] == 2 * 100000 * 1.27 / 100


def test_discarded_account_plans_as_having_no_state() -> None:
    cfg = config(2)
    book = AccountBook(cfg, [state("ACC-1"), state("ACC-2")])

    book.discard("ACC-2")
    p = plan_signal(signal(), book, cfg, PlanContext())

    assert "ACC-2" not in book
    assert [(e.account_id, e.reasons[0].split(":")[0]) for e in p.exclusions] == [
        ("ACC-2", "NO_ACCOUNT_STATE")
    ]


def test_states_of_unconfigured_accounts_are_kept_but_never_planned() -> None:
    cfg = config(1)
    book = AccountBook(cfg, [state("ACC-1"), state("STRAY")])

    p = plan_signal(signal(), book, cfg, PlanContext())

    assert "STRAY" in book
    assert [a.account_id for a in p.allocations] == ["ACC-1"]


def test_book_and_dict_give_the_same_plan() -> None:
    cfg = config(3, allocation="equity", rules={"max_daily_loss_pct": "5"}, max_accounts=2)
    states = [
        state("ACC-1", equity="50000", day_start_equity="52000"),
        state("ACC-2", equity="90000", positions=(("GBPUSD", "1.00", "1.27"),)),
        state("ACC-3", equity="70000"),
    ]

    from_book = plan_signal(signal("2.00"), AccountBook(cfg, states), cfg, PlanContext())
    from_dict = plan_signal(signal("2.00"), {s.account_id: s for s in states}, cfg, PlanContext())

    assert from_book == from_dict
    assert from_book.alternatives == from_dict.alternatives


def test_columns_built_from_a_mapping_match_the_books() -> None:
    cfg = config({"ACC-1": {}, "ACC-2": {"initial_balance": "80000"}})
    states = {
        "ACC-1": state("ACC-1", balance="90000", positions=(("EURUSD", "0.50", "1.1"),)),
        "ACC-2": state("ACC-2"),
    }

    built = PortfolioColumns.build(cfg, "demo", states)
    kept = AccountBook(cfg, states.values()).columns("demo")

    for name in ("equity", "balance", "margin_available", "drawdown_base", "qty", "long_risk"):
        assert getattr(built, name).tolist() == getattr(kept, name).tolist(), name
    assert built.drawdown_base.tolist() == [90000.0, 80000.0]
