"""Properties of the planner over random portfolios, random rules and random signals.

* no account exceeds any of its limits after the plan -- checked here in exact Decimal
  arithmetic, independently of the planner's numpy code;
* the total never exceeds the requested quantity;
* every account is allocated, excluded with reasons, or ranked as an alternative;
* the same inputs give the same plan, whatever the order of the account states and whether
  they come as a dict or as an `AccountBook`.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from orch_worker.domain.book import AccountBook
from orch_worker.domain.config import OrchConfig, RulesConfig
from orch_worker.domain.correlation import CorrelationMatrix
from orch_worker.domain.models import AccountState, Signal
from orch_worker.domain.plan import Plan
from orch_worker.domain.planner import PlanContext, plan_signal
from tests.unit.planning_helpers import EURUSD, GBPUSD, config, signal, state

INSTRUMENTS = {
    "EURUSD": EURUSD,
    "GBPUSD": GBPUSD,
    "XAUUSD": {
        "value_per_unit": "100",
        "lot_step": "0.01",
        "min_quantity": "0.01",
        "max_quantity": "20",
        "margin_rate": "0.05",
        "risk_proxy_pct": "2",
    },
}
PRICES = {"EURUSD": Decimal("1.1000"), "GBPUSD": Decimal("1.2700"), "XAUUSD": Decimal("2650.00")}
CORRELATIONS = {"EURUSD/GBPUSD": 0.85, "EURUSD/XAUUSD": -0.3}
METHODS = ["equal", "ratio", "equity", "available_margin", "risk"]


def money(lo: int, hi: int) -> st.SearchStrategy[Decimal]:
    return st.builds(
        lambda units, cents: Decimal(units) + Decimal(cents) / 100,
        st.integers(lo, hi - 1),
        st.integers(0, 99),
    )


def one_of_values(*values: str) -> st.SearchStrategy[Decimal]:
    """Typical values and the extremes, so that limits both bind and stay slack."""
    return st.sampled_from([Decimal(v) for v in values])


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


def rarely() -> st.SearchStrategy[bool]:
    return st.sampled_from([False] * 9 + [True])


rules_st = st.fixed_dictionaries(
    {},
    optional={
        "risk_per_trade_pct": one_of_values("1", "5", "0.5", "2", "0.01"),
        "daily_risk_budget_pct": one_of_values("5", "10", "2", "0.05"),
        "max_daily_loss_pct": one_of_values("5", "10", "2", "0.5"),
        "max_drawdown_pct": one_of_values("10", "20", "5", "1"),
        "drawdown_mode": st.sampled_from(["static", "trailing"]),
        "max_open_positions": st.integers(0, 4),
        "min_free_margin": one_of_values("100", "0", "500", "20000"),
        "max_margin_use_pct": one_of_values("50", "100", "30", "1"),
        "max_quantity_per_symbol": one_of_values("8", "2", "1.5", "0.3", "0.01"),
        "max_correlated_risk_pct": one_of_values("3", "6", "1", "0.2"),
        "hedging_allowed": st.booleans(),
    },
)

position_st = st.tuples(
    st.sampled_from(["EURUSD", "GBPUSD", "XAUUSD", "USDJPY"]),
    one_of_values("0.3", "-0.5", "1.5", "-2", "0", "0.01", "-0.01", "3"),
)


@st.composite
def account_st(draw: st.DrawFn, account_id: str) -> tuple[AccountState, dict[str, Any]]:
    equity = draw(one_of_values("100000", "400000", "50000", "5000", "500")) + draw(money(0, 999))

    def share_of_equity(*shares: str) -> Decimal:
        return (equity * draw(one_of_values(*shares))).quantize(Decimal("0.01"))

    day_start = max(Decimal(1), equity + share_of_equity("-0.06", "-0.02", "0", "0.01", "0.05"))
    balance = max(Decimal(1), equity + share_of_equity("-0.1", "0", "0.03"))
    peak = max(equity, balance) + share_of_equity("0", "0.02", "0.15")
    positions = tuple(
        (sym, str(q), str(PRICES.get(sym, Decimal(150))))
        for sym, q in draw(st.lists(position_st, max_size=2, unique_by=lambda p: p[0]))
    )
    s = state(
        account_id,
        equity=str(equity),
        balance=str(balance),
        day_start_equity=str(day_start),
        peak_equity=str(peak),
        margin_available=str(share_of_equity("0.95", "0.6", "0.2", "0.01", "-0.001")),
        margin_used=str(share_of_equity("0", "0", "0.1", "0.4")),
        status=draw(st.sampled_from(["active"] * 8 + ["suspended", "disabled"])),
        positions=positions,
    )
    extra: dict[str, Any] = {"ratio": str(draw(st.integers(1, 5)))}
    if draw(rarely()):
        extra["rules"] = draw(rules_st)
    if draw(rarely()):
        extra["initial_balance"] = str(draw(money(1000, 400_000)))
    return s, extra


@dataclass(frozen=True)
class Case:
    cfg: OrchConfig
    accounts: dict[str, AccountState]
    sig: Signal
    ctx: PlanContext


@st.composite
def case_st(draw: st.DrawFn) -> Case:
    n = draw(st.integers(1, 6))
    ids = [f"ACC-{i}" for i in range(1, n + 1)]
    drawn = [draw(account_st(a)) for a in ids]
    method = draw(st.sampled_from(METHODS))
    portfolio: dict[str, Any] = {
        "cross_account_hedging_allowed": draw(st.booleans()),
        "max_accounts": draw(maybe(st.integers(1, n))),
        "max_cluster_risk_share": draw(maybe(st.sampled_from([0.8, 1.0, 0.5, 0.2]))),
    }
    rules = draw(rules_st)
    if method == "risk":
        rules.setdefault("risk_per_trade_pct", draw(one_of_values("0.1", "0.5", "2")))
    cfg = config(
        {a: extra for a, (_, extra) in zip(ids, drawn, strict=True)},
        allocation=method,
        rules=rules,
        instruments=INSTRUMENTS,
        correlations=CORRELATIONS,
        **portfolio,
    )
    symbol = draw(st.sampled_from(list(PRICES)))
    side = draw(st.sampled_from(["buy", "sell"]))
    price = PRICES[symbol]
    distance = price * draw(one_of_values("0.005", "0.002", "0.02", "0.0005", "0.05"))
    stop = price - distance if side == "buy" else price + distance
    quantity = draw(st.integers(1, 60_000).map(lambda n: Decimal(n) / 1000))
    sig = signal(
        None if method == "risk" and draw(st.booleans()) else str(quantity),
        symbol=symbol,
        side=side,
        reference_price=str(price),
        stop_loss=str(stop.quantize(Decimal("0.00001"))),
    )
    used = {a: draw(money(0, 3000)) for a in ids if draw(st.booleans())}
    ctx = PlanContext(
        paused_accounts=frozenset(a for a in ids if draw(rarely())),
        cooldown_accounts=frozenset(a for a in ids if draw(rarely())),
        risk_used_today=used,
        health={a: draw(st.floats(0, 1)) for a in ids if draw(st.booleans())},
        rotation=draw(st.integers(0, 10)),
    )
    return Case(cfg, {s.account_id: s for s, _ in drawn}, sig, ctx)


def _correlated_open(s: AccountState, sig: Signal, cfg: OrchConfig) -> float:
    m = CorrelationMatrix.from_config(cfg)
    total = 0.0
    for p in s.positions:
        if p.symbol not in cfg.instruments or p.quantity == 0:
            continue
        inst = cfg.instruments[p.symbol]
        risk = abs(p.quantity) * inst.value_per_unit * p.avg_price * inst.risk_proxy_pct / 100
        sign = 1 if p.quantity > 0 else -1
        weight = m.get(sig.symbol, p.symbol) * sign * sig.side.sign
        total += max(0.0, weight) * float(risk)
    return total


def _order(case: Case, q: Decimal) -> tuple[Decimal, Decimal]:
    """Margin and stop-loss risk of `q` of the signal's order."""
    sig = case.sig
    inst = case.cfg.instruments[sig.symbol]
    entry, stop = sig.entry_price, sig.stop_loss
    assert entry is not None
    assert stop is not None
    margin = q * inst.value_per_unit * entry * inst.margin_rate
    return margin, q * inst.value_per_unit * abs(entry - stop)


