"""Who may take a signal, and how much each account's own rules let it take (AC1).

Two kinds of small check, each returning None when no account fails it:

* **Gates** do not depend on the size: status, pause, cooldown, symbol lists, trading and
  blackout windows, hedging, open positions. A gate returns a `Gate`: the accounts that fail and
  how to say why.
* **Limits** bound the size: margin, margin use, risk per trade, daily risk budget, daily loss,
  drawdown, quantity per symbol, correlated exposure. Each is linear in the quantity, so a limit
  is a `Limit`: the money (or quantity) left before the rule is broken, and what one lot uses.
  Its cap in lots is `headroom / per_lot`. An account is excluded by a limit when even the
  instrument's minimum quantity does not fit; otherwise the limit only caps its size.

`evaluate` runs every check and lists every failing reason of every account, not just the first.
Reasons are `CODE: key=value ...`, with `needed` (what the minimum order needs) and `left` (the
headroom) for limits, e.g. `DAILY_LOSS_HEADROOM: needed=50.00 left=30.00 ...`. The numbers of a
reason are taken when the check runs; its text is written only when the plan's exclusions are
read (`Eligibility.failures`), from copies, since a book's columns move on with the next state.

Most of a check does not depend on the signal's price: the static gates and every limit's
headroom depend on the columns and on the kind of order (symbol, side, stop or not, method). They
are built once per kind and version of the columns (`_Checks`, memoised on the columns until the
next state update); a signal adds its clock- and context-dependent gates (pause, cooldown,
windows), today's use of the risk budget and its per-lot figures.

The arithmetic is float64 over whole columns. Float rounding could move a cap that sits exactly
on a whole number of lots to one side or the other, so those few caps are recomputed exactly in
`Decimal` from the account's state and rules with the same formula (the `_left_*` functions are
generic over numpy arrays and Decimal); everywhere else the float floor is already exact.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from orch_worker.domain.book import PortfolioColumns, to_units
from orch_worker.domain.config import AllocationMethod, InstrumentConfig
from orch_worker.domain.models import AccountState, Signal
from orch_worker.domain.timewindows import Window, inside_any

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
N = TypeVar("N", Decimal, FloatArray)

NO_CAP = 2**53
"""Lots standing for "no limit"; far above any instrument's maximum, safe to add up."""

RISK_RULES = (
    "risk_per_trade_pct",
    "daily_risk_budget_pct",
    "max_daily_loss_pct",
    "max_drawdown_pct",
    "max_correlated_risk_pct",
)
"""Rules that bound the order's stop-loss risk, so they need a stop loss to be checked."""


def lots_down(quantity: Decimal, step: Decimal) -> int:
    """Whole lots in `quantity`, rounded down: rounding must never allocate more than asked."""
    return int((quantity / step).to_integral_value(rounding=ROUND_FLOOR))


def lots_up(quantity: Decimal, step: Decimal) -> int:
    return int((quantity / step).to_integral_value(rounding=ROUND_CEILING))


@functools.lru_cache(maxsize=256)
def _lot_bounds(min_quantity: Decimal, max_quantity: Decimal, step: Decimal) -> tuple[int, int]:
    """An instrument's minimum and maximum order in lots (the same for each of its signals)."""
    return max(1, lots_up(min_quantity, step)), lots_down(max_quantity, step)


@dataclass(frozen=True, slots=True)
class OrderTerms:
    """The signal's order as the checks see it: per-lot margin and risk at the entry price."""

    symbol: str
    column: int
    sign: int
    entry: Decimal
    stop_distance: Decimal | None
    step: Decimal
    min_lots: int
    max_lots: int
    margin_per_lot: Decimal
    risk_per_lot: Decimal | None
    """Stop-loss risk of one lot; None without a stop loss."""
    notional_per_lot: Decimal

    def quantity(self, lots: int) -> Decimal:
        return Decimal(lots) * self.step

    @property
    def min_quantity(self) -> Decimal:
        return self.quantity(self.min_lots)

    def per_lot(self, per: str) -> Decimal:
        """What one lot takes of a limit measured in `per` (see `Limit.per`)."""
        if per == "margin":
            return self.margin_per_lot
        if per == "step":
            return self.step
        if self.risk_per_lot is None:  # risk limits are only checked with a stop loss
            raise ValueError("no stop loss: the order's risk is unknown")
        return self.risk_per_lot

    @classmethod
    def of(cls, signal: Signal, inst: InstrumentConfig, column: int) -> OrderTerms:
        entry = signal.entry_price
        if entry is None:
            raise ValueError("the order needs an entry price")
        step = inst.lot_step
        distance = None if signal.stop_loss is None else abs(entry - signal.stop_loss)
        min_lots, max_lots = _lot_bounds(inst.min_quantity, inst.max_quantity, step)
        return cls(
            symbol=signal.symbol,
            column=column,
            sign=signal.side.sign,
            entry=entry,
            stop_distance=distance,
            step=step,
            min_lots=min_lots,
            max_lots=max_lots,
            margin_per_lot=step * inst.value_per_unit * entry * inst.margin_rate,
            risk_per_lot=None if distance is None else step * inst.value_per_unit * distance,
            notional_per_lot=step * inst.value_per_unit * entry,
        )


