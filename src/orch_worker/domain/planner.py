"""Planning: (signal, account states, configuration, context) -> Plan. Pure and deterministic.

The steps, each in its own module:

1. refuse a signal the portfolio cannot plan (unknown portfolio or symbol, no quantity for a
   splitting method, no price, no stop loss for risk sizing);
2. `eligibility`: every gate and limit of every account, with all failing reasons, and each
   account's cap in lots;
3. `correlation`: each account's correlated open risk, and the portfolio's cluster cap, which
   shrinks the total or rejects the signal with `CORRELATION_LIMIT`;
4. `scoring`: rank the eligible accounts; `max_accounts` keeps the best, the next ones become
   the plan's alternatives for reroutes;
5. `allocation`: split the total by the portfolio's method under every cap, in whole lots, with
   the remainder to a deterministic owner and shares below the minimum dropped.

Nothing is random and nothing reads the clock (`PlanContext.now`, else the signal's
`created_at`, is the time windows are checked at). Every allocation carries the numbers that sized
it, every exclusion its reasons, the plan its own numbers.

Speed (issue 3's targets: p99 <= 0.5 ms at 100 accounts, <= 5 ms at 10,000, see
`bench/planning.py`): every decision is numpy arithmetic over the portfolio's columns; what
depends on the columns alone is memoised on them until the next state update; and the plan's
allocations and exclusions -- a rationale and a dict of numbers per account, thousands of them in
a large portfolio -- are written from the decided columns only when first read (`plan.Plan`).
The plan returned is the plan of the account states as they were, whatever the book receives
before it is read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import ROUND_DOWN, Decimal

import numpy as np
import numpy.typing as npt
from pydantic import JsonValue

from orch_worker.domain import ids
from orch_worker.domain.allocation import Split, split
from orch_worker.domain.book import AccountBook, PortfolioColumns
from orch_worker.domain.config import (
    AllocationMethod,
    InstrumentConfig,
    OrchConfig,
    PortfolioConfig,
)
from orch_worker.domain.correlation import (
    ClusterLimit,
    CorrelationMatrix,
    cluster_limit,
    correlated_open_risk,
)
from orch_worker.domain.eligibility import (
    CheckInputs,
    Eligibility,
    OrderTerms,
    Texts,
    evaluate,
    lots_down,
)
from orch_worker.domain.models import AccountState, Signal
from orch_worker.domain.plan import (
    Allocation,
    Exclusion,
    Plan,
    trusted_allocation,
    trusted_exclusion,
)
from orch_worker.domain.scoring import (
    combine,
    correlation_factor,
    margin_factor,
    rank,
    risk_budget_factor,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class PlanContext:
    """What the planner knows beyond the signal, the account states and the configuration."""

    paused_accounts: frozenset[str] = frozenset()
    now: datetime | None = None
    """When the plan is made (trading and blackout windows); None means the signal's created_at."""
    cooldown_accounts: frozenset[str] = frozenset()
    """Accounts resting after repeated failures."""
    risk_used_today: Mapping[str, Decimal] = field(default_factory=dict)
    """Stop-loss risk already taken today, per account, against `daily_risk_budget_pct`."""
    health: Mapping[str, float] = field(default_factory=dict)
    """0..1 per account from recent rejects and failures; missing = 1."""
    quality: Mapping[str, float] = field(default_factory=dict)
    """0..1 per account from fill rate and slippage; missing = 1."""
    correlations: CorrelationMatrix | None = None
    """Overrides the configured correlations (e.g. computed from recent prices)."""
    rotation: int = 0
    """Rotates tie order (remainder lots, ranking) over the sorted account ids; the caller passes
    e.g. the portfolio's count of planned signals so extra lots take turns."""


def round_to_step(quantity: Decimal, step: Decimal) -> Decimal:
    """Round down to a multiple of `step`: rounding must never allocate more than asked."""
    return (quantity / step).to_integral_value(rounding=ROUND_DOWN) * step


def margin_for(quantity: Decimal, price: Decimal, inst: InstrumentConfig) -> Decimal:
    return quantity * inst.value_per_unit * price * inst.margin_rate


