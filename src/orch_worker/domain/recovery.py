"""Failure recovery policy: what a reject means, how long to wait, and when an account rests.

Pure and deterministic: time is an argument and the only randomness, the backoff jitter, comes
from a `random.Random` seeded by the signal, account and attempt, so a replay (or a restarted
worker) waits exactly as long as the first run did.

* `classify` maps each venue reason code to a remedy (a literal table).
* `backoff_s` is exponential backoff with full jitter: uniform(0, min(cap, base * 2^(n-1))).
* `AccountHealth` is one account's recent failures and rests: the circuit breaker (too many
  failures in a window) and the suspension cooldown; both keep it out of planning and reroutes.
* `next_session_open`, `repriced_limit` and `adjusted_stop` compute a retry's new terms.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from datetime import time as dtime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from enum import StrEnum

from orch_worker.domain.config import ExecutionConfig, InstrumentConfig
from orch_worker.domain.ids import seed_for
from orch_worker.domain.immutable import Immutable
from orch_worker.domain.models import OrderIntent, ReasonCode, Side, Signal
from orch_worker.domain.timewindows import parse_windows


class Remedy(StrEnum):
    RETRY = "retry"
    """Transient: the same order to the same account after a backoff."""
    REDUCE = "reduce"
    """Too big for the account's margin: a smaller order to the same account."""
    REROUTE = "reroute"
    """The account cannot trade: it rests, and the remainder goes to an alternative."""
    NEXT_SESSION = "next_session"
    """The market is closed: the same order when the instrument's next session opens."""
    ADJUST_STOPS = "adjust_stops"
    """The stops are too close: moved out to the instrument's minimum distance, once."""
    ESCALATE = "escalate"
    """Nothing safe to do automatically: ask a human."""


R = ReasonCode
REMEDIES: dict[ReasonCode, Remedy] = {
    R.CONNECTION_ERROR: Remedy.RETRY,
    R.TIMEOUT: Remedy.RETRY,
    R.RATE_LIMITED: Remedy.RETRY,
    R.INSUFFICIENT_MARGIN: Remedy.REDUCE,
    R.ACCOUNT_SUSPENDED: Remedy.REROUTE,
    R.MARKET_CLOSED: Remedy.NEXT_SESSION,
    R.INVALID_STOPS: Remedy.ADJUST_STOPS,
    R.INVALID_SYMBOL: Remedy.ESCALATE,
    R.OTHER: Remedy.ESCALATE,
}
"""Every reason code's remedy; a missing code (or none at all) escalates."""

TRANSIENT = frozenset(c for c, r in REMEDIES.items() if r is Remedy.RETRY)

BREAKER_CODES = frozenset({R.CONNECTION_ERROR, R.TIMEOUT, R.RATE_LIMITED, R.OTHER})
"""Rejects that say something about the account's connection or health, so they count toward
its circuit breaker (an unknown outcome counts too). A closed market, bad stops or a bad symbol
are the order's problem, not the account's; suspension has its own cooldown."""


def classify(code: ReasonCode | None) -> Remedy:
    return REMEDIES.get(code, Remedy.ESCALATE) if code is not None else Remedy.ESCALATE


