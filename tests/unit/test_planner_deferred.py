"""A plan's allocations and exclusions are written when first read: the deferred plan is the same
plan -- same fields, same JSON, same equality -- and it is the plan of the account states as they
were when it was made, whatever the book receives in between."""

from __future__ import annotations

import pickle
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orch_worker.domain.book import AccountBook
from orch_worker.domain.config import OrchConfig
from orch_worker.domain.coordinator import SignalState
from orch_worker.domain.models import AccountState, ResultStatus
from orch_worker.domain.plan import (
    Allocation,
    Exclusion,
    Plan,
    trusted_allocation,
    trusted_exclusion,
)
from orch_worker.domain.planner import PlanContext, plan_signal
from tests.unit.planning_helpers import config, signal, state
from tests.unit.test_planner_properties import Case, account_st, case_st

RULES = {"max_daily_loss_pct": "5", "risk_per_trade_pct": "1", "max_open_positions": 1}


def portfolio() -> tuple[list[AccountState], OrchConfig]:
    cfg = config(5, allocation="equity", rules=RULES)
    states = [
        state("ACC-1", equity="50000", day_start_equity="52000"),
        state("ACC-2", equity="90000", margin_available="20"),  # short of margin
        state("ACC-3", equity="70000", status="suspended"),
        state("ACC-4", equity="30000", positions=(("GBPUSD", "1.00", "1.27"),)),  # at its max
        state("ACC-5", equity="80000"),
    ]
    return states, cfg


def eager(p: Plan) -> Plan:
    """The same plan built the ordinary, validated way."""
    return Plan.model_validate(p.model_dump())


def test_deferred_plan_is_equal_to_the_validated_plan_and_dumps_the_same_json() -> None:
    states, cfg = portfolio()
    p = plan_signal(signal("3.00"), AccountBook(cfg, states), cfg, PlanContext())

    built = eager(p)

    assert p == built
    assert p.model_dump(mode="json") == built.model_dump(mode="json")
    assert p.model_dump_json() == built.model_dump_json()  # the same field order too
    assert list(p.model_dump()) == list(Plan.model_fields)
    assert [e.account_id for e in p.exclusions] == ["ACC-2", "ACC-3", "ACC-4"]
    assert len(p.allocations) == 2


def test_planned_total_needs_no_allocations_written_and_is_their_sum() -> None:
    states, cfg = portfolio()
    p = plan_signal(signal("3.00"), AccountBook(cfg, states), cfg, PlanContext())

    total = p.planned_total

    assert "allocations" not in p.__dict__
    assert total == sum((a.quantity for a in p.allocations), start=Decimal(0))
    assert str(total) == str(eager(p).planned_total)


def test_a_plan_read_after_the_book_changed_is_the_plan_of_the_states_it_was_made_from() -> None:
    states, cfg = portfolio()
    book = AccountBook(cfg, states)
    before = {s.account_id: s for s in states}
    p = plan_signal(signal("3.00"), book, cfg, PlanContext())

    book.update(state("ACC-1", equity="1000", margin_available="1"))
    book.update(state("ACC-2", equity="90000"))  # margin back
    book.update(state("ACC-3", equity="70000"))  # active again
    book.discard("ACC-5")

    assert p == plan_signal(signal("3.00"), before, cfg, PlanContext())
    assert [e.account_id for e in p.exclusions] == ["ACC-2", "ACC-3", "ACC-4"]
    assert p.exclusions[1].reasons == ("STATUS: status=suspended",)
    assert "ACC-5" in {a.account_id for a in p.allocations}


def test_planning_after_an_update_sees_the_update() -> None:
    states, cfg = portfolio()
    book = AccountBook(cfg, states)
    plan_signal(signal("3.00"), book, cfg, PlanContext())  # memoises what it can

    book.update(state("ACC-3", equity="70000"))
    book.update(state("ACC-5", equity="80000", margin_available="10"))
    now = {s.account_id: book[s.account_id] for s in states}
    p = plan_signal(signal("3.00"), book, cfg, PlanContext())

    assert p == plan_signal(signal("3.00"), now, cfg, PlanContext())
    assert [e.account_id for e in p.exclusions] == ["ACC-2", "ACC-4", "ACC-5"]


