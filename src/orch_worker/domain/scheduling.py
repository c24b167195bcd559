"""When each account's order of a signal is released: the timing policy, pure and seeded.

Delays exist for three reasons only, and each slot says which applied: the portfolio's stagger
window (market impact, not competing with ourselves for liquidity), the minimum spacing between
two releases of one portfolio, and the broker's rate budget shared by all its accounts. The order
in which accounts go rotates with the portfolio's signal sequence, so over many signals each
account goes first equally often. Nothing here is random except the stagger draws, and those are
seeded from the signal id: a replay gives the same times.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from orch_worker.domain.config import BrokerConfig, StaggerConfig
from orch_worker.domain.ids import seed_for
from orch_worker.domain.models import Signal, Urgency

EPSILON_S = 1e-6
"""Times are kept to the microsecond; gaps are compared with this much slack."""


@dataclass(frozen=True, slots=True)
class Slot:
    account_id: str
    broker: str
    position: int
    """0 = released first."""
    base_delay_s: float
    """The stagger draw (0 for urgent signals), before spacing and rate limits."""
    scheduled_at: datetime
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Schedule:
    slots: tuple[Slot, ...]
    window: tuple[float, float]
    rotation: int
    urgent: bool
    rationale: str

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(s.account_id for s in self.slots)


def release_order(accounts: Sequence[str], rotation: int) -> tuple[str, ...]:
    """Sorted account ids rotated by the portfolio's signal sequence (round robin)."""
    ordered = sorted(accounts)
    if not ordered:
        return ()
    k = rotation % len(ordered)
    return tuple(ordered[k:] + ordered[:k])


def effective_window(stagger: StaggerConfig, volatility: float | None) -> tuple[float, float]:
    """The stagger window, shrunk as volatility rises: waiting costs more in a fast market."""
    lo, hi = stagger.min_s, stagger.max_s
    if volatility is None or volatility <= 0:
        return lo, hi
    factor = 1.0 / (1.0 + volatility / stagger.volatility_ref)
    return lo, lo + (hi - lo) * factor


def earliest_slot(desired: float, taken: Sequence[float], gap: float) -> float:
    """The first time at or after `desired` at least `gap` away from every time in `taken`.

    `taken` is sorted. Each conflict moves the candidate to just after the conflicting time, so
    the loop ends after at most len(taken) steps.
    """
    if gap <= 0 or not taken:
        return desired
    t = desired
    while True:
        i = bisect.bisect_left(taken, t - gap + EPSILON_S)
        if i < len(taken) and taken[i] < t + gap - EPSILON_S:
            t = taken[i] + gap
            continue
        return t


def _ts(dt: datetime) -> float:
    return dt.timestamp()


def _dt(ts: float) -> datetime:
    # Round to the microsecond so the emitted RFC 3339 time is the time we compare with.
    return datetime.fromtimestamp(round(ts, 6), tz=UTC)


def schedule(
    allocations: Sequence[tuple[str, str]],
    signal: Signal,
    stagger: StaggerConfig,
    brokers: Mapping[str, BrokerConfig],
    *,
    rotation: int,
    now: datetime,
    portfolio_taken: Sequence[datetime] = (),
    broker_taken: Mapping[str, Sequence[datetime]] | None = None,
) -> Schedule:
    """Release times for (account_id, broker) allocations of one signal.

    Args:
        rotation: the portfolio's signal sequence number; it picks who goes first.
        portfolio_taken: release times already reserved by this portfolio's other intents.
        broker_taken: release times already reserved at each broker (all portfolios).
    """
    urgent = signal.urgency is Urgency.HIGH
    volatility = float(signal.volatility) if signal.volatility is not None else None
    lo, hi = (0.0, 0.0) if urgent else effective_window(stagger, volatility)
    order = release_order([a for a, _ in allocations], rotation)
    broker_of = dict(allocations)
    rng = random.Random(seed_for(signal.signal_id))  # timing spread, seeded; not secrecy
    draws = sorted(rng.uniform(lo, hi) for _ in range(max(len(order) - 1, 0)))
    base = [lo, *draws] if order else []
    # Only reservations a gap rule can conflict with are looked at: none without the rule, and
    # none older than one gap before now (every new release is at or after now).
    start = _ts(now)
    spacing = stagger.min_spacing_s
    taken_pf = (
        sorted(x for x in (_ts(t) for t in portfolio_taken) if x > start - spacing)
        if spacing > 0
        else []
    )
    taken_broker: dict[str, list[float]] = {}
    for b, ts in (broker_taken or {}).items():
        rate = brokers.get(b, BrokerConfig()).max_orders_per_s
        if rate and b in {broker for _, broker in allocations}:
            taken_broker[b] = sorted(x for x in (_ts(t) for t in ts) if x > start - 1.0 / rate)
    slots: list[Slot] = []
    previous = start
    for position, (account, delay) in enumerate(zip(order, base, strict=True)):
        broker = broker_of[account]
        rate = brokers.get(broker, BrokerConfig()).max_orders_per_s
        broker_gap = 1.0 / rate if rate else 0.0
        reasons = [
            "urgent: stagger skipped, released as fast as spacing and rate budgets allow"
            if urgent
            else f"stagger {delay:.3f}s in window {lo:.3f}-{hi:.3f}s"
        ]
        desired = max(start + delay, previous)
        t = desired
        for _ in range(len(taken_pf) + len(taken_broker.get(broker, ())) + 2):
            moved = earliest_slot(t, taken_pf, stagger.min_spacing_s)
            moved = earliest_slot(moved, taken_broker.get(broker, []), broker_gap)
            if abs(moved - t) <= EPSILON_S:
                break
            t = moved
        if t - desired > EPSILON_S:
            why = []
            if stagger.min_spacing_s > 0:
                why.append(f"portfolio spacing {stagger.min_spacing_s:g}s")
            if broker_gap > 0:
                why.append(f"{broker} budget {rate:g}/s")
            reasons.append(f"pushed {t - desired:.3f}s by " + " and ".join(why))
        t = round(t, 6)
        bisect.insort(taken_pf, t)
        bisect.insort(taken_broker.setdefault(broker, []), t)
        previous = t
        slots.append(Slot(account, broker, position, delay, _dt(t), tuple(reasons)))
    rationale = f"release order {', '.join(order)} (rotation {rotation} of {len(order)})" + (
        "; urgency high overrides the stagger window"
        if urgent
        else f"; stagger window {lo:.3f}-{hi:.3f}s"
        + (f" shrunk for volatility {volatility:g}" if volatility else "")
    )
    return Schedule(tuple(slots), (lo, hi), rotation, urgent, rationale)


def drift_bps(reference: float, price: float) -> float:
    """How far the price has moved from the signal's reference, in basis points."""
    return abs(price - reference) / reference * 10_000.0