def _rejected(
    signal: Signal,
    reason: str,
    excluded: _ExclusionRows | None = None,
    numbers: dict[str, JsonValue] | None = None,
    alternatives: tuple[str, ...] = (),
) -> Plan:
    fields: dict[str, object] = {
        "plan_id": ids.plan_id(signal.signal_id),
        "signal_id": signal.signal_id,
        "portfolio": signal.portfolio,
        "symbol": signal.symbol,
        "side": signal.side,
        "method": "none",
        "requested": signal.quantity or Decimal(0),
        "alternatives": alternatives,
        "rejected_reason": reason,
        "numbers": numbers or {},
    }
    if excluded is None:
        return Plan.model_validate({**fields, "allocations": (), "exclusions": ()})
    return Plan.deferred(_Rows(None, excluded), **fields)


def _signal_refusal(signal: Signal, config: OrchConfig) -> str | None:
    pf = config.portfolios.get(signal.portfolio)
    if pf is None:
        return f"UNKNOWN_PORTFOLIO: {signal.portfolio}"
    if signal.symbol not in config.instruments:
        return f"UNKNOWN_SYMBOL: no instrument configured for {signal.symbol}"
    risk = pf.allocation is AllocationMethod.RISK
    if signal.quantity is None and not risk:
        return f"NO_QUANTITY: this portfolio splits the signal's quantity ({pf.allocation.value})"
    if signal.entry_price is None:
        return "NO_PRICE: need limit_price or reference_price for margin"
    if risk and signal.stop_loss is None:
        return "NO_STOP_LOSS: this portfolio sizes by risk, which needs the stop distance"
    return None


def _columns(
    portfolio: str, accounts: Mapping[str, AccountState], config: OrchConfig
) -> tuple[PortfolioColumns, CorrelationMatrix]:
    if isinstance(accounts, AccountBook) and accounts.config is config:
        return accounts.columns(portfolio), accounts.correlations
    cols = PortfolioColumns.build(config, portfolio, accounts)
    return cols, CorrelationMatrix.from_config(config)


def _flags(ids_: frozenset[str], index: Mapping[str, int], n: int) -> npt.NDArray[np.bool_] | None:
    hits = [index[a] for a in ids_ if a in index]
    if not hits:
        return None
    out = np.zeros(n, dtype=bool)
    out[hits] = True
    return out


def _values(
    values: Mapping[str, float] | Mapping[str, Decimal],
    index: Mapping[str, int],
    n: int,
    default: float,
) -> FloatArray:
    out = np.full(n, default)
    for a, v in values.items():
        i = index.get(a)
        if i is not None:
            out[i] = float(v)
    return out


def _rho_row(cols: PortfolioColumns, order: OrderTerms, corr: CorrelationMatrix) -> FloatArray:
    if corr.symbols == cols.symbols:
        row: FloatArray = corr.matrix[order.column]
        return row
    return corr.row(order.symbol, cols.symbols)


def _correlated(
    cols: PortfolioColumns, order: OrderTerms, corr: CorrelationMatrix
) -> tuple[FloatArray, FloatArray]:
    """The correlation row of the signal's symbol, and each account's correlated open risk."""

    def make() -> tuple[FloatArray, FloatArray]:
        rho = _rho_row(cols, order, corr)
        return rho, correlated_open_risk(cols.long_risk, cols.short_risk, rho, order.sign)

    return cols.memo(("correlated", corr, order.symbol, order.sign), make)


def _scores(
    *,
    cols: PortfolioColumns,
    elig: Eligibility,
    correlated_open: FloatArray,
    ctx: PlanContext,
    pf: PortfolioConfig,
) -> FloatArray:
    """Every account's score (meaningful for the eligible ones): whole columns are cheaper to
    compute than to gather the eligible rows from."""
    equity = cols.equity
    margin_left = elig.headroom["INSUFFICIENT_MARGIN"]
    if "MAX_MARGIN_USE" in elig.headroom:
        margin_left = np.fmin(margin_left, elig.headroom["MAX_MARGIN_USE"])
    codes = list(elig.wholes)
    n = len(cols)
    risk = risk_budget_factor([elig.headroom[c] for c in codes], [elig.wholes[c] for c in codes], n)

    def supplied(values: Mapping[str, float]) -> FloatArray:
        if not values:
            return np.ones(n)
        return np.clip(_values(values, cols.index, n, 1.0), 0.0, 1.0)

    parts = {
        "margin": margin_factor(margin_left, equity),
        "risk_budget": risk,
        "health": supplied(ctx.health),
        "quality": supplied(ctx.quality),
        "correlation": correlation_factor(correlated_open, equity),
    }
    return combine(pf.score_weights, parts)


