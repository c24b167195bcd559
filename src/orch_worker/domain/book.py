"""Columnar views of a portfolio's accounts, so planning is numpy arithmetic, not Python loops.

`PortfolioColumns` holds one array per number the planner uses (equity, margin, positions per
symbol, every rule) with one row per configured account of the portfolio, in sorted account id
order. Building it from account states is O(accounts) Python work; planning on it is vectorised.

`AccountBook` is the cheap way to keep those columns current: it is a `Mapping[str,
AccountState]` (so it can be passed wherever account states are) that updates one row per
incoming state. The planner uses its columns directly; given any other mapping it builds the
columns for the signal's portfolio on the spot. Both give the same plan. The book is the one
mutable object here: it belongs to the single writer of its portfolios, and the planner never
changes it.

What the planner derives from the columns alone -- headroom under each rule that does not depend
on the signal, exclusions by status, the portfolio's open risk per symbol -- is memoised on the
columns (`PortfolioColumns.memo`) until the next state update, so a burst of signals between two
updates computes it once. Memoised arrays are replaced on an update, never changed in place.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from orch_worker.domain.config import OrchConfig, RulesConfig
from orch_worker.domain.correlation import CorrelationMatrix, position_risk, split_by_direction
from orch_worker.domain.models import AccountState, AccountStatus
from orch_worker.domain.timewindows import Window, parse_windows

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
T = TypeVar("T")

_NUMERIC_RULES = (
    "risk_per_trade_pct",
    "max_daily_loss_pct",
    "max_drawdown_pct",
    "max_open_positions",
    "min_free_margin",
    "max_margin_use_pct",
    "max_quantity_per_symbol",
    "daily_risk_budget_pct",
    "max_correlated_risk_pct",
)


_MEMO_ENTRIES = 256
"""At most this many memoised values per portfolio: a cache, not a store."""

QUANTITY_UNITS = 10**9
"""Quantities are also kept as integers of 1e-9, so quantity limits are exact integer maths."""
_MAX_UNITS = 2**62


def _num(value: Decimal | int | None) -> float:
    return float("nan") if value is None else float(value)


def to_units(quantity: Decimal) -> int | None:
    """`quantity` in 1e-9 units, or None if it is not a whole number of them (or too large)."""
    units = quantity * QUANTITY_UNITS
    if units != units.to_integral_value() or abs(units) >= _MAX_UNITS:
        return None
    return int(units)


@dataclass(frozen=True, slots=True, eq=False)
class RuleColumns:
    """Every account's effective rules as arrays (NaN = rule not set), from configuration only."""

    groups: tuple[RulesConfig, ...]
    """The distinct effective rule sets; most accounts share their portfolio's."""
    group: IntArray
    values: dict[str, FloatArray]
    """Numeric rule name -> per-account value."""
    trailing: BoolArray
    hedging_allowed: BoolArray
    trading_windows: tuple[tuple[Window, ...] | None, ...]
    blackout_windows: tuple[tuple[Window, ...] | None, ...]
    initial_balance: FloatArray
    """Configured initial balance, NaN where the state's balance stands in."""
    ratio: FloatArray
    is_set: dict[str, bool]
    """Numeric rule name -> whether any account has it (unset rules cost nothing to check)."""
    min_free_margin: FloatArray
    """`min_free_margin` with 0 where unset."""
    max_quantity_units: IntArray
    """`max_quantity_per_symbol` in 1e-9 units (0 where unset or not representable)."""
    max_quantity_exact: BoolArray

    def rules(self, i: int) -> RulesConfig:
        return self.groups[int(self.group[i])]

    @classmethod
    def build(cls, config: OrchConfig, portfolio: str, ids: tuple[str, ...]) -> RuleColumns:
        base = config.portfolios[portfolio].rules
        merged: dict[RulesConfig, RulesConfig] = {}
        position: dict[RulesConfig, int] = {}
        groups: list[RulesConfig] = []
        group = np.empty(len(ids), dtype=np.int64)
        for i, a in enumerate(ids):
            override = config.accounts[a].rules
            rules = merged.get(override)
            if rules is None:
                rules = merged[override] = base.merged(override)
            g = position.get(rules)
            if g is None:
                g = position[rules] = len(groups)
                groups.append(rules)
            group[i] = g
        values = {
            name: np.array([_num(getattr(r, name)) for r in groups], dtype=np.float64)[group]
            for name in _NUMERIC_RULES
        }
        units = [
            None if r.max_quantity_per_symbol is None else to_units(r.max_quantity_per_symbol)
            for r in groups
        ]
        return cls(
            groups=tuple(groups),
            group=group,
            values=values,
            trailing=np.array([r.drawdown_mode == "trailing" for r in groups], dtype=bool)[group],
            hedging_allowed=np.array([bool(r.hedging_allowed) for r in groups], dtype=bool)[group],
            trading_windows=tuple(
                None if r.trading_windows is None else parse_windows(r.trading_windows)
                for r in groups
            ),
            blackout_windows=tuple(
                None if r.blackout_windows is None else parse_windows(r.blackout_windows)
                for r in groups
            ),
            initial_balance=np.array(
                [_num(config.accounts[a].initial_balance) for a in ids], dtype=np.float64
            ),
            ratio=np.array([float(config.accounts[a].ratio) for a in ids], dtype=np.float64),
            is_set={name: bool(np.any(~np.isnan(v))) for name, v in values.items()},
            min_free_margin=np.nan_to_num(values["min_free_margin"]),
            max_quantity_units=np.array([u or 0 for u in units], dtype=np.int64)[group],
            max_quantity_exact=np.array([u is not None for u in units], dtype=bool)[group],
        )