@dataclass(frozen=True, slots=True)
class CheckInputs:
    """Everything the checks read, as arrays over the portfolio's accounts."""

    cols: PortfolioColumns
    order: OrderTerms
    method: AllocationMethod
    now: datetime
    paused: BoolArray | None
    """None when no account of the portfolio is paused."""
    cooldown: BoolArray | None
    risk_used: FloatArray | None
    """None when no account has used any of its daily risk budget."""
    risk_used_exact: Mapping[str, Decimal]
    correlated_open: FloatArray
    """Correlated open risk per account (see `correlation`)."""
    cross_account_hedging_allowed: bool
    correlations: Hashable | None
    """What `correlated_open` was computed with (the correlation matrix): the gates and limits
    built for one order are reused by the next of the same kind with the same (None: never)."""
    states: Sequence[AccountState | None]
    """The account states as planned, one per row: a copy, because reasons are written later
    (`Gate.why`), by when the book's own rows may hold newer states."""

    def rule(self, name: str) -> FloatArray:
        return self.cols.rules.values[name]

    def state(self, i: int) -> AccountState:
        s = self.states[i]
        if s is None:  # limits are only evaluated on accounts with a state
            raise LookupError(f"no state for {self.cols.ids[i]}")
        return s

    def rule_exact(self, i: int, name: str) -> Decimal:
        value = getattr(self.cols.rules.rules(i), name)
        return Decimal(value)


Texts = Callable[[], list[str]]
"""Writes the reasons of some accounts, in their order."""
Capture = Callable[[IntArray], Texts]
"""Given the failing accounts, copies what their reasons need and returns their writer."""


@dataclass(frozen=True, slots=True)
class Gate:
    code: str
    fails: BoolArray
    why: Capture
    """The reasons (`CODE: numbers`) of the failing accounts. Their numbers are copied when the
    check runs and the texts written only if the plan's exclusions are read: a writer reads
    nothing that changes after planning (copied columns, `CheckInputs.states`, the rules)."""


def _no_detail() -> str:
    return ""


@dataclass(frozen=True, slots=True)
class Limit:
    code: str
    headroom: FloatArray
    """Money (or quantity) left before the rule breaks; NaN where the rule is not set."""
    per: str
    """What one lot of the order takes of it (`OrderTerms.per_lot`): margin, stop-loss risk, or
    the lot step itself (quantity)."""
    exact: Callable[[CheckInputs, int], Decimal] | None
    """The same headroom in Decimal for account i, for caps on a whole number of lots."""
    detail: Callable[..., str] = _no_detail
    """The numbers behind a reason, from one account's values of `detail_columns`."""
    detail_columns: tuple[npt.NDArray[Any], ...] = ()
    whole: FloatArray | None = None
    """The size of the limit itself (e.g. the day's loss limit in money), for scoring."""
    exact_lots: tuple[IntArray, BoolArray] | None = None
    """Caps already computed exactly (integer arithmetic), and where they are valid."""


# --- the formulas, generic over numpy columns and Decimal ---------------------------------------


def _left_margin(margin_available: N, min_free: N) -> N:
    return margin_available - min_free


def _left_margin_use(equity: N, max_use_pct: N, margin_used: N) -> N:
    return equity * max_use_pct / 100 - margin_used


def _left_risk_per_trade(equity: N, pct: N) -> N:
    return equity * pct / 100


def _left_budget(day_start_equity: N, pct: N, used: N) -> N:
    return day_start_equity * pct / 100 - used


def _left_daily_loss(day_start_equity: N, equity: N, pct: N) -> N:
    return day_start_equity * pct / 100 - (day_start_equity - equity)


def _left_drawdown(equity: N, base: N, pct: N) -> N:
    return equity - base * (1 - pct / 100)


def _left_symbol_quantity(max_quantity: N, signed_position: N) -> N:
    return max_quantity - signed_position


@dataclass(frozen=True, slots=True)
class _Static:
    """What the checks derive from the columns alone, memoised until the next state update."""

    headroom: dict[str, FloatArray]
    """Limit code -> headroom, for the limits whose headroom does not depend on the signal
    (the daily risk budget before today's use of it)."""
    whole: dict[str, FloatArray]
    correlated_room: FloatArray | None
    """equity x max_correlated_risk_pct / 100, from which the correlated open risk is taken."""
    missing: IntArray
    """Rows without a state."""
    mismatch: BoolArray | None
    """Rows whose state names another portfolio; None when there are none."""
    inactive: BoolArray | None


def _derive(c: PortfolioColumns) -> _Static:
    is_set, rule = c.rules.is_set, c.rules.values
    headroom = {"INSUFFICIENT_MARGIN": _left_margin(c.margin_available, c.rules.min_free_margin)}
    whole: dict[str, FloatArray] = {}
    if is_set["max_margin_use_pct"]:
        headroom["MAX_MARGIN_USE"] = _left_margin_use(
            c.equity, rule["max_margin_use_pct"], c.margin_used
        )
    if is_set["risk_per_trade_pct"]:
        headroom["RISK_PER_TRADE"] = _left_risk_per_trade(c.equity, rule["risk_per_trade_pct"])
    if is_set["daily_risk_budget_pct"]:
        # = _left_budget(...) with nothing used: x - 0.0 is x, bit for bit
        budget = c.day_start_equity * rule["daily_risk_budget_pct"] / 100
        headroom["DAILY_RISK_BUDGET"] = whole["DAILY_RISK_BUDGET"] = budget
    if is_set["max_daily_loss_pct"]:
        pct = rule["max_daily_loss_pct"]
        headroom["DAILY_LOSS_HEADROOM"] = _left_daily_loss(c.day_start_equity, c.equity, pct)
        whole["DAILY_LOSS_HEADROOM"] = c.day_start_equity * pct / 100
    if is_set["max_drawdown_pct"]:
        pct = rule["max_drawdown_pct"]
        headroom["DRAWDOWN_HEADROOM"] = _left_drawdown(c.equity, c.drawdown_base, pct)
        whole["DRAWDOWN_HEADROOM"] = c.drawdown_base * pct / 100
    room = None
    if is_set["max_correlated_risk_pct"]:
        room = c.equity * rule["max_correlated_risk_pct"] / 100
    mismatch = c.has_state & ~c.portfolio_ok
    inactive = c.has_state & ~c.active
    return _Static(
        headroom=headroom,
        whole=whole,
        correlated_room=room,
        missing=(~c.has_state).nonzero()[0],
        mismatch=mismatch if mismatch.any() else None,
        inactive=inactive if inactive.any() else None,
    )


