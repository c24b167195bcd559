"""Builders shared by the planner tests: configurations with rules, account states with every
number settable, and short views of a plan (shares, reason codes)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from orch_worker.domain.config import OrchConfig
from orch_worker.domain.models import AccountState, Signal
from orch_worker.domain.plan import Plan
from orch_worker.domain.planner import PlanContext, plan_signal
from tests import factories as f

EURUSD: dict[str, Any] = {
    "value_per_unit": "100000",
    "lot_step": "0.01",
    "min_quantity": "0.01",
    "max_quantity": "50",
    "margin_rate": "0.0333",
}
GBPUSD: dict[str, Any] = {**EURUSD, "margin_rate": "0.05"}
SHARES: dict[str, Any] = {
    "value_per_unit": "1",
    "lot_step": "1",
    "min_quantity": "1",
    "max_quantity": "100000",
    "margin_rate": "0.05",
}
"""A stock: whole shares, $1 per $1 move per share."""


def config(
    accounts: int | list[str] | dict[str, dict[str, Any]] = 3,
    *,
    allocation: str = "equal",
    rules: dict[str, Any] | None = None,
    instruments: dict[str, dict[str, Any]] | None = None,
    correlations: dict[str, float] | None = None,
    **portfolio: Any,
) -> OrchConfig:
    if isinstance(accounts, int):
        accounts = [f"ACC-{i}" for i in range(1, accounts + 1)]
    if isinstance(accounts, list):
        accounts = {a: {} for a in accounts}
    return OrchConfig.model_validate(
        {
            "instruments": instruments or {"EURUSD": EURUSD, "GBPUSD": GBPUSD},
            "portfolios": {"demo": {"allocation": allocation, "rules": rules or {}, **portfolio}},
            "accounts": {a: {"portfolio": "demo", **extra} for a, extra in accounts.items()},
            "correlations": correlations or {},
        }
    )


def state(
    account_id: str,
    *,
    equity: str = "100000",
    balance: str | None = None,
    day_start_equity: str | None = None,
    peak_equity: str | None = None,
    margin_available: str | None = None,
    margin_used: str = "0",
    status: str = "active",
    positions: tuple[tuple[str, str, str], ...] = (),
    portfolio: str = "demo",
) -> AccountState:
    """An account state; positions are (symbol, signed quantity, avg_price)."""
    return AccountState.model_validate(
        {
            "account_id": account_id,
            "portfolio": portfolio,
            "broker": "paper",
            "status": status,
            "balance": balance or equity,
            "equity": equity,
            "margin_used": margin_used,
            "margin_available": margin_available or equity,
            "day_start_equity": day_start_equity or equity,
            "peak_equity": peak_equity or equity,
            "positions": [{"symbol": s, "quantity": q, "avg_price": p} for s, q, p in positions],
            "updated_at": f.NOW,
        }
    )


def states(*accounts: AccountState) -> dict[str, AccountState]:
    return {s.account_id: s for s in accounts}


def signal(quantity: str | None = "1.00", **kw: Any) -> Signal:
    sig = f.signal(quantity=quantity or "1", **kw)
    return sig if quantity is not None else sig.model_copy(update={"quantity": None})


def plan(
    sig: Signal,
    accounts: dict[str, AccountState],
    cfg: OrchConfig,
    *,
    now: datetime | None = None,
    **ctx: Any,
) -> Plan:
    return plan_signal(sig, accounts, cfg, PlanContext(now=now, **ctx))


def shares(p: Plan) -> dict[str, str]:
    return {a.account_id: str(a.quantity) for a in p.allocations}


def codes(p: Plan) -> dict[str, list[str]]:
    """Excluded account -> its reason codes, in order."""
    return {e.account_id: [r.split(":")[0] for r in e.reasons] for e in p.exclusions}


def reason(p: Plan, account_id: str, code: str) -> str:
    """The full reason `code` of an excluded account."""
    for e in p.exclusions:
        if e.account_id == account_id:
            for r in e.reasons:
                if r.startswith(code + ":"):
                    return r
    raise AssertionError(f"{account_id} has no {code} reason in {p.exclusions}")


def decimal(value: object) -> Decimal:
    return Decimal(str(value))