def _money_breaches(case: Case, account_id: str, q: Decimal) -> list[str]:
    s = case.accounts[account_id]
    rules = case.cfg.rules_for(account_id)
    margin, risk = _order(case, q)
    checks = {
        "free margin": margin > s.margin_available - (rules.min_free_margin or 0),
        "margin use": rules.max_margin_use_pct is not None
        and s.margin_used + margin > s.equity * rules.max_margin_use_pct / 100,
        "risk per trade": rules.risk_per_trade_pct is not None
        and risk > s.equity * rules.risk_per_trade_pct / 100,
        "daily risk budget": rules.daily_risk_budget_pct is not None
        and case.ctx.risk_used_today.get(account_id, Decimal(0)) + risk
        > s.day_start_equity * rules.daily_risk_budget_pct / 100,
        "daily loss": rules.max_daily_loss_pct is not None
        and s.day_start_equity - s.equity + risk
        > s.day_start_equity * rules.max_daily_loss_pct / 100,
        "correlated exposure": rules.max_correlated_risk_pct is not None
        and float(risk) + _correlated_open(s, case.sig, case.cfg)
        > float(s.equity * rules.max_correlated_risk_pct / 100) + 1e-6,
    }
    if rules.max_drawdown_pct is not None:
        if rules.drawdown_mode == "trailing":
            base = s.peak_equity
        else:
            base = case.cfg.accounts[account_id].initial_balance or s.balance
        checks["drawdown"] = s.equity - risk < base * (1 - rules.max_drawdown_pct / 100)
    return [name for name, broken in checks.items() if broken]