def derived(c: PortfolioColumns) -> _Static:
    return c.memo("eligibility", lambda: _derive(c))


# --- how reasons are written ---------------------------------------------------------------------


def _columns_text(fmt: Callable[..., str], *columns: npt.NDArray[Any]) -> Capture:
    """Reasons from each failing account's values of `columns` (copied at check time)."""

    def capture(who: IntArray) -> Texts:
        taken = [c[who] for c in columns]
        if not taken:
            return lambda: [fmt()] * len(who)
        return lambda: [fmt(*v) for v in zip(*(t.tolist() for t in taken), strict=True)]

    return capture


def _state_text(x: CheckInputs, fmt: Callable[[AccountState], str]) -> Capture:
    """Reasons from each failing account's state (`CheckInputs.states` is a copy)."""

    def capture(who: IntArray) -> Texts:
        return lambda: [fmt(x.state(i)) for i in who.tolist()]

    return capture


def _group_text(x: CheckInputs, fmt: Callable[[int], str]) -> Capture:
    """Reasons that depend only on the account's rule set (`RuleColumns.groups`)."""
    group = x.cols.rules.group

    def capture(who: IntArray) -> Texts:
        groups = group[who]

        def write() -> list[str]:
            texts: dict[int, str] = {}
            out = []
            for g in groups.tolist():
                text = texts.get(g)
                if text is None:
                    text = texts[g] = fmt(g)
                out.append(text)
            return out

        return write

    return capture


def _each_text(fmt: Callable[[int], str]) -> Capture:
    """Reasons written per account index by `fmt`, which reads only immutable values."""

    def capture(who: IntArray) -> Texts:
        return lambda: [fmt(i) for i in who.tolist()]

    return capture


# --- gates ---------------------------------------------------------------------------------------


def portfolio_mismatch(x: CheckInputs) -> Gate | None:
    fails = derived(x.cols).mismatch
    if fails is None:
        return None
    portfolio = x.cols.portfolio
    return Gate(
        "PORTFOLIO_MISMATCH",
        fails,
        _state_text(
            x,
            lambda s: (
                f"PORTFOLIO_MISMATCH: state says portfolio={s.portfolio} config says {portfolio}"
            ),
        ),
    )


def status(x: CheckInputs) -> Gate | None:
    fails = derived(x.cols).inactive
    if fails is None:
        return None
    return Gate("STATUS", fails, _state_text(x, lambda s: f"STATUS: status={s.status.value}"))


def paused(x: CheckInputs) -> Gate | None:
    if x.paused is None or not x.paused.any():
        return None
    return Gate("PAUSED", x.paused, _columns_text(lambda: "PAUSED: paused by a control command"))


def cooldown(x: CheckInputs) -> Gate | None:
    if x.cooldown is None or not x.cooldown.any():
        return None
    return Gate(
        "COOLDOWN",
        x.cooldown,
        _columns_text(lambda: "COOLDOWN: in failure cooldown after errors"),
    )


def _per_group(x: CheckInputs, fails_group: list[bool]) -> BoolArray:
    return np.asarray(fails_group, dtype=bool)[x.cols.rules.group]


def symbol_not_allowed(x: CheckInputs) -> Gate | None:
    sym = x.order.symbol
    groups = x.cols.rules.groups
    bad = [g.allowed_symbols is not None and sym not in g.allowed_symbols for g in groups]
    if not any(bad):
        return None
    return Gate(
        "SYMBOL_NOT_ALLOWED",
        _per_group(x, bad),
        _group_text(
            x,
            lambda g: (
                f"SYMBOL_NOT_ALLOWED: {sym} not in allowed_symbols="
                f"{','.join(groups[g].allowed_symbols or ())}"
            ),
        ),
    )


def symbol_blocked(x: CheckInputs) -> Gate | None:
    sym = x.order.symbol
    bad = [g.blocked_symbols is not None and sym in g.blocked_symbols for g in x.cols.rules.groups]
    if not any(bad):
        return None
    return Gate(
        "SYMBOL_BLOCKED", _per_group(x, bad), _columns_text(lambda: f"SYMBOL_BLOCKED: {sym}")
    )


def _now_text(now: datetime) -> str:
    return now.strftime("%a %H:%M UTC")


def outside_trading_windows(x: CheckInputs) -> Gate | None:
    windows = x.cols.rules.trading_windows
    bad = [w is not None and inside_any(w, x.now) is None for w in windows]
    if not any(bad):
        return None
    now = x.now

    def why(g: int) -> str:
        ws = windows[g] or ()
        return (
            f"OUTSIDE_TRADING_WINDOW: now={_now_text(now)} windows={'; '.join(w.text for w in ws)}"
        )

    return Gate("OUTSIDE_TRADING_WINDOW", _per_group(x, bad), _group_text(x, why))


