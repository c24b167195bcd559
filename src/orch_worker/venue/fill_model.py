"""The paper venue's fill model: one order intent in, its timed execution reports out.

Pure: no I/O, no clock, no global random state. Time comes in as `now` and randomness from a
`random.Random` seeded by sha256 of (venue seed, intent id), so a redelivered or replayed intent
gets exactly the reports it got the first time, with the same report and order ids. That is what
lets the orchestrator deduplicate reports and lets tests pin outcomes to a seed.

The model, per intent:

* an `accepted` report after a latency drawn in [latency_ms_min, latency_ms_max];
* then a `rejected` report, its reason drawn from `reject_probability` (or `other` when no price
  is known: a fill at an invented price would be worse than no fill);
* or fills: with `partial_fill_probability` a `partially_filled` report for a share of the
  quantity, then the completing `filled` report for market orders, while a limit order's rest
  stays open for the orchestrator to complete or cancel (an IOC limit's rest is cancelled at
  once, a FOK order never fills partially).
* A `cancel` intent answers for its parent order: `cancelled`, keeping what the parent filled.
* Scripted faults for tests and demos: `account_reject` rejects the orders of an account with a
  fixed reason, `silent_accounts` never answer, and `faults_max_attempt` limits rejects and
  partial fills to early attempts (the draws are still made, so the other draws of an intent do
  not change).
"""

from __future__ import annotations

import hashlib
import math
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, ROUND_DOWN, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal

from orch_worker.domain.config import VenueConfig
from orch_worker.domain.ids import NAMESPACE
from orch_worker.domain.models import (
    ExecutionReport,
    IntentKind,
    OrderIntent,
    OrderType,
    ReasonCode,
    ReportStatus,
    Side,
    TimeInForce,
)

TERMINAL_STATUSES = frozenset(
    {ReportStatus.FILLED, ReportStatus.REJECTED, ReportStatus.CANCELLED, ReportStatus.EXPIRED}
)
"""Statuses after which an order gets no further report."""

_PPM = 1_000_000  # shares are drawn in parts per million: exact decimals, no float noise
_BPS = Decimal(10_000)
_ZERO = Decimal(0)

_REJECT_TEXT: dict[ReasonCode, str] = {
    ReasonCode.INSUFFICIENT_MARGIN: (
        "Not enough free margin in account {account} to open {quantity} {symbol}."
    ),
    ReasonCode.CONNECTION_ERROR: (
        "The connection to the trading server dropped before the order for {symbol} was confirmed."
    ),
    ReasonCode.TIMEOUT: "The trading server did not confirm the order for {symbol} in time.",
    ReasonCode.RATE_LIMITED: "Too many requests from account {account}; the order was throttled.",
    ReasonCode.MARKET_CLOSED: "The market for {symbol} is closed.",
    ReasonCode.INVALID_STOPS: (
        "The stop loss or take profit of the {side} order for {symbol} is invalid for its price."
    ),
    ReasonCode.INVALID_SYMBOL: "Symbol {symbol} cannot be traded on account {account}.",
    ReasonCode.ACCOUNT_SUSPENDED: "Account {account} is suspended and cannot trade.",
    ReasonCode.OTHER: "The venue refused the order for {quantity} {symbol}.",
}


@dataclass(frozen=True, slots=True)
class ScheduledReport:
    """A report and how long after the intent arrived the venue sends it (cumulative)."""

    delay_s: float
    report: ExecutionReport