def _position_breaches(case: Case, account_id: str, q: Decimal) -> list[str]:
    s, sig = case.accounts[account_id], case.sig
    rules: RulesConfig = case.cfg.rules_for(account_id)
    inst = case.cfg.instruments[sig.symbol]
    held = s.position(sig.symbol)
    opens = sum(1 for p in s.positions if p.quantity != 0)
    checks = {
        "instrument quantity": q % inst.lot_step != 0
        or not inst.min_quantity <= q <= inst.max_quantity,
        "status or paused": s.status.value != "active" or account_id in case.ctx.paused_accounts,
        "cooldown": account_id in case.ctx.cooldown_accounts,
        # The position may not end beyond the maximum on the side the order pushes it to; an
        # order that only reduces a position already over the maximum is allowed.
        "quantity per symbol": rules.max_quantity_per_symbol is not None
        and sig.side.sign * (held + sig.side.sign * q) > rules.max_quantity_per_symbol,
        "hedging": held * sig.side.sign < 0 and not rules.hedging_allowed,
        "open positions": rules.max_open_positions is not None
        and held == 0
        and opens >= rules.max_open_positions,
    }
    return [name for name, broken in checks.items() if broken]


def violations(case: Case, account_id: str, q: Decimal) -> list[str]:
    """Every rule the allocation of `q` to `account_id` breaks, in exact arithmetic."""
    return _position_breaches(case, account_id, q) + _money_breaches(case, account_id, q)


def cross_hedged(case: Case, account_id: str) -> bool:
    return any(
        s.position(case.sig.symbol) * case.sig.side.sign < 0
        for a, s in case.accounts.items()
        if a != account_id
    )


def plan_of(case: Case, accounts: Any = None) -> Plan:
    return plan_signal(
        case.sig, case.accounts if accounts is None else accounts, case.cfg, case.ctx
    )


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(case_st())
def test_no_account_exceeds_any_of_its_limits(case: Case) -> None:
    p = plan_of(case)
    event(f"planned {min(len(p.allocations), 3)}+ accounts" if p.allocations else "rejected")
    for a in p.allocations:
        event(f"capped by {a.numbers['capped_by']}")

    for a in p.allocations:
        assert violations(case, a.account_id, a.quantity) == [], a
        pf = case.cfg.portfolios["demo"]
        if not pf.cross_account_hedging_allowed:
            assert not cross_hedged(case, a.account_id)


@SETTINGS
@given(case_st())
def test_the_total_never_exceeds_the_request(case: Case) -> None:
    p = plan_of(case)

    assert p.planned_total <= p.requested
    if case.sig.quantity is not None:
        assert p.requested == case.sig.quantity


@SETTINGS
@given(case_st())
def test_every_account_is_allocated_excluded_or_an_alternative(case: Case) -> None:
    p = plan_of(case)

    allocated = [a.account_id for a in p.allocations]
    excluded = [e.account_id for e in p.exclusions]
    assert len(set(allocated)) == len(allocated)
    assert len(set(excluded)) == len(excluded)
    assert not set(allocated) & set(excluded)
    assert not set(p.alternatives) & (set(allocated) | set(excluded))
    assert all(e.reasons and all(":" in r for r in e.reasons) for e in p.exclusions)
    assert all(a.quantity > 0 and a.numbers for a in p.allocations)
    if p.rejected_reason is None or p.rejected_reason.startswith("NO_ELIGIBLE_ACCOUNT"):
        assert set(allocated) | set(excluded) | set(p.alternatives) == set(case.cfg.accounts)
    if p.rejected_reason is None:
        assert p.allocations


@SETTINGS
@given(case_st())
def test_the_same_inputs_give_the_same_plan(case: Case) -> None:
    first = plan_of(case)
    again = plan_of(case)
    reordered = plan_of(case, dict(reversed(list(case.accounts.items()))))
    book = plan_of(case, AccountBook(case.cfg, case.accounts.values()))

    assert first == again == reordered == book
    assert first.model_dump(mode="json") == book.model_dump(mode="json")


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(2, 9),
    lots=st.integers(1, 3000),
    rotation=st.integers(0, 20),
)
def test_identical_accounts_get_shares_at_most_one_lot_apart(
    n: int, lots: int, rotation: int
) -> None:
    ids = [f"ACC-{i}" for i in range(1, n + 1)]
    accounts = {a: state(a, equity="1000000") for a in ids}
    assume(lots >= n)

    p = plan_signal(
        signal(str(Decimal(lots) / 100)),
        accounts,
        config(ids, allocation="equity"),
        PlanContext(rotation=rotation),
    )

    qs = [a.quantity for a in p.allocations]
    assert len(qs) == n
    assert max(qs) - min(qs) <= Decimal("0.01")
    assert sum(qs) == Decimal(lots) / 100