def in_blackout_window(x: CheckInputs) -> Gate | None:
    hits: list[Window | None] = [
        None if w is None else inside_any(w, x.now) for w in x.cols.rules.blackout_windows
    ]
    if not any(h is not None for h in hits):
        return None
    now = x.now

    def why(g: int) -> str:
        hit = hits[g]
        return f"IN_BLACKOUT_WINDOW: now={_now_text(now)} window={hit.text if hit else '?'}"

    return Gate(
        "IN_BLACKOUT_WINDOW", _per_group(x, [h is not None for h in hits]), _group_text(x, why)
    )


def _opposite(x: CheckInputs) -> BoolArray:
    c, j, sign = x.cols, x.order.column, x.order.sign
    return c.memo(("opposite", j, sign), lambda: c.qty[:, j] * sign < 0)


def hedging(x: CheckInputs) -> Gate | None:
    if x.cols.rules.hedging_allowed.all():
        return None
    fails = _opposite(x) & ~x.cols.rules.hedging_allowed
    if not fails.any():
        return None
    sym = x.order.symbol
    return Gate(
        "HEDGING",
        fails,
        _columns_text(
            lambda q: f"HEDGING: position={q:g} {sym} is opposite and hedging_allowed is off",
            x.cols.qty[:, x.order.column],
        ),
    )


def cross_account_hedging(x: CheckInputs) -> Gate | None:
    if x.cross_account_hedging_allowed:
        return None
    holders = _opposite(x) & x.cols.has_state
    count = int(holders.sum())
    if count == 0:
        return None
    fails = (count - holders.astype(np.int64)) > 0
    held = holders.nonzero()[0]
    ids, sym = x.cols.ids, x.order.symbol

    def why(i: int) -> str:
        others = [ids[k] for k in held if k != i]
        shown = ",".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        return (
            f"CROSS_ACCOUNT_HEDGING: opposite {sym} position in {shown}; "
            "the portfolio forbids hedging across accounts"
        )

    return Gate("CROSS_ACCOUNT_HEDGING", fails, _each_text(why))


def max_open_positions(x: CheckInputs) -> Gate | None:
    if not x.cols.rules.is_set["max_open_positions"]:
        return None
    c, j = x.cols, x.order.column

    def make() -> BoolArray:
        opens_new = c.qty[:, j] == 0
        fails: BoolArray = opens_new & (c.open_positions >= c.rules.values["max_open_positions"])
        return fails  # NaN (unset) compares False

    fails = c.memo(("max_open_positions", j), make)
    if not fails.any():
        return None
    return Gate(
        "MAX_OPEN_POSITIONS",
        fails,
        _columns_text(
            lambda o, m: f"MAX_OPEN_POSITIONS: open={o} max={m:g}",
            c.open_positions,
            c.rules.values["max_open_positions"],
        ),
    )


def no_stop_loss(x: CheckInputs) -> Gate | None:
    if x.order.risk_per_lot is not None:
        return None
    has = {n: ~np.isnan(x.rule(n)) for n in RISK_RULES if x.cols.rules.is_set[n]}
    if not has:
        return None
    fails = np.logical_or.reduce(list(has.values()))
    if not fails.any():
        return None

    def why(i: int) -> str:
        names = ",".join(n for n, m in has.items() if m[i])
        return f"NO_STOP_LOSS: {names} cannot be checked without the order's stop loss"

    return Gate("NO_STOP_LOSS", fails, _each_text(why))


def no_risk_per_trade(x: CheckInputs) -> Gate | None:
    if x.method is not AllocationMethod.RISK:
        return None
    fails = np.isnan(x.rule("risk_per_trade_pct"))
    if not fails.any():
        return None
    return Gate(
        "NO_RISK_PER_TRADE",
        fails,
        _columns_text(
            lambda: "NO_RISK_PER_TRADE: the portfolio sizes by risk; set risk_per_trade_pct"
        ),
    )


GATES: tuple[Callable[[CheckInputs], Gate | None], ...] = (
    portfolio_mismatch,
    status,
    paused,
    cooldown,
    symbol_not_allowed,
    symbol_blocked,
    outside_trading_windows,
    in_blackout_window,
    hedging,
    cross_account_hedging,
    max_open_positions,
    no_stop_loss,
    no_risk_per_trade,
)


# --- limits --------------------------------------------------------------------------------------


def _exact_state(x: CheckInputs, i: int, field: str) -> Decimal:
    value: Decimal = getattr(x.state(i), field)
    return value


def _rule_or_zero(x: CheckInputs, i: int, name: str) -> Decimal:
    value = getattr(x.cols.rules.rules(i), name)
    return Decimal(0) if value is None else Decimal(value)


def _margin_detail(available: float, min_free: float) -> str:
    return f"available={available:.2f}" + (f" min_free={min_free:.2f}" if min_free else "")


def _exact_margin(x: CheckInputs, i: int) -> Decimal:
    return _left_margin(
        _exact_state(x, i, "margin_available"), _rule_or_zero(x, i, "min_free_margin")
    )


def margin(x: CheckInputs) -> Limit:
    c = x.cols
    return Limit(
        "INSUFFICIENT_MARGIN",
        derived(c).headroom["INSUFFICIENT_MARGIN"],
        "margin",
        _exact_margin,
        _margin_detail,
        (c.margin_available, c.rules.min_free_margin),
    )