def test_a_rejected_plan_keeps_its_deferred_exclusions() -> None:
    states, cfg = portfolio()
    dead = [s.model_copy(update={"margin_available": Decimal(0)}) for s in states]
    p = plan_signal(signal("3.00"), AccountBook(cfg, dead), cfg, PlanContext())

    assert p.rejected_reason == "NO_ELIGIBLE_ACCOUNT: every account was excluded"
    assert p.allocations == ()
    assert p.planned_total == Decimal(0)
    assert [e.account_id for e in p.exclusions] == [s.account_id for s in states]
    assert p == eager(p)


def test_a_deferred_plan_inside_the_coordinators_state_dumps_like_an_eager_one() -> None:
    states, cfg = portfolio()
    sig = signal("3.00")
    p = plan_signal(sig, AccountBook(cfg, states), cfg, PlanContext())
    built = eager(p)  # (writes p; a fresh deferred plan is dumped below)
    fresh = plan_signal(sig, AccountBook(cfg, states), cfg, PlanContext())

    lazy_state = SignalState(signal=sig, plan=fresh, status=ResultStatus.PLANNED)
    eager_state = SignalState(signal=sig, plan=built, status=ResultStatus.PLANNED)

    assert lazy_state.model_dump(mode="json") == eager_state.model_dump(mode="json")
    assert SignalState.model_validate(lazy_state.model_dump(mode="json")) == eager_state


def test_repr_iteration_and_pickling_see_the_written_plan() -> None:
    states, cfg = portfolio()
    p = plan_signal(signal("3.00"), AccountBook(cfg, states), cfg, PlanContext())
    q = plan_signal(signal("3.00"), AccountBook(cfg, states), cfg, PlanContext())
    r = plan_signal(signal("3.00"), AccountBook(cfg, states), cfg, PlanContext())

    assert "allocations=(Allocation(" in repr(p)
    assert dict(q)["exclusions"] == eager(q).exclusions
    assert pickle.loads(pickle.dumps(r)) == eager(r)  # noqa: S301 (our own bytes)


def test_trusted_rows_equal_validated_rows() -> None:
    numbers = {"share": "0.10", "capped_by": None, "remainder_lot": True}
    a = trusted_allocation("ACC-1", "paper", Decimal("0.10"), "why", dict(numbers))
    e = trusted_exclusion("ACC-2", ("STATUS: status=suspended",))

    assert a == Allocation(
        account_id="ACC-1",
        broker="paper",
        quantity=Decimal("0.10"),
        rationale="why",
        numbers=numbers,
    )
    assert e == Exclusion(account_id="ACC-2", reasons=("STATUS: status=suspended",))
    assert a.model_dump_json() == Allocation.model_validate(a.model_dump()).model_dump_json()
    assert a.model_fields_set == set(Allocation.model_fields)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case_st(), st.data())
def test_any_plan_is_the_plan_of_its_states_whatever_the_book_receives_after(
    case: Case, data: st.DataObject
) -> None:
    book = AccountBook(case.cfg, case.accounts.values())
    first = plan_signal(case.sig, book, case.cfg, case.ctx)
    ids = sorted(case.accounts)
    # Other states for the same accounts, drawn like the case's own.
    for a in data.draw(st.lists(st.sampled_from(ids), max_size=len(ids), unique=True)):
        new, _ = data.draw(account_st(a))
        book.update(new)
    if data.draw(st.booleans()):
        book.discard(data.draw(st.sampled_from(ids)))
    second = plan_signal(case.sig, book, case.cfg, case.ctx)

    assert first == plan_signal(case.sig, case.accounts, case.cfg, case.ctx)
    assert second == plan_signal(case.sig, dict(book), case.cfg, case.ctx)