def _weights(
    method: AllocationMethod, cols: PortfolioColumns, elig: Eligibility, who: IntArray
) -> FloatArray:
    match method:
        case AllocationMethod.EQUAL:
            return np.ones(len(who))
        case AllocationMethod.RATIO:
            return cols.rules.ratio[who]
        case AllocationMethod.EQUITY:
            return np.maximum(cols.equity[who], 0.0)
        case AllocationMethod.AVAILABLE_MARGIN:
            return np.maximum(cols.margin_available[who], 0.0)
        case AllocationMethod.RISK:
            # refused earlier without a stop loss: risk sizing needs it
            return np.maximum(elig.risk_target(who), 0.0)


def _cluster(
    pf: PortfolioConfig,
    cols: PortfolioColumns,
    order: OrderTerms,
    rho: FloatArray,
    corr: CorrelationMatrix,
) -> tuple[ClusterLimit, float] | None:
    if pf.max_cluster_risk_share is None:
        return None
    cap = pf.max_cluster_risk_share

    def make() -> ClusterLimit:
        ones = np.ones(len(cols))  # rows without a state are all zeros
        return cluster_limit(
            ones @ cols.long_risk,
            ones @ cols.short_risk,
            rho_row=rho,
            side_sign=order.sign,
            threshold=pf.correlation_cluster_threshold,
            cap=cap,
            portfolio_equity=float(cols.equity.sum()),
            floor_pct=float(pf.cluster_risk_floor_pct),
        )

    key = (corr, order.symbol, order.sign, cap, pf.correlation_cluster_threshold)
    limit = cols.memo(("cluster", *key, pf.cluster_risk_floor_pct), make)
    proxy = float(cols.risk_proxy_pct[order.column]) / 100
    per_lot = (
        float(order.risk_per_lot)
        if order.risk_per_lot is not None
        else float(order.notional_per_lot) * proxy
    )
    return limit, per_lot


def _cluster_numbers(limit: ClusterLimit, per_lot: float, lots: int) -> dict[str, JsonValue]:
    return {
        "cluster_risk": f"{limit.cluster_risk:.2f}",
        "portfolio_risk": f"{limit.total_risk:.2f}",
        "floor": f"{limit.floor:.2f}",
        "new_risk": f"{lots * per_lot:.2f}",
        "share_after": f"{limit.share(lots * per_lot):.4f}",
        "max_share": f"{limit.cap:g}",
        "max_new_risk": f"{limit.max_new_risk:.2f}",
    }


def _select(
    *,
    cols: PortfolioColumns,
    elig: Eligibility,
    candidates: IntArray,
    correlated: FloatArray,
    ctx: PlanContext,
    pf: PortfolioConfig,
    kind: Hashable,
) -> tuple[IntArray, IntArray, FloatArray | None]:
    """The accounts to size (sorted), the ranked alternatives, and the scores (None = nobody
    was ranked)."""
    keep = pf.max_accounts or len(candidates)
    if keep >= len(candidates):  # ranking matters only when eligible accounts are left out
        return candidates, candidates[:0], None
    n = len(cols)

    def make() -> FloatArray:
        return _scores(cols=cols, elig=elig, correlated_open=correlated, ctx=ctx, pf=pf)

    if ctx.health or ctx.quality or ctx.risk_used_today:
        scores = make()
    else:  # nothing from the context: the same for every order of this kind until an update
        scores = cols.memo(("scores", kind, pf.score_weights), make)
    count = min(keep + pf.max_alternatives, len(candidates))
    key = np.full(n, np.inf)  # the ineligible sort after every eligible account
    key[candidates] = -scores[candidates]
    ranked = rank(-key, _tie(np.arange(n), ctx.rotation, n), count)
    ranked_scores = np.full(n, np.nan)
    ranked_scores[candidates] = scores[candidates]
    return np.sort(ranked[:keep]), ranked[keep:], ranked_scores


def _tie(rows: IntArray, rotation: int, n: int) -> IntArray:
    """Tie order of `rows`: account id order rotated by `rotation`."""
    out: IntArray = (rows - rotation) % max(n, 1)
    return out