def backoff_s(signal_id: str, account_id: str, attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with full jitter for the `attempt`-th retry (1 = the first).

    Full jitter spreads retries of many orders hit by one outage instead of sending them back
    in lock-step; the seed makes each order's wait reproducible.
    """
    ceiling = min(cap_s, base_s * 2.0 ** max(attempt - 1, 0))
    rng = random.Random(seed_for(f"backoff\x1f{signal_id}\x1f{account_id}\x1f{attempt}"))
    return round(rng.uniform(0.0, ceiling), 6)


class AccountHealth(Immutable):
    """One account's recent failures and rests, kept per portfolio in the worker's state."""

    failures: tuple[datetime, ...] = ()
    """Failure times inside the breaker window (older ones are dropped)."""
    breaker_until: datetime | None = None
    suspended_until: datetime | None = None
    reason: str = ""

    def resting(self, now: datetime) -> bool:
        return (self.breaker_until is not None and now < self.breaker_until) or (
            self.suspended_until is not None and now < self.suspended_until
        )

    def score(self, now: datetime, cfg: ExecutionConfig) -> float:
        """0..1 for the planner's health factor: 1 with no recent failure, 0 at the breaker."""
        recent = sum(1 for t in self.failures if t > now - timedelta(seconds=cfg.breaker_window_s))
        return max(0.0, 1.0 - recent / cfg.breaker_failures)

    @property
    def empty(self) -> bool:
        return not self.failures and self.breaker_until is None and self.suspended_until is None


def record_failure(
    health: AccountHealth, now: datetime, cfg: ExecutionConfig, why: str
) -> tuple[AccountHealth, bool]:
    """Count one failure; returns the new health and whether this one opened the breaker."""
    since = now - timedelta(seconds=cfg.breaker_window_s)
    failures = (*(t for t in health.failures if t > since), now)
    already_open = health.breaker_until is not None and now < health.breaker_until
    if already_open or len(failures) < cfg.breaker_failures:
        return health.model_copy(update={"failures": failures}), False
    until = now + timedelta(seconds=cfg.breaker_cooldown_s)
    opened = health.model_copy(update={"failures": (), "breaker_until": until, "reason": why})
    return opened, True


def suspend(health: AccountHealth, now: datetime, cfg: ExecutionConfig, why: str) -> AccountHealth:
    until = now + timedelta(seconds=cfg.suspension_cooldown_s)
    current = health.suspended_until
    return health.model_copy(
        update={"suspended_until": max(until, current) if current else until, "reason": why}
    )


def next_session_open(sessions: tuple[str, ...], after: datetime) -> datetime | None:
    """The first session start strictly after `after` (UTC), within the next eight days.

    Strictly after: the venue has just said the market is closed, so a session the calendar
    thinks is running now is not one to retry into.
    """
    windows = parse_windows(sessions)
    day = after.astimezone(UTC).date()
    starts = [
        datetime.combine(day + timedelta(days=k), dtime(0), UTC) + timedelta(minutes=w.start)
        for k in range(8)
        for w in windows
        if (day + timedelta(days=k)).weekday() in w.days
    ]
    later = [s for s in starts if s > after]
    return min(later) if later else None


def _exponent(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    return exponent if isinstance(exponent, int) else 0


def repriced_limit(
    signal: Signal, current: Decimal | None, market: Decimal | None, max_bps: float
) -> Decimal | None:
    """A limit moved toward the market, within the signal's own terms, or None.

    The signal allows at most `max_bps` from its own limit price, and never a limit on the far
    side of its stop loss (a buy limit at or below its stop would be an order to lose). None
    when there is no market price, no room left, or the market is already inside the limit.
    """
    if signal.limit_price is None or current is None or market is None or max_bps <= 0:
        return None
    limit = signal.limit_price
    step = Decimal(1).scaleb(min(_exponent(limit), _exponent(market)))
    room = limit * Decimal(str(max_bps)) / Decimal(10_000)
    if signal.side is Side.BUY:
        new = min(market, limit + room).quantize(step, ROUND_FLOOR)
        if new <= current or (signal.stop_loss is not None and new <= signal.stop_loss):
            return None
    else:
        new = max(market, limit - room).quantize(step, ROUND_CEILING)
        if new >= current or (signal.stop_loss is not None and new >= signal.stop_loss):
            return None
    return new


def adjusted_stop(
    intent: OrderIntent, inst: InstrumentConfig, market: Decimal | None
) -> tuple[Decimal, Decimal] | None:
    """(stop loss, quantity) with the stop at least the instrument's minimum distance from the
    price, and the quantity cut so the order risks no more than it did; None if nothing can be
    adjusted (no minimum configured, no stop, already far enough, or too small to send)."""
    entry = intent.limit_price or intent.reference_price
    stop = intent.stop_loss
    if inst.min_stop_distance is None or stop is None or entry is None:
        return None
    price = market if market is not None else entry
    sign = intent.side.sign
    if sign * (price - stop) >= inst.min_stop_distance:
        return None
    new_stop = price - sign * inst.min_stop_distance
    if new_stop <= 0:
        return None
    old_risk, new_risk = abs(entry - stop), abs(entry - new_stop)
    quantity = intent.quantity
    if new_risk > old_risk > 0:
        quantity = quantity * old_risk / new_risk
    quantity = (quantity / inst.lot_step).to_integral_value(ROUND_FLOOR) * inst.lot_step
    if quantity < inst.min_quantity:
        return None
    away = ROUND_FLOOR if sign > 0 else ROUND_CEILING  # rounding must not bring it closer
    return new_stop.quantize(Decimal(1).scaleb(_exponent(stop)), away), quantity
