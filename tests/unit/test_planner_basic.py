"""The basic planner: equal split in lot steps, coded exclusions and rejections, determinism."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orch_worker.domain import ids
from orch_worker.domain.config import OrchConfig
from orch_worker.domain.models import AccountState
from orch_worker.domain.plan import Plan
from orch_worker.domain.planner import PlanContext, margin_for, plan_signal, round_to_step
from tests import factories as f

RICH = "1000000000"


def accounts(n: int = 3, **kw: Any) -> dict[str, AccountState]:
    return {f"ACC-{i}": f.account(f"ACC-{i}", **kw) for i in range(1, n + 1)}


def plan(
    quantity: str = "1.00",
    n: int = 3,
    states: dict[str, AccountState] | None = None,
    paused: frozenset[str] = frozenset(),
    cfg: OrchConfig | None = None,
    **signal_kw: Any,
) -> Plan:
    return plan_signal(
        f.signal(quantity=quantity, **signal_kw),
        accounts(n) if states is None else states,
        cfg or f.config(n_accounts=n),
        PlanContext(paused_accounts=paused),
    )


def with_instrument(cfg: OrchConfig, **fields: str) -> OrchConfig:
    inst = cfg.instruments["EURUSD"].model_copy(update={k: Decimal(v) for k, v in fields.items()})
    return cfg.model_copy(update={"instruments": {"EURUSD": inst}})


def shares(p: Plan) -> dict[str, str]:
    return {a.account_id: str(a.quantity) for a in p.allocations}


def reasons(p: Plan) -> dict[str, tuple[str, ...]]:
    return {e.account_id: e.reasons for e in p.exclusions}


# --- the split ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantity", "n", "expected"),
    [
        ("1.01", 2, ["0.51", "0.50"]),
        ("0.05", 3, ["0.02", "0.02", "0.01"]),
        ("1.00", 3, ["0.34", "0.33", "0.33"]),
        ("0.90", 3, ["0.30", "0.30", "0.30"]),
        ("1.02", 4, ["0.26", "0.26", "0.25", "0.25"]),
        ("1.009", 2, ["0.50", "0.50"]),  # sub-step remainder is dropped, never rounded up
    ],
)
def test_equal_split_rounds_to_lot_step_with_remainder_lots_to_the_first_accounts(
    quantity: str, n: int, expected: list[str]
) -> None:
    p = plan(quantity, n)

    assert p.rejected_reason is None
    assert p.method == "equal"
    assert list(shares(p).values()) == expected
    assert list(shares(p)) == [f"ACC-{i}" for i in range(1, n + 1)]


def test_remainder_lots_follow_sorted_account_ids_not_numeric_order() -> None:
    # "ACC-10" sorts before "ACC-2": the rule is the plain sorted order of the ids.
    p = plan("0.12", 11, states=accounts(11))

    assert [a for a, q in shares(p).items() if q == "0.02"] == ["ACC-1"]
    assert shares(p)["ACC-10"] == "0.01"
    assert list(shares(p))[:3] == ["ACC-1", "ACC-10", "ACC-11"]


def test_fewer_lots_than_accounts_go_one_lot_each_to_the_first_accounts() -> None:
    p = plan("0.02", 3)

    assert shares(p) == {"ACC-1": "0.01", "ACC-2": "0.01"}
    assert reasons(p) == {"ACC-3": ("BELOW_MIN_QUANTITY: share=0.00 min=0.01",)}


def test_share_is_capped_at_the_instrument_max_quantity() -> None:
    p = plan("150", 2, states=accounts(2, margin_available=RICH))

    assert [a.quantity for a in p.allocations] == [Decimal(50), Decimal(50)]
    assert p.planned_total == Decimal("100")
    assert p.requested == Decimal("150")


def test_round_to_step_rounds_down() -> None:
    assert round_to_step(Decimal("0.5099"), Decimal("0.01")) == Decimal("0.50")
    assert round_to_step(Decimal("7"), Decimal("2.5")) == Decimal("5.0")


def test_allocation_carries_the_numbers_that_sized_it() -> None:
    p = plan("1.00", 2)
    a = p.allocations[0]

    assert a.broker == "paper"
    assert {k: a.numbers[k] for k in ("share", "margin", "margin_available", "equity")} == {
        "share": "0.50",
        "margin": "1831.50",  # 0.50 * 100000 * 1.1000 * 0.0333
        "margin_available": "90000",
        "equity": "100000",
    }
    assert a.numbers["method"] == "equal"
    assert a.numbers["capped_by"] is None
    assert "equal split of 1.00 over 2 accounts" in a.rationale


@settings(max_examples=200, deadline=None)
@given(
    lots=st.integers(min_value=1, max_value=20_000),
    extra=st.integers(min_value=0, max_value=9),
    n=st.integers(min_value=1, max_value=12),
)
def test_total_never_exceeds_requested_and_only_whole_lots_are_dropped(
    lots: int, extra: int, n: int
) -> None:
    # quantity = lots * 0.01 plus a sub-step tail of extra * 0.001
    quantity = Decimal(lots) / 100 + Decimal(extra) / 1000
    p = plan(str(quantity), n, states=accounts(n, margin_available=RICH))

    step, max_lots = Decimal("0.01"), 5000  # max_quantity 50 in 0.01 lots
    qs = [a.quantity for a in p.allocations]
    assert p.rejected_reason is None
    assert p.planned_total <= quantity
    assert p.planned_total == min(lots, n * max_lots) * step
    assert all(q % step == 0 and Decimal("0.01") <= q <= Decimal(50) for q in qs)
    assert max(qs) - min(qs) <= step
    assert qs == sorted(qs, reverse=True)  # the extra lots sit with the first accounts
    assert [a.account_id for a in p.allocations] == sorted(a.account_id for a in p.allocations)


@settings(max_examples=100, deadline=None)
@given(
    quantity=st.decimals(
        min_value=Decimal("0.001"), max_value=Decimal(500), places=3, allow_nan=False
    ),
    n=st.integers(min_value=1, max_value=8),
    margins=st.lists(st.integers(min_value=0, max_value=200_000), min_size=8, max_size=8),
)
def test_every_allocation_fits_its_account_margin_and_the_total_fits_the_request(
    quantity: Decimal, n: int, margins: list[int]
) -> None:
    states = {
        f"ACC-{i}": f.account(f"ACC-{i}", margin_available=str(margins[i - 1]))
        for i in range(1, n + 1)
    }
    cfg = f.config(n_accounts=n)
    p = plan(str(quantity), n, states=states, cfg=cfg)

    inst = cfg.instruments["EURUSD"]
    assert p.planned_total <= quantity
    for a in p.allocations:
        assert (
            margin_for(a.quantity, Decimal("1.1000"), inst) <= states[a.account_id].margin_available
        )
    allocated = {a.account_id for a in p.allocations}
    excluded = {e.account_id for e in p.exclusions}
    assert allocated | excluded == set(states)
    assert not allocated & excluded
    assert all(e.reasons for e in p.exclusions)


# --- exclusions --------------------------------------------------------------------------------


def test_account_without_state_is_excluded_with_no_account_state() -> None:
    states = accounts(3)
    del states["ACC-2"]

    p = plan(states=states)

    assert reasons(p) == {"ACC-2": ("NO_ACCOUNT_STATE: no state received for this account",)}
    assert shares(p) == {"ACC-1": "0.50", "ACC-3": "0.50"}


@pytest.mark.parametrize("status", ["suspended", "disabled"])
def test_inactive_account_is_excluded_with_its_status(status: str) -> None:
    states = {**accounts(3), "ACC-3": f.account("ACC-3", status=status)}

    p = plan(states=states)

    assert reasons(p) == {"ACC-3": (f"STATUS: status={status}",)}
    assert set(shares(p)) == {"ACC-1", "ACC-2"}


def test_paused_account_is_excluded_as_paused() -> None:
    p = plan(paused=frozenset({"ACC-1"}))

    assert reasons(p) == {"ACC-1": ("PAUSED: paused by a control command",)}
    assert shares(p) == {"ACC-2": "0.50", "ACC-3": "0.50"}


def test_account_state_from_another_portfolio_is_excluded() -> None:
    states = {**accounts(3), "ACC-2": f.account("ACC-2", portfolio="other")}

    p = plan(states=states)

    assert reasons(p)["ACC-2"][0].startswith("PORTFOLIO_MISMATCH")


def test_an_account_excluded_for_several_reasons_lists_them_all() -> None:
    states = {**accounts(3), "ACC-2": f.account("ACC-2", status="suspended")}

    p = plan(states=states, paused=frozenset({"ACC-2"}))

    assert reasons(p)["ACC-2"] == (
        "STATUS: status=suspended",
        "PAUSED: paused by a control command",
    )


def test_account_short_of_margin_for_even_the_minimum_is_excluded_with_the_numbers() -> None:
    states = {**accounts(3), "ACC-1": f.account("ACC-1", margin_available="30")}

    p = plan(states=states)

    # one 0.01 lot of EURUSD at 1.1000 needs 0.01 * 100000 * 1.1 * 0.0333 = 36.63 > 30
    assert reasons(p) == {
        "ACC-1": ("INSUFFICIENT_MARGIN: needed=36.63 left=30.00 available=30.00 quantity=0.01",)
    }
    assert shares(p) == {"ACC-2": "0.50", "ACC-3": "0.50"}


def test_account_short_of_margin_for_its_share_is_capped_and_the_rest_resplit() -> None:
    states = {**accounts(3), "ACC-1": f.account("ACC-1", margin_available="1000")}

    p = plan(states=states)

    # 1000 / 36.63 per lot = 27 lots; the 73 it cannot take split 36.5 / 36.5, the remainder
    # lot to the first of the tied largest shares
    assert reasons(p) == {}
    assert shares(p) == {"ACC-1": "0.27", "ACC-2": "0.37", "ACC-3": "0.36"}
    assert p.allocations[0].numbers["capped_by"] == "INSUFFICIENT_MARGIN"


def test_resplit_that_raises_a_share_past_another_accounts_margin_caps_it_too() -> None:
    # ACC-1 fits 27 lots (1000 / 36.63); the other two would then take 36.5 each, but ACC-2
    # fits only 30 (1100 / 36.63), so the 43 lots left after both caps go to ACC-3.
    states = {
        **accounts(3),
        "ACC-1": f.account("ACC-1", margin_available="1000"),
        "ACC-2": f.account("ACC-2", margin_available="1100"),
    }

    p = plan(states=states)

    assert reasons(p) == {}
    assert shares(p) == {"ACC-1": "0.27", "ACC-2": "0.30", "ACC-3": "0.43"}
    assert p.planned_total == Decimal("1.00")


def test_share_below_the_instrument_minimum_is_excluded_with_the_numbers() -> None:
    cfg = with_instrument(f.config(n_accounts=3), min_quantity="0.27")

    p = plan("0.80", states=accounts(3), cfg=cfg)

    # 80 lots: 27/27/26, ACC-3's 0.26 < 0.27; re-split 40/40 over the other two.
    assert reasons(p) == {"ACC-3": ("BELOW_MIN_QUANTITY: share=0.26 min=0.27",)}
    assert shares(p) == {"ACC-1": "0.40", "ACC-2": "0.40"}


def test_quantity_one_account_could_take_is_not_rejected_for_being_split_too_thin() -> None:
    cfg = with_instrument(f.config(n_accounts=2), min_quantity="0.10")

    p = plan("0.15", states=accounts(2), cfg=cfg)

    assert p.rejected_reason is None
    assert p.planned_total >= Decimal("0.10")


def test_excluded_accounts_are_listed_in_id_order() -> None:
    states = accounts(4)
    del states["ACC-3"]
    del states["ACC-1"]

    p = plan(n=4, states=states)

    assert [e.account_id for e in p.exclusions] == ["ACC-1", "ACC-3"]


def test_accounts_outside_the_portfolio_config_are_ignored() -> None:
    states = {**accounts(2), "ACC-X": f.account("ACC-X")}

    p = plan(n=2, states=states)

    assert set(shares(p)) == {"ACC-1", "ACC-2"}
    assert "ACC-X" not in reasons(p)


# --- rejections --------------------------------------------------------------------------------


def test_unknown_symbol_is_rejected() -> None:
    p = plan(symbol="GBPJPY")

    assert p.rejected_reason == "UNKNOWN_SYMBOL: no instrument configured for GBPJPY"
    assert p.allocations == ()
    assert p.method == "none"


def test_unknown_portfolio_is_rejected() -> None:
    p = plan(portfolio="nowhere")

    assert p.rejected_reason is not None
    assert p.rejected_reason.startswith("UNKNOWN_PORTFOLIO")


def test_signal_without_quantity_is_rejected_for_an_equal_split_portfolio() -> None:
    p = plan_signal(
        f.signal().model_copy(update={"quantity": None}), accounts(), f.config(), PlanContext()
    )

    assert p.rejected_reason is not None
    assert p.rejected_reason.startswith("NO_QUANTITY")
    assert p.requested == 0


def test_signal_without_any_price_is_rejected() -> None:
    p = plan(reference_price=None, stop_loss=None)

    assert p.rejected_reason is not None
    assert p.rejected_reason.startswith("NO_PRICE")


def test_no_eligible_account_is_rejected_keeping_every_exclusion() -> None:
    states = {
        "ACC-1": f.account("ACC-1", status="disabled"),
        "ACC-2": f.account("ACC-2", margin_available="10"),
    }

    p = plan(states=states)

    assert p.rejected_reason == "NO_ELIGIBLE_ACCOUNT: every account was excluded"
    assert p.allocations == ()
    assert [e.reasons[0].split(":")[0] for e in p.exclusions] == [
        "STATUS",
        "INSUFFICIENT_MARGIN",
        "NO_ACCOUNT_STATE",
    ]
    assert p.requested == Decimal("1.00")


def test_quantity_below_one_lot_is_rejected() -> None:
    p = plan("0.009")

    assert p.rejected_reason is not None
    assert p.rejected_reason.startswith("NO_ELIGIBLE_ACCOUNT")
    assert {r[0].split(":")[0] for r in reasons(p).values()} == {"BELOW_MIN_QUANTITY"}


# --- determinism -------------------------------------------------------------------------------


def test_same_inputs_give_the_same_plan() -> None:
    states = {**accounts(3), "ACC-2": f.account("ACC-2", status="suspended")}

    first = plan("1.01", states=states)
    second = plan("1.01", states=dict(reversed(list(states.items()))))

    assert first == second
    assert first.plan_id == ids.plan_id("sig-1")


def test_plan_id_depends_on_the_signal_only() -> None:
    assert plan(signal_id="sig-A").plan_id == plan("2.00", signal_id="sig-A").plan_id
    assert plan(signal_id="sig-A").plan_id != plan(signal_id="sig-B").plan_id


def test_ids_are_stable_uuid5_of_their_inputs() -> None:
    assert ids.intent_id("s", "A", 1) == ids.intent_id("s", "A", 1, "initial")
    assert (
        len(
            {
                ids.intent_id("s", "A", 1),
                ids.intent_id("s", "A", 2),
                ids.intent_id("s", "B", 1),
                ids.intent_id("s", "A", 1, "cancel"),
            }
        )
        == 4
    )
    assert ids.seed_for("sig-1") == ids.seed_for("sig-1") != ids.seed_for("sig-2")
    assert ids.plan_id("sig-1") == "90dea9b6-cd75-59eb-84dc-9c8d1dc3762c"