def _exact_margin_use(x: CheckInputs, i: int) -> Decimal:
    return _left_margin_use(
        _exact_state(x, i, "equity"),
        x.rule_exact(i, "max_margin_use_pct"),
        _exact_state(x, i, "margin_used"),
    )


def margin_use(x: CheckInputs) -> Limit | None:
    if not x.cols.rules.is_set["max_margin_use_pct"]:
        return None
    c = x.cols
    return Limit(
        "MAX_MARGIN_USE",
        derived(c).headroom["MAX_MARGIN_USE"],
        "margin",
        _exact_margin_use,
        lambda used, equity, pct: f"margin_used={used:.2f} equity={equity:.2f} max_use={pct:g}%",
        (c.margin_used, c.equity, x.rule("max_margin_use_pct")),
    )


def _exact_risk_per_trade(x: CheckInputs, i: int) -> Decimal:
    return _left_risk_per_trade(_exact_state(x, i, "equity"), x.rule_exact(i, "risk_per_trade_pct"))


def risk_per_trade(x: CheckInputs) -> Limit | None:
    if x.order.risk_per_lot is None:
        return None
    if not x.cols.rules.is_set["risk_per_trade_pct"]:
        return None
    c = x.cols
    return Limit(
        "RISK_PER_TRADE",
        derived(c).headroom["RISK_PER_TRADE"],
        "risk",
        _exact_risk_per_trade,
        lambda equity, pct: f"equity={equity:.2f} risk_per_trade={pct:g}%",
        (c.equity, x.rule("risk_per_trade_pct")),
    )


def _exact_budget(x: CheckInputs, i: int) -> Decimal:
    return _left_budget(
        _exact_state(x, i, "day_start_equity"),
        x.rule_exact(i, "daily_risk_budget_pct"),
        Decimal(x.risk_used_exact.get(x.cols.ids[i], Decimal(0))),
    )


def _budget_detail(used: float, day_start: float, pct: float) -> str:
    return f"used={used:.2f} budget={day_start * pct / 100:.2f}"


def daily_risk_budget(x: CheckInputs) -> Limit | None:
    """Without today's use of the budget: `_used_today` takes it off per plan."""
    if x.order.risk_per_lot is None:
        return None
    if not x.cols.rules.is_set["daily_risk_budget_pct"]:
        return None
    c = x.cols
    return Limit(
        "DAILY_RISK_BUDGET",
        derived(c).headroom["DAILY_RISK_BUDGET"],
        "risk",
        _exact_budget,
        _budget_detail,
        (np.zeros(len(c)), c.day_start_equity, x.rule("daily_risk_budget_pct")),
        derived(c).whole["DAILY_RISK_BUDGET"],
    )


def _used_today(limit: Limit, x: CheckInputs) -> Limit:
    if limit.code != "DAILY_RISK_BUDGET" or x.risk_used is None:
        return limit
    _, day_start, pct = limit.detail_columns
    return replace(
        limit,
        headroom=limit.headroom - x.risk_used,  # = _left_budget over the columns
        detail_columns=(x.risk_used, day_start, pct),
    )


def _exact_daily_loss(x: CheckInputs, i: int) -> Decimal:
    return _left_daily_loss(
        _exact_state(x, i, "day_start_equity"),
        _exact_state(x, i, "equity"),
        x.rule_exact(i, "max_daily_loss_pct"),
    )


def daily_loss(x: CheckInputs) -> Limit | None:
    if x.order.risk_per_lot is None:
        return None
    if not x.cols.rules.is_set["max_daily_loss_pct"]:
        return None
    c = x.cols
    return Limit(
        "DAILY_LOSS_HEADROOM",
        derived(c).headroom["DAILY_LOSS_HEADROOM"],
        "risk",
        _exact_daily_loss,
        lambda day_start, equity, pct: (
            f"loss_today={day_start - equity:.2f} limit={day_start * pct / 100:.2f}"
        ),
        (c.day_start_equity, c.equity, x.rule("max_daily_loss_pct")),
        derived(c).whole["DAILY_LOSS_HEADROOM"],
    )


def _drawdown_base_exact(x: CheckInputs, i: int) -> Decimal:
    if x.cols.rules.trailing[i]:
        return _exact_state(x, i, "peak_equity")
    configured = x.cols.config.accounts[x.cols.ids[i]].initial_balance
    return configured if configured is not None else _exact_state(x, i, "balance")


def _exact_drawdown(x: CheckInputs, i: int) -> Decimal:
    return _left_drawdown(
        _exact_state(x, i, "equity"),
        _drawdown_base_exact(x, i),
        x.rule_exact(i, "max_drawdown_pct"),
    )


def _drawdown_detail(equity: float, base: float, pct: float, trailing: bool) -> str:
    return (
        f"equity={equity:.2f} floor={base * (1 - pct / 100):.2f} "
        f"mode={'trailing' if trailing else 'static'}"
    )


def drawdown(x: CheckInputs) -> Limit | None:
    if x.order.risk_per_lot is None:
        return None
    if not x.cols.rules.is_set["max_drawdown_pct"]:
        return None
    c = x.cols
    return Limit(
        "DRAWDOWN_HEADROOM",
        derived(c).headroom["DRAWDOWN_HEADROOM"],
        "risk",
        _exact_drawdown,
        _drawdown_detail,
        (c.equity, c.drawdown_base, x.rule("max_drawdown_pct"), c.rules.trailing),
        derived(c).whole["DRAWDOWN_HEADROOM"],
    )