class PortfolioColumns:
    """One portfolio's accounts as arrays, one row per configured account (sorted ids)."""

    def __init__(self, config: OrchConfig, portfolio: str) -> None:
        self.config = config
        self.portfolio = portfolio
        self.ids: tuple[str, ...] = config.accounts_of(portfolio)
        self.ids_array: npt.NDArray[np.object_] = np.array(self.ids, dtype=object)
        """The same ids as an array, to pick many of them at once."""
        self.index: dict[str, int] = {a: i for i, a in enumerate(self.ids)}
        self.symbols: tuple[str, ...] = tuple(sorted(config.instruments))
        self.symbol_index: dict[str, int] = {s: j for j, s in enumerate(self.symbols)}
        self.rules = RuleColumns.build(config, portfolio, self.ids)
        n, s = len(self.ids), len(self.symbols)
        insts = [config.instruments[x] for x in self.symbols]
        self.value_per_unit: FloatArray = np.array([float(i.value_per_unit) for i in insts])
        self.risk_proxy_pct: FloatArray = np.array([float(i.risk_proxy_pct) for i in insts])
        self.states: list[AccountState | None] = [None] * n
        self.has_state: BoolArray = np.zeros(n, dtype=bool)
        self.active: BoolArray = np.zeros(n, dtype=bool)
        self.portfolio_ok: BoolArray = np.zeros(n, dtype=bool)
        self.balance: FloatArray = np.zeros(n)
        self.equity: FloatArray = np.zeros(n)
        self.margin_used: FloatArray = np.zeros(n)
        self.margin_available: FloatArray = np.zeros(n)
        self.day_start_equity: FloatArray = np.zeros(n)
        self.peak_equity: FloatArray = np.zeros(n)
        self.open_positions: IntArray = np.zeros(n, dtype=np.int64)
        self.qty: FloatArray = np.zeros((n, s))
        """Signed net quantity per (account, configured symbol)."""
        self.avg_price: FloatArray = np.zeros((n, s))
        self.qty_units: IntArray = np.zeros((n, s), dtype=np.int64)
        """The same quantities in 1e-9 units, where `qty_exact`; exact integer arithmetic."""
        self.qty_exact: BoolArray = np.ones((n, s), dtype=bool)
        self.long_risk: FloatArray = np.zeros((n, s))
        """Open risk of long positions per (account, symbol): see `correlation.position_risk`."""
        self.short_risk: FloatArray = np.zeros((n, s))
        self.drawdown_base: FloatArray = np.zeros(n)
        """What max_drawdown_pct is measured from: peak equity (trailing), else the configured
        initial balance, else the state's balance (static)."""
        self._memo: dict[Hashable, Any] = {}
        self._scratch: dict[Hashable, FloatArray] = {}

    def scratch(self, key: Hashable, shape: tuple[int, ...]) -> FloatArray:
        """A work array of `shape`, the same one each time for `key` (its content is garbage).

        For the planner's (limits x accounts) matrices: a fresh one is a fresh mmap at 10,000
        accounts, and faulting its pages in costs more than the arithmetic. Only for values
        used during one planning call, never kept by a plan.
        """
        buf = self._scratch.get(key)
        if buf is None or buf.shape != shape:
            buf = self._scratch[key] = np.empty(shape)
        return buf

    def memo(self, key: Hashable, make: Callable[[], T]) -> T:
        """`make()`, computed once per `key` until the next state update changes the columns.

        Only for values that depend on nothing but the columns, the configuration and `key`.
        """
        try:
            value: T = self._memo[key]
        except KeyError:
            if len(self._memo) >= _MEMO_ENTRIES:  # e.g. a new correlation matrix per signal
                self._memo = {}
            value = self._memo[key] = make()
        return value

    def __len__(self) -> int:
        return len(self.ids)

    def set_state(self, state: AccountState | None, i: int) -> None:
        """Replace row `i` with `state` (None clears it)."""
        self._memo = {}
        self.states[i] = state
        self.qty[i] = 0.0
        self.avg_price[i] = 0.0
        self.qty_units[i] = 0
        self.qty_exact[i] = True
        self.long_risk[i] = 0.0
        self.short_risk[i] = 0.0
        if state is None:
            self.has_state[i] = self.active[i] = self.portfolio_ok[i] = False
            self.open_positions[i] = 0
            for column in (
                self.balance,
                self.equity,
                self.margin_used,
                self.margin_available,
                self.day_start_equity,
                self.peak_equity,
                self.drawdown_base,
            ):
                column[i] = 0.0
            return
        self.has_state[i] = True
        self.active[i] = state.status is AccountStatus.ACTIVE
        self.portfolio_ok[i] = state.portfolio == self.portfolio
        self.balance[i] = float(state.balance)
        self.equity[i] = float(state.equity)
        self.margin_used[i] = float(state.margin_used)
        self.margin_available[i] = float(state.margin_available)
        self.day_start_equity[i] = float(state.day_start_equity)
        self.peak_equity[i] = float(state.peak_equity)
        initial = self.rules.initial_balance[i]
        if self.rules.trailing[i]:
            self.drawdown_base[i] = self.peak_equity[i]
        else:
            self.drawdown_base[i] = self.balance[i] if np.isnan(initial) else initial
        net: dict[str, Decimal] = {}
        size: dict[str, Decimal] = {}
        cost: dict[str, Decimal] = {}
        for p in state.positions:
            net[p.symbol] = net.get(p.symbol, Decimal(0)) + p.quantity
            size[p.symbol] = size.get(p.symbol, Decimal(0)) + abs(p.quantity)
            cost[p.symbol] = cost.get(p.symbol, Decimal(0)) + abs(p.quantity) * p.avg_price
        self.open_positions[i] = sum(1 for q in net.values() if q != 0)
        for sym, q in net.items():
            j = self.symbol_index.get(sym)
            if j is not None and q != 0:
                self.qty[i, j] = float(q)
                self.avg_price[i, j] = float(cost[sym] / size[sym])
                units = to_units(q)
                self.qty_units[i, j] = units or 0
                self.qty_exact[i, j] = units is not None
        risk = position_risk(
            self.qty[i], self.avg_price[i], self.value_per_unit, self.risk_proxy_pct
        )
        self.long_risk[i], self.short_risk[i] = split_by_direction(self.qty[i], risk)

    @classmethod
    def build(
        cls, config: OrchConfig, portfolio: str, accounts: Mapping[str, AccountState]
    ) -> PortfolioColumns:
        cols = cls(config, portfolio)
        for i, a in enumerate(cols.ids):
            state = accounts.get(a)
            if state is not None:
                cols.set_state(state, i)
        return cols


class AccountBook(Mapping[str, AccountState]):
    """Account states by id, with every portfolio's columns kept current on each update."""

    def __init__(self, config: OrchConfig, states: Iterable[AccountState] = ()) -> None:
        self.config = config
        self._states: dict[str, AccountState] = {}
        self._columns = {p: PortfolioColumns(config, p) for p in config.portfolios}
        self.correlations = CorrelationMatrix.from_config(config)
        for s in states:
            self.update(s)

    def update(self, state: AccountState) -> None:
        self._states[state.account_id] = state
        self._set(state.account_id, state)

    def discard(self, account_id: str) -> None:
        if self._states.pop(account_id, None) is not None:
            self._set(account_id, None)

    def _set(self, account_id: str, state: AccountState | None) -> None:
        account = self.config.accounts.get(account_id)
        if account is not None:
            cols = self._columns[account.portfolio]
            cols.set_state(state, cols.index[account_id])

    def columns(self, portfolio: str) -> PortfolioColumns:
        return self._columns[portfolio]

    def __getitem__(self, account_id: str) -> AccountState:
        return self._states[account_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)