def _cap_by_cluster(
    *,
    pf: PortfolioConfig,
    cols: PortfolioColumns,
    order: OrderTerms,
    rho: FloatArray,
    corr: CorrelationMatrix,
    wanted: int,
    numbers: dict[str, JsonValue],
) -> int | str:
    """The total in lots the portfolio's cluster cap allows, or the CORRELATION_LIMIT refusal."""
    cluster = _cluster(pf, cols, order, rho, corr)
    if cluster is None:
        return wanted
    limit, per_lot = cluster
    if per_lot > 0 and math.isfinite(limit.max_new_risk):
        room = math.floor(limit.max_new_risk / per_lot + 1e-9)
    else:
        room = wanted
    numbers["cluster"] = _cluster_numbers(limit, per_lot, min(wanted, room))
    if wanted <= room:
        return wanted
    if room < order.min_lots or pf.correlation_limit_action == "reject":
        details = _cluster_numbers(limit, per_lot, wanted)
        return (
            "CORRELATION_LIMIT: "
            + " ".join(f"{k}={v}" for k, v in details.items())
            + f" quantity={order.quantity(wanted)}"
        )
    numbers["cluster"] = {
        **_cluster_numbers(limit, per_lot, room),
        "reduced_from": str(order.quantity(wanted)),
    }
    return room


def plan_signal(
    signal: Signal,
    accounts: Mapping[str, AccountState],
    config: OrchConfig,
    ctx: PlanContext,
) -> Plan:
    """Decide who takes `signal` and how much; see the module docstring for the steps.

    The plan's allocations and exclusions are written when first read (see `plan.Plan`): the
    decisions, every number behind them included, are made here.
    """
    refusal = _signal_refusal(signal, config)
    if refusal is not None:
        return _rejected(signal, refusal)
    pf = config.portfolios[signal.portfolio]
    inst = config.instruments[signal.symbol]
    cols, configured = _columns(signal.portfolio, accounts, config)
    order = OrderTerms.of(signal, inst, cols.symbol_index[signal.symbol])
    corr = ctx.correlations or configured
    rho, correlated = _correlated(cols, order, corr)
    n = len(cols)
    # The states as planned: a book's own list changes with the next update, and the reasons
    # and rationales are written from these later.
    states = cols.states.copy()
    elig = evaluate(
        CheckInputs(
            cols=cols,
            order=order,
            method=pf.allocation,
            now=ctx.now or signal.created_at,
            paused=_flags(ctx.paused_accounts, cols.index, n),
            cooldown=_flags(ctx.cooldown_accounts, cols.index, n),
            risk_used=(
                _values(ctx.risk_used_today, cols.index, n, 0.0) if ctx.risk_used_today else None
            ),
            risk_used_exact=ctx.risk_used_today,
            correlated_open=correlated,
            cross_account_hedging_allowed=pf.cross_account_hedging_allowed,
            correlations=corr,
            states=states,
        )
    )
    candidates = elig.eligible.nonzero()[0]
    numbers: dict[str, JsonValue] = {"accounts": n, "eligible": len(candidates)}
    numbers["rotation"] = ctx.rotation
    excluded = _ExclusionRows(cols.ids, elig.failures, order, inst.min_quantity)
    if len(candidates) == 0:
        return _rejected(
            signal, "NO_ELIGIBLE_ACCOUNT: every account was excluded", excluded, numbers
        )

    selected, alternatives, scores = _select(
        cols=cols,
        elig=elig,
        candidates=candidates,
        correlated=correlated,
        ctx=ctx,
        pf=pf,
        kind=(corr, order.symbol, order.sign, order.risk_per_lot is None, pf.allocation),
    )
    numbers["selected"] = len(selected)
    caps = elig.exact_caps(selected)
    requested_lots = (
        lots_down(signal.quantity, order.step)
        if signal.quantity is not None
        else int(caps.lots.sum())
    )
    total = _cap_by_cluster(
        pf=pf,
        cols=cols,
        order=order,
        rho=rho,
        corr=corr,
        wanted=min(requested_lots, int(caps.lots.sum())),
        numbers=numbers,
    )
    if isinstance(total, str):
        return _rejected(signal, total, excluded, numbers)
    total = min(total, requested_lots)
    weights = _weights(pf.allocation, cols, elig, selected)
    sp = split(total, weights, caps.lots, order.min_lots, _tie(selected, ctx.rotation, n))
    excluded = excluded.with_dropped(selected, sp)
    alternative_ids = tuple(cols.ids_array[alternatives].tolist())
    given = (sp.lots > 0).nonzero()[0]
    if len(given) == 0:
        why = (
            "NO_ELIGIBLE_ACCOUNT: no selected account's share reaches the minimum quantity"
            if alternative_ids
            else "NO_ELIGIBLE_ACCOUNT: every account was excluded"
        )
        return _rejected(signal, why, excluded, numbers, alternative_ids)
    owners: list[JsonValue] = cols.ids_array[selected[sp.remainder > 0]].tolist()
    planned = int(sp.lots.sum())
    numbers |= {
        "requested_lots": requested_lots,
        "planned_lots": planned,
        "unallocated_lots": requested_lots - planned,
        "remainder": {
            "lots": len(owners),
            "owners": owners,
            "rule": "largest share first, ties in account id order rotated by `rotation`",
        },
    }
    rows, lots, capped = selected[given], sp.lots[given], caps.lots[given]
    # Which limit a cap comes from is only told where the account took all of its cap.
    binding = np.full(len(given), -1, dtype=np.int64)
    full = lots >= capped
    if full.any():
        binding[full] = elig.binding(rows[full], caps.flagged[given][full])
    allocated = _AllocationRows(
        signal_quantity=signal.quantity,
        method=pf.allocation,
        ids=cols.ids,
        states=states,
        order=order,
        codes=elig.codes,
        rows=rows,
        lots=lots,
        weights=weights[given],
        unrounded=sp.shares[given] * float(order.step),
        remainder=sp.remainder[given],
        caps=capped,
        binding=binding,
        scores=None if scores is None else scores[selected[given]],
        risk_pct=cols.rules.values["risk_per_trade_pct"][selected[given]],
        planned_lots=planned,
    )
    return Plan.deferred(
        _Rows(allocated, excluded),
        plan_id=ids.plan_id(signal.signal_id),
        signal_id=signal.signal_id,
        portfolio=signal.portfolio,
        symbol=signal.symbol,
        side=signal.side,
        method=pf.allocation.value,
        requested=(
            signal.quantity if signal.quantity is not None else order.quantity(requested_lots)
        ),
        alternatives=alternative_ids,
        rejected_reason=None,
        numbers=numbers,
    )