_step_units = functools.lru_cache(maxsize=64)(to_units)
"""An instrument's lot step in 1e-9 units (the same for each of its signals)."""


def _symbol_quantity_lots(x: CheckInputs) -> tuple[IntArray, BoolArray]:
    """Exact caps in integer 1e-9 units where the position, the rule and the step allow."""
    c, j, step = x.cols, x.order.column, _step_units(x.order.step)
    if step is None:
        return np.zeros(len(c), dtype=np.int64), np.zeros(len(c), dtype=bool)
    ok = c.rules.max_quantity_exact & c.qty_exact[:, j]
    left = c.rules.max_quantity_units - c.qty_units[:, j] * x.order.sign
    return np.floor_divide(left, step), ok


def _exact_symbol_quantity(x: CheckInputs, i: int) -> Decimal:
    return _left_symbol_quantity(
        x.rule_exact(i, "max_quantity_per_symbol"),
        x.state(i).position(x.order.symbol) * x.order.sign,
    )


def symbol_quantity(x: CheckInputs) -> Limit | None:
    """The position may not end beyond max_quantity_per_symbol on the side the order pushes it
    to: a buy may take it up to +max, a sell down to -max. Reducing a position that is already
    over the maximum is allowed."""
    if not x.cols.rules.is_set["max_quantity_per_symbol"]:
        return None
    c, j = x.cols, x.order.column
    limit = x.rule("max_quantity_per_symbol")
    return Limit(
        "MAX_QUANTITY_PER_SYMBOL",
        _left_symbol_quantity(limit, c.qty[:, j] * x.order.sign),
        "step",
        _exact_symbol_quantity,
        lambda q, m: f"position={q:g} max={m:g}",
        (c.qty[:, j], limit),
        exact_lots=_symbol_quantity_lots(x),
    )


def correlated_exposure(x: CheckInputs) -> Limit | None:
    if x.order.risk_per_lot is None:
        return None
    room = derived(x.cols).correlated_room
    if room is None:
        return None
    c = x.cols
    return Limit(
        "CORRELATED_EXPOSURE",
        room - x.correlated_open,
        "risk",
        None,  # correlations are estimates: the float cap is as exact as its inputs
        lambda co, equity, pct: f"correlated_open={co:.2f} limit={equity * pct / 100:.2f}",
        (x.correlated_open, c.equity, x.rule("max_correlated_risk_pct")),
    )


LIMITS: tuple[Callable[[CheckInputs], Limit | None], ...] = (
    margin,
    margin_use,
    risk_per_trade,
    daily_risk_budget,
    daily_loss,
    drawdown,
    symbol_quantity,
    correlated_exposure,
)

DYNAMIC_GATES = frozenset({paused, cooldown, outside_trading_windows, in_blackout_window})
"""Gates that read the plan's context or clock; the others depend only on the columns, the
rules and the order's symbol, side, stop and method."""


@dataclass(frozen=True, slots=True)
class _Checks:
    """The gates and limits of one kind of order (symbol, side, stop or not, method) on one
    version of the columns: built once, by the first plan of that kind after a state update."""

    failures: tuple[tuple[int, IntArray, Texts], ...]
    """(position in GATES, accounts with a state failing it, their reasons) of the static gates."""
    excluded: BoolArray
    """Rows without a state, or failing a static gate."""
    limits: tuple[Limit, ...]
    """The daily risk budget's headroom before today's use of it (see `_used_today`)."""
    exact_rows: tuple[tuple[int, FloatArray, BoolArray, BoolArray], ...]
    """(limit, lots, where they replace the float cap, where not) of limits with exactly
    computed caps (already clipped). Such a limit's lot is the lot step, the same for every
    order of the kind, so where its float cap is clipped is known in advance too."""
    float_only: IntArray
    """Limits without an exact form: their float caps stand, never flagged uncertain."""


def _checks(x: CheckInputs) -> _Checks:
    c = x.cols
    if x.correlations is None:
        return _build_checks(x)
    key = (
        "checks",
        x.order.symbol,
        x.order.sign,
        x.order.risk_per_lot is None,
        x.method,
        x.cross_account_hedging_allowed,
        x.correlations,
    )
    return c.memo(key, lambda: _build_checks(x))


def _build_checks(x: CheckInputs) -> _Checks:
    c = x.cols
    has_state = c.has_state
    excluded = ~has_state
    failures: list[tuple[int, IntArray, Texts]] = []
    for position, check in enumerate(GATES):
        if check in DYNAMIC_GATES:
            continue
        gate = check(x)
        if gate is not None:
            hit = gate.fails & has_state
            who = hit.nonzero()[0]
            if len(who):
                failures.append((position, who, gate.why(who)))
                excluded |= hit
    limits = tuple(lim for lim in (check(x) for check in LIMITS) if lim is not None)
    top = float(x.order.max_lots + 1)
    exact_rows = []
    for k, lim in enumerate(limits):
        if lim.exact_lots is not None:
            if lim.per != "step":
                raise ValueError(f"{lim.code}: exact caps are kept for quantity limits only")
            exact, representable = lim.exact_lots
            low = np.fmax(np.fmin(np.floor(lim.headroom / float(x.order.step)), top), -1.0)
            valid = representable & (low < top) & (low > -1.0)  # clipped: not near a boundary
            lots = np.clip(exact, -1, x.order.max_lots + 1).astype(np.float64)
            exact_rows.append((k, lots, valid, ~valid))
    float_only = np.array([k for k, lim in enumerate(limits) if lim.exact is None], dtype=np.int64)
    return _Checks(tuple(failures), excluded, limits, tuple(exact_rows), float_only)