def rng_seed(venue_seed: int, intent_id: str) -> int:
    """The 64-bit seed of one intent's draws: stable across processes, runs and Python versions."""
    digest = hashlib.sha256(f"venue\x1f{venue_seed}\x1f{intent_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def report_id(intent_id: str, seq: int) -> str:
    """Id of the `seq`-th report the venue sends in answer to intent `intent_id`."""
    return str(uuid.uuid5(NAMESPACE, f"venue-report\x1f{intent_id}\x1f{seq}"))


def order_id(intent_id: str) -> str:
    """The venue's order id for an intent, so a cancel can name its parent's order."""
    return str(uuid.uuid5(NAMESPACE, f"venue-order\x1f{intent_id}"))


def simulate(
    intent: OrderIntent,
    cfg: VenueConfig,
    now: datetime,
    *,
    filled_so_far: Decimal = _ZERO,
    avg_price_so_far: Decimal | None = None,
    parent_open: bool = True,
) -> tuple[ScheduledReport, ...]:
    """Every report the venue sends for `intent`, in order, with cumulative delays.

    Args:
        intent: the order intent as released by the orchestrator.
        cfg: the fill model's parameters and seed.
        now: when the venue received the intent; `venue_time` = now + delay.
        filled_so_far: for a cancel, what the parent order had filled (the caller keeps it;
            this function cannot know).
        avg_price_so_far: for a cancel, the parent's average fill price, if it filled any.
        parent_open: for a cancel, False when the parent is unknown or already terminal, which
            makes the venue refuse the cancel instead of cancelling a finished order.

    Returns:
        The reports; the last one is terminal unless a limit order's rest stays open.
    """
    rng = random.Random(rng_seed(cfg.seed, intent.intent_id))
    if intent.account_id in cfg.silent_accounts:
        return ()
    if intent.kind is IntentKind.CANCEL:
        return _cancel(
            intent,
            cfg,
            rng,
            now,
            filled_so_far=filled_so_far,
            avg_price_so_far=avg_price_so_far,
            parent_open=parent_open,
        )
    timeline = _Timeline(intent, cfg, rng, now, intent_id=intent.intent_id)
    timeline.advance()
    timeline.emit(ReportStatus.ACCEPTED)
    faulty = cfg.faults_max_attempt is None or intent.attempt <= cfg.faults_max_attempt
    drawn = _draw_reject(rng, cfg, intent)
    scripted = _account_reject(cfg, intent) if faulty else None
    rejection = _price_problem(intent) or scripted or (drawn if faulty else None)
    timeline.advance()
    if rejection is not None:
        code, text = rejection
        timeline.emit(ReportStatus.REJECTED, reason_code=code, reason_text=text)
    else:
        _fill(timeline, partials=faulty)
    return tuple(timeline.reports)


def _account_reject(cfg: VenueConfig, intent: OrderIntent) -> tuple[ReasonCode, str] | None:
    code = cfg.account_reject.get(intent.account_id)
    if code is None:
        return None
    reason = ReasonCode(code)
    return reason, _reject_text(reason, intent)


@dataclass(slots=True)
class _Timeline:
    """The running state of one order while its reports are generated (local to one call)."""

    intent: OrderIntent
    cfg: VenueConfig
    rng: random.Random
    now: datetime
    intent_id: str
    order: str = ""
    delay_s: float = 0.0
    filled: Decimal = _ZERO
    notional: Decimal = _ZERO
    price_exponent: int | None = None
    reports: list[ScheduledReport] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.order = self.order or order_id(self.intent_id)

    def advance(self) -> None:
        """Move the clock on by one venue latency draw."""
        self.delay_s = round(self.delay_s + _latency_s(self.rng, self.cfg), 6)

    def fill(self, quantity: Decimal, price: Decimal) -> None:
        """Record a fill and report it as partial or complete."""
        self.filled += quantity
        self.notional += quantity * price
        exponent = _exponent(price)
        if self.price_exponent is None or exponent < self.price_exponent:
            self.price_exponent = exponent
        done = self.filled >= self.intent.quantity
        status = ReportStatus.FILLED if done else ReportStatus.PARTIALLY_FILLED
        self.emit(status, last_quantity=quantity, last_price=price)

    def avg_price(self) -> Decimal | None:
        if self.filled == 0 or self.price_exponent is None:
            return None
        exact = self.notional / self.filled
        at_price_step = exact.quantize(Decimal(1).scaleb(self.price_exponent))
        if at_price_step == exact:  # one fill, or fills at one price: the price itself
            return at_price_step
        # Four digits finer than the finest fill price: exact enough, and short in JSON.
        return exact.quantize(Decimal(1).scaleb(self.price_exponent - 4), ROUND_HALF_EVEN)

    def emit(
        self,
        status: ReportStatus,
        *,
        last_quantity: Decimal = _ZERO,
        last_price: Decimal | None = None,
        reason_code: ReasonCode | None = None,
        reason_text: str | None = None,
    ) -> None:
        open_ = status in (ReportStatus.ACCEPTED, ReportStatus.PARTIALLY_FILLED)
        report = ExecutionReport(
            report_id=report_id(self.intent_id, len(self.reports) + 1),
            intent_id=self.intent_id,
            account_id=self.intent.account_id,
            order_id=self.order,
            status=status,
            filled_quantity=self.filled,
            last_quantity=last_quantity,
            last_price=last_price,
            avg_price=self.avg_price(),
            leaves_quantity=self.intent.quantity - self.filled if open_ else _ZERO,
            reason_code=reason_code,
            reason_text=reason_text,
            venue_time=self.now + timedelta(seconds=self.delay_s),
        )
        self.reports.append(ScheduledReport(delay_s=self.delay_s, report=report))


def _fill(timeline: _Timeline, *, partials: bool = True) -> None:
    """Fill the order: maybe a partial first; market orders always end filled."""
    intent = timeline.intent
    partial = _draw_partial(timeline.rng, timeline.cfg, intent)
    if partial is None or not partials:
        timeline.fill(intent.quantity, _fill_price(timeline.rng, timeline.cfg, intent))
        return
    timeline.fill(partial, _fill_price(timeline.rng, timeline.cfg, intent))
    if intent.order_type is OrderType.MARKET:
        timeline.advance()
        rest = intent.quantity - partial
        timeline.fill(rest, _fill_price(timeline.rng, timeline.cfg, intent))
    elif intent.time_in_force is TimeInForce.IOC:
        timeline.advance()
        timeline.emit(
            ReportStatus.CANCELLED,
            reason_text="Immediate-or-cancel: the unfilled rest of the order was cancelled.",
        )
    # A GTC/DAY limit order's rest stays open: the orchestrator completes or cancels it.


def _draw_partial(rng: random.Random, cfg: VenueConfig, intent: OrderIntent) -> Decimal | None:
    """The quantity of a first partial fill, or None to fill the order in one go."""
    if rng.random() >= cfg.partial_fill_probability or intent.time_in_force is TimeInForce.FOK:
        return None
    lo = math.ceil(cfg.partial_fill_min_share * _PPM)
    if lo >= _PPM:
        return None
    share = Decimal(rng.randrange(lo, _PPM)) / _PPM
    step = Decimal(1).scaleb(min(_exponent(intent.quantity), 0))
    quantity = (intent.quantity * share).quantize(step, ROUND_DOWN)
    if quantity <= 0 or quantity >= intent.quantity:
        return None
    return quantity


def _fill_price(rng: random.Random, cfg: VenueConfig, intent: OrderIntent) -> Decimal:
    """The limit price for limit orders, else the reference price slipped against the trader.

    Callers have checked with `_price_problem` that the price this needs exists.
    """
    if intent.order_type is OrderType.LIMIT or intent.reference_price is None:
        assert intent.limit_price is not None  # guaranteed by _price_problem
        return intent.limit_price
    reference = intent.reference_price
    bps = min(cfg.slippage_bps_max, _BPS) * Decimal(rng.randrange(0, 10_001)) / 10_000
    raw = reference * (_BPS + intent.side.sign * bps) / _BPS
    step = Decimal(1).scaleb(min(_exponent(reference), 0) - 2)
    # Round against the trader too, so a buy never pays less than the reference.
    return raw.quantize(step, ROUND_CEILING if intent.side is Side.BUY else ROUND_FLOOR)


def _price_problem(intent: OrderIntent) -> tuple[ReasonCode, str] | None:
    """A reject when no fill price is known: filling at an invented price would be wrong."""
    if intent.order_type is OrderType.LIMIT and intent.limit_price is None:
        return ReasonCode.OTHER, "No price is known: the limit order carries no limit_price."
    if intent.limit_price is None and intent.reference_price is None:
        return (
            ReasonCode.OTHER,
            "No price is known: the market order carries neither limit_price nor "
            "reference_price, so the paper venue cannot fill it.",
        )
    return None


def _draw_reject(
    rng: random.Random, cfg: VenueConfig, intent: OrderIntent
) -> tuple[ReasonCode, str] | None:
    """A reject reason drawn by cumulative probability over the reason codes, in enum order."""
    draw = rng.random()
    cumulative = 0.0
    for code in ReasonCode:
        probability = cfg.reject_probability.get(code.value, 0.0)
        cumulative += probability
        if probability > 0 and draw < cumulative:
            return code, _reject_text(code, intent)
    return None


def _reject_text(code: ReasonCode, intent: OrderIntent) -> str:
    text = _REJECT_TEXT[code].format(
        account=intent.account_id,
        quantity=format(intent.quantity, "f"),
        symbol=intent.symbol,
        side=intent.side.value,
    )
    return f"Simulated by the paper venue: {text}"


def _cancel(
    intent: OrderIntent,
    cfg: VenueConfig,
    rng: random.Random,
    now: datetime,
    *,
    filled_so_far: Decimal,
    avg_price_so_far: Decimal | None,
    parent_open: bool,
) -> tuple[ScheduledReport, ...]:
    """Cancel the parent order, or refuse the cancel when there is no open parent."""
    parent = intent.parent_intent_id
    if parent is None or not parent_open:
        refusal = _Timeline(intent, cfg, rng, now, intent_id=intent.intent_id)
        refusal.advance()
        why = (
            "A cancel intent needs parent_intent_id to name the order to cancel."
            if parent is None
            else f"Nothing to cancel: the order of intent {parent} is not open at the venue."
        )
        refusal.emit(ReportStatus.REJECTED, reason_code=ReasonCode.OTHER, reason_text=why)
        return tuple(refusal.reports)
    delay_s = round(_latency_s(rng, cfg), 6)
    report = ExecutionReport(
        report_id=report_id(intent.intent_id, 1),
        intent_id=parent,
        account_id=intent.account_id,
        order_id=order_id(parent),
        status=ReportStatus.CANCELLED,
        filled_quantity=filled_so_far,
        avg_price=avg_price_so_far if filled_so_far > 0 else None,
        leaves_quantity=_ZERO,
        reason_text=f"Cancelled on request of intent {intent.intent_id}.",
        venue_time=now + timedelta(seconds=delay_s),
    )
    return (ScheduledReport(delay_s=delay_s, report=report),)


def _latency_s(rng: random.Random, cfg: VenueConfig) -> float:
    """One venue latency, uniform in [latency_ms_min, latency_ms_max], in seconds."""
    lo, hi = cfg.latency_ms_min, cfg.latency_ms_max
    return (lo + rng.random() * (hi - lo)) / 1000


def _exponent(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)  # finite amounts only (the models reject NaN/inf)
    return exponent