# --- writing the plan's rows (when first read) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ExclusionRows:
    """Every excluded account and its reasons; written only when the plan's exclusions are read.
    Holds copies and immutable values only (see `eligibility.Gate.why`)."""

    ids: tuple[str, ...]
    failures: tuple[tuple[IntArray, Texts], ...]
    order: OrderTerms
    min_quantity: Decimal
    dropped: IntArray | None = None
    """Rows of the accounts dropped below the minimum..."""
    dropped_lots: IntArray | None = None
    """... and their rounded shares in lots."""

    def with_dropped(self, selected: IntArray, sp: Split) -> _ExclusionRows:
        if len(sp.dropped_at) == 0:
            return self
        return replace(self, dropped=selected[sp.dropped_at], dropped_lots=sp.dropped_lots)

    def __call__(self) -> tuple[Exclusion, ...]:
        reasons: dict[int, list[str]] = {}
        for who, write in self.failures:
            for i, text in zip(who.tolist(), write(), strict=True):
                reasons.setdefault(i, []).append(text)
        if self.dropped is not None and self.dropped_lots is not None:
            quantity, minimum = self.order.quantity, self.min_quantity
            for i, lots in zip(self.dropped.tolist(), self.dropped_lots.tolist(), strict=True):
                reasons[i] = [f"BELOW_MIN_QUANTITY: share={quantity(lots)} min={minimum}"]
        ids_ = self.ids
        # ids are unique, and sorted ids are the row order
        return tuple(trusted_exclusion(ids_[i], tuple(reasons[i])) for i in sorted(reasons))