_TOLERANCE = 1e-9
"""Relative float error allowed for before a cap counts as sitting on a whole number of lots."""

Entries = tuple[IntArray, IntArray]
"""(limit, account) index pairs."""


def cap_lots(
    checks: _Checks,
    per_lot: list[float],
    max_lots: int,
    out: tuple[FloatArray, FloatArray],
    budget: tuple[int, FloatArray] | None = None,
) -> tuple[FloatArray, Entries]:
    """Whole lots each limit allows each account (rows = limits), and where that is uncertain.

    Caps are clipped to [-1, max_lots + 1] (beyond that they change nothing), and an unset rule
    (NaN) counts as max_lots + 1. The float floor is exact unless the cap lies within rounding
    error of a whole number k; there the pessimistic k - 1 is returned and the entry listed, so
    that `Eligibility.exact_caps` (or `evaluate`, at the minimum quantity) can settle it in
    Decimal for the few accounts where it matters. A few passes over the (limits x accounts)
    matrix, in place in the two work matrices `out` (at 10,000 accounts a fresh matrix is a
    page-faulting mmap), the second one returned; `budget` is (row, headroom) of a limit whose
    headroom differs from the one in `checks` (today's use of the risk budget).
    """
    top = float(max_lots + 1)
    raw, low = out
    for k, lim in enumerate(checks.limits):
        np.divide(lim.headroom, per_lot[k], out=raw[k])
    if budget is not None:
        np.divide(budget[1], per_lot[budget[0]], out=raw[budget[0]])
    np.floor(raw, out=low)
    np.subtract(raw, low, out=raw)  # raw is now the fractional part (NaN where unset)
    tol = _TOLERANCE * top
    near = raw < tol
    near |= raw > 1.0 - tol
    np.fmin(low, top, out=low)  # fmin/fmax skip NaN: an unset rule becomes `top`
    np.fmax(low, -1.0, out=low)
    if len(checks.float_only):  # nothing exact to settle with: the float floor stands
        near[checks.float_only] = False
    for k, _, _, inexact in checks.exact_rows:
        near[k] &= inexact  # settled exactly below
    # np.nonzero on the 2-D matrix is several times slower than on its flat view
    ks, iss = np.divmod(near.ravel().nonzero()[0], near.shape[1])
    if len(ks):
        found = low[ks, iss]
        inside = (found < top) & (found > -1.0)  # clipped values are not near a real boundary
        ks, iss = ks[inside], iss[inside]
        just_above = raw[ks, iss] < tol  # k + tiny: might truly be k - tiny, so k - 1 to be safe
        low[ks[just_above], iss[just_above]] -= 1.0
    for k, exact, valid, _ in checks.exact_rows:
        np.copyto(low[k], exact, where=valid)
    return low, (ks, iss)


def _exact_lots(limit: Limit, per_lot: Decimal, x: CheckInputs, i: int) -> int:
    if limit.exact is None:  # never flagged uncertain
        raise ValueError(f"{limit.code} has no exact form")
    return math.floor(limit.exact(x, i) / per_lot)


@dataclass(frozen=True, slots=True)
class Caps:
    """The caps of some accounts (see `Eligibility.exact_caps`)."""

    lots: IntArray
    flagged: BoolArray
    """Where a limit's float cap was uncertain: there, a limit exactly at the instrument's
    maximum is named as the binding one (it was settled limit by limit); elsewhere the maximum
    itself, MAX_QUANTITY, is."""


@dataclass(frozen=True, slots=True)
class Eligibility:
    """Every account's verdict: eligible or not (with all reasons), and its cap in lots."""

    eligible: BoolArray
    lots: FloatArray
    """Per (limit, account), the whole lots the limit allows; pessimistic (one lot short) at the
    `uncertain` entries. `exact_caps` settles in place the ones that matter. A work matrix of
    the columns (`PortfolioColumns.scratch`): valid until the next plan on the same columns."""
    uncertain: Entries
    codes: tuple[str, ...]
    """The limits evaluated, then `MAX_QUANTITY` (the instrument's maximum per order)."""
    failures: tuple[tuple[IntArray, Texts], ...]
    """Per failed check, in check order: the accounts and the writer of their reasons."""
    headroom: dict[str, FloatArray]
    """Limit code -> headroom (NaN where the rule is not set), for scoring and the numbers."""
    wholes: dict[str, FloatArray]
    """Limit code -> the limit's own size, where it has one (risk limits), for scoring."""
    limits: tuple[Limit, ...]
    per_lot: tuple[Decimal, ...]
    """What one lot takes of each limit."""
    inputs: CheckInputs
    max_lots: int

    def risk_target(self, who: IntArray) -> FloatArray:
        """Lots risk_per_trade_pct sizes the accounts `who` to (unrounded)."""
        for lim, per_lot in zip(self.limits, self.per_lot, strict=True):
            if lim.code == "RISK_PER_TRADE":
                out: FloatArray = lim.headroom[who] / float(per_lot)
                return out
        raise ValueError("risk sizing without a stop loss or risk_per_trade_pct")

    def reasons(self) -> dict[int, list[str]]:
        """Excluded account -> all its reasons, in check order (writes every text)."""
        out: dict[int, list[str]] = {}
        for who, write in self.failures:
            for i, text in zip(who.tolist(), write(), strict=True):
                out.setdefault(i, []).append(text)
        return out

    def exact_caps(self, who: IntArray) -> Caps:
        """Caps of the accounts `who` under all their limits and the instrument's maximum,
        settled exactly where a limit's float cap was uncertain and could be the smallest."""
        ks, iss = self.uncertain
        lots = self.lots
        mins = lots.min(axis=0)  # the margin limit is always there
        flagged = np.zeros(len(who), dtype=bool)
        if len(ks):
            position = np.full(lots.shape[1], -1, dtype=np.int64)
            position[who] = np.arange(len(who))
            mine = position[iss] >= 0
            ks, iss = ks[mine], iss[mine]
            flagged[position[iss]] = True
            # An entry more than one lot above the smallest cannot become the smallest.
            need = lots[ks, iss] <= mins[iss] + 1.0
            for k, i in zip(ks[need].tolist(), iss[need].tolist(), strict=True):
                lots[k, i] = _exact_lots(self.limits[k], self.per_lot[k], self.inputs, i)
            moved = iss[need]  # repeats are harmless: the same minimum is stored twice
            if len(moved):
                mins[moved] = lots[:, moved].min(axis=0)
        caps = np.minimum(mins[who], float(self.max_lots)).astype(np.int64)
        return Caps(lots=caps, flagged=flagged)

    def binding(self, who: IntArray, flagged: BoolArray) -> IntArray:
        """Per account of `who` (after `exact_caps`), the index in `codes` of its cap's limit."""
        sub = self.lots[:, who]
        low = sub.min(axis=0)
        out: IntArray = sub.argmin(axis=0).astype(np.int64)
        at_max = np.where(flagged, low > self.max_lots, low >= self.max_lots)
        out[at_max] = len(self.limits)
        return out


def _short_texts(limit: Limit, per_lot: Decimal, who: IntArray, order: OrderTerms) -> Texts:
    """`CODE: needed=... left=... <detail> quantity=...` for the accounts `who` of one limit.

    The accounts' numbers are copied now, the texts written later (the book's columns move on).
    """
    left = limit.headroom[who]
    taken = [c[who] for c in limit.detail_columns]

    def write() -> list[str]:
        head = f"{limit.code}: needed={per_lot * order.min_lots:.2f} left="
        tail = f" quantity={order.min_quantity}"
        details = (
            [limit.detail(*v) for v in zip(*(t.tolist() for t in taken), strict=True)]
            if taken
            else [limit.detail()] * len(who)
        )
        return [
            f"{head}{lft:.2f}{' ' + detail if detail else ''}{tail}"
            for lft, detail in zip(left.tolist(), details, strict=True)
        ]

    return write


def _no_state(count: int) -> Texts:
    return lambda: ["NO_ACCOUNT_STATE: no state received for this account"] * count


def evaluate(x: CheckInputs) -> Eligibility:
    """Run every gate and limit over every account of the portfolio."""
    c = x.cols
    n = len(c)
    has_state = c.has_state
    checks = _checks(x)
    missing = derived(c).missing
    gated = list(checks.failures)
    excluded = checks.excluded
    for position, check in enumerate(GATES):
        if check in DYNAMIC_GATES:
            gate = check(x)
            if gate is not None:
                hit = gate.fails & has_state
                who = hit.nonzero()[0]
                if len(who):
                    gated.append((position, who, gate.why(who)))
                    excluded = excluded | hit
    gated.sort(key=lambda f: f[0])
    failures: list[tuple[IntArray, Texts]] = [(who, texts) for _, who, texts in gated]
    if len(missing):
        failures.insert(0, (missing, _no_state(len(missing))))
    order = x.order
    limits = [_used_today(lim, x) for lim in checks.limits]
    per_lot = tuple(order.per_lot(lim.per) for lim in limits)
    budget = None
    for k, lim in enumerate(limits):
        if lim is not checks.limits[k]:
            budget = (k, lim.headroom)
    shape = (len(limits), n)
    lots, (ks, iss) = cap_lots(
        checks,
        [float(p) for p in per_lot],
        order.max_lots,
        (c.scratch(("cap_lots", 0), shape), c.scratch(("cap_lots", 1), shape)),
        budget,
    )
    if len(ks):
        keep = has_state[iss]
        ks, iss = ks[keep], iss[keep]
        # Whether even the minimum fits decides eligibility: settle that boundary exactly now.
        edge = lots[ks, iss] == order.min_lots - 1
        for k, i in zip(ks[edge].tolist(), iss[edge].tolist(), strict=True):
            lots[k, i] = _exact_lots(limits[k], per_lot[k], x, i)
        ks, iss = ks[~edge], iss[~edge]
    short = lots < order.min_lots
    complete = len(missing) == 0  # every account has a state
    for k in np.flatnonzero(short.any(axis=1)).tolist():
        who = (short[k] if complete else short[k] & has_state).nonzero()[0]
        if len(who):
            failures.append((who, _short_texts(limits[k], per_lot[k], who, order)))
    return Eligibility(
        eligible=~(excluded | short.any(axis=0)),
        lots=lots,
        uncertain=(ks, iss),
        codes=(*(lim.code for lim in limits), "MAX_QUANTITY"),
        failures=tuple(failures),
        headroom={lim.code: lim.headroom for lim in limits},
        wholes={lim.code: lim.whole for lim in limits if lim.whole is not None},
        limits=tuple(limits),
        per_lot=per_lot,
        inputs=x,
        max_lots=order.max_lots,
    )