@dataclass(frozen=True, slots=True)
class _AllocationRows:
    """Everything the allocations' rationales and numbers are written from: copies of the
    decided columns for the accounts that got lots, and immutable values."""

    signal_quantity: Decimal | None
    method: AllocationMethod
    ids: tuple[str, ...]
    states: list[AccountState | None]
    order: OrderTerms
    codes: tuple[str, ...]
    rows: IntArray
    lots: IntArray
    weights: FloatArray
    unrounded: FloatArray
    remainder: IntArray
    caps: IntArray
    binding: IntArray
    """Index in `codes` of the limit of each account's cap, where it took all of it."""
    scores: FloatArray | None
    risk_pct: FloatArray
    planned_lots: int

    def total(self) -> Decimal:
        """What the allocations add up to: the sum of their quantities, written as that sum."""
        return Decimal(0) + self.order.quantity(self.planned_lots)

    def _sizes(self) -> Callable[[int], tuple[Decimal, str, str, str | None]]:
        """(quantity, its text, its margin, its risk) of a number of lots, each written once:
        many accounts take the same number of lots."""
        order = self.order
        written: dict[int, tuple[Decimal, str, str, str | None]] = {}

        def sizes(lots: int) -> tuple[Decimal, str, str, str | None]:
            texts = written.get(lots)
            if texts is None:
                size = Decimal(lots)
                q = size * order.step
                risk = None if order.risk_per_lot is None else f"{size * order.risk_per_lot:.2f}"
                texts = written[lots] = (q, str(q), f"{size * order.margin_per_lot:.2f}", risk)
            return texts

        return sizes

    def __call__(self) -> tuple[Allocation, ...]:
        method = self.method.value
        order = self.order
        by_risk = self.method is AllocationMethod.RISK
        if by_risk:
            head = f"risk sizing at stop distance {order.stop_distance}"
        else:
            head = (
                f"{method} split of {self.signal_quantity} over {len(self.rows)} accounts "
                f"in steps of {order.step}"
            )
        weighted = self.method not in (AllocationMethod.EQUAL, AllocationMethod.RISK)
        weight_total = f"{float(self.weights.sum()):.6g}"
        per_lot_risk = order.risk_per_lot
        distance = str(order.stop_distance)
        codes = self.codes
        scores = self.scores.tolist() if self.scores is not None else [math.nan] * len(self.rows)
        rows = zip(
            self.rows.tolist(),
            self.lots.tolist(),
            self.weights.tolist(),
            self.unrounded.tolist(),
            self.remainder.tolist(),
            self.caps.tolist(),
            self.binding.tolist(),
            scores,
            self.risk_pct.tolist(),
            strict=True,
        )
        sizes = self._sizes()
        per_lot_risk_text = "" if per_lot_risk is None else f"{per_lot_risk:.2f}"
        out = []
        for i, lots, weight, unrounded, extra, cap, bind, score, pct in rows:
            state = self.states[i]
            assert state is not None  # only accounts with a state are eligible
            q, share, margin, risk = sizes(lots)
            cap_q = sizes(cap)[1]
            capped_by = codes[bind] if lots >= cap else None
            if by_risk and capped_by == "RISK_PER_TRADE":  # that is the size itself, not a cap
                capped_by = None
            weight_text = f"{weight:.6g}"
            numbers: dict[str, JsonValue] = {
                "share": share,
                "margin": margin,
                "margin_available": str(state.margin_available),
                "equity": str(state.equity),
                "method": method,
                "weight": weight_text,
                "unrounded_share": f"{unrounded:.6g}",
                "remainder_lot": bool(extra),
                "cap": cap_q,
                "capped_by": capped_by,
            }
            if not math.isnan(score):  # the account was ranked
                numbers["score"] = f"{score:.4f}"
            if risk is not None:
                numbers["risk"] = risk
                numbers["stop_distance"] = distance
            why = head
            if by_risk:
                why += (
                    f": {pct:g}% of equity {state.equity} = "
                    f"{float(state.equity) * pct / 100:.2f} "
                    f"to risk, {lots} lots of {per_lot_risk_text}"
                )
                numbers["risk_per_trade_pct"] = f"{pct:g}"
            if weighted:
                why += f" (weight {weight_text} of {weight_total})"
            if extra:
                why += "; +1 remainder lot (largest share first)"
            if capped_by is not None:
                why += f"; capped at {cap_q} by {capped_by}"
            why += f"; margin {margin} of {state.margin_available:.2f} available"
            out.append(trusted_allocation(self.ids[i], state.broker, q, why, numbers))
        return tuple(out)


@dataclass(frozen=True, slots=True)
class _Rows:
    """A plan's deferred rows (`plan.DeferredRows`)."""

    allocated: _AllocationRows | None
    excluded: _ExclusionRows | None

    def allocations(self) -> tuple[Allocation, ...]:
        return () if self.allocated is None else self.allocated()

    def exclusions(self) -> tuple[Exclusion, ...]:
        return () if self.excluded is None else self.excluded()

    def planned_total(self) -> Decimal:
        return Decimal(0) if self.allocated is None else self.allocated.total()
