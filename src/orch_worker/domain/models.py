"""The public events of DESIGN.md section 3, as frozen pydantic models.

Inputs (signals, account states, execution reports, control commands) are validated strictly
and reject unknown fields: a misspelt `quantity` must fail loudly, not plan a default size.
Outputs are built only by the core and are immutable once built.
"""

from __future__ import annotations

from decimal import Decimal
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orch_worker.domain.immutable import Immutable
from orch_worker.domain.types import (
    SCHEMA_VERSION,
    Amount,
    Identifier,
    NonNegAmount,
    PosAmount,
    Ratio,
    Symbol,
    UtcDatetime,
)


class Event(Immutable):
    """Base of every event: frozen, strict about unknown keys, versioned."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)

    schema_version: int = Field(default=SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)


class Side(StrEnum):
    BUY = "buy"
    SELL = "sell"

    @property
    def sign(self) -> int:
        return 1 if self is Side.BUY else -1

    @property
    def opposite(self) -> Side:
        return Side.SELL if self is Side.BUY else Side.BUY


class OrderType(StrEnum):
    MARKET = "market"
    LIMIT = "limit"


class Urgency(StrEnum):
    NORMAL = "normal"
    HIGH = "high"


class Signal(Event):
    """A strategy's request to trade, to be spread across one portfolio's accounts."""

    signal_id: Identifier
    portfolio: Identifier
    strategy_id: Identifier
    symbol: Symbol
    side: Side
    order_type: OrderType
    limit_price: PosAmount | None = None
    reference_price: PosAmount | None = None
    volatility: NonNegAmount | None = None
    stop_loss: PosAmount | None = None
    take_profit: PosAmount | None = None
    quantity: PosAmount | None = None
    urgency: Urgency = Urgency.NORMAL
    confidence: Ratio = 1.0
    created_at: UtcDatetime
    expires_at: UtcDatetime | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Signal:
        if self.order_type is OrderType.LIMIT and self.limit_price is None:
            raise ValueError("limit orders need limit_price")
        if self.order_type is OrderType.MARKET and self.limit_price is not None:
            raise ValueError("market orders must not carry limit_price")
        if self.expires_at is not None and self.expires_at <= self.created_at:
            raise ValueError("expires_at must be after created_at")
        entry = self.entry_price
        if entry is not None and self.stop_loss is not None:
            if self.side is Side.BUY and self.stop_loss >= entry:
                raise ValueError("a buy's stop_loss must be below its entry price")
            if self.side is Side.SELL and self.stop_loss <= entry:
                raise ValueError("a sell's stop_loss must be above its entry price")
        return self

    @property
    def entry_price(self) -> Amount | None:
        """The price risk and margin are computed at: the limit, else the reference price."""
        return self.limit_price if self.limit_price is not None else self.reference_price


class AccountStatus(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    DISABLED = "disabled"


class Position(Event):
    symbol: Symbol
    quantity: Amount = Field(description="Signed: positive long, negative short.")
    avg_price: NonNegAmount


class AccountState(Event):
    """A broker bridge's latest view of one account; the topic is compacted by account_id."""

    account_id: Identifier
    portfolio: Identifier
    broker: Identifier
    status: AccountStatus
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    balance: Amount
    equity: Amount
    margin_used: NonNegAmount
    margin_available: Amount
    day_start_equity: Amount
    peak_equity: Amount
    positions: tuple[Position, ...] = ()
    updated_at: UtcDatetime

    def position(self, symbol: str) -> Amount:
        """Signed net quantity held in `symbol` (0 when flat)."""
        return sum((p.quantity for p in self.positions if p.symbol == symbol), start=Decimal(0))


class PriceTick(Event):
    """A market price for a symbol (optional input): lets the worker hold back a release once
    the market has moved past the portfolio's drift budget."""

    symbol: Symbol
    price: PosAmount
    ts: UtcDatetime


class TimeInForce(StrEnum):
    GTC = "gtc"
    DAY = "day"
    IOC = "ioc"
    FOK = "fok"


class IntentKind(StrEnum):
    INITIAL = "initial"
    COMPLETION = "completion"
    RETRY = "retry"
    REROUTE = "reroute"
    REDUCED = "reduced"
    CANCEL = "cancel"


class OrderIntent(Event):
    """One order for one account, released to the broker bridge (or the paper venue)."""

    intent_id: Identifier
    plan_id: Identifier
    signal_id: Identifier
    portfolio: Identifier
    account_id: Identifier
    broker: Identifier
    symbol: Symbol
    side: Side
    order_type: OrderType
    quantity: PosAmount
    limit_price: PosAmount | None = None
    stop_loss: PosAmount | None = None
    take_profit: PosAmount | None = None
    reference_price: PosAmount | None = None
    time_in_force: TimeInForce = TimeInForce.GTC
    kind: IntentKind = IntentKind.INITIAL
    attempt: int = Field(default=1, ge=1)
    parent_intent_id: Identifier | None = None
    scheduled_at: UtcDatetime
    released_at: UtcDatetime
    rationale: str


class ReportStatus(StrEnum):
    ACCEPTED = "accepted"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class ReasonCode(StrEnum):
    INSUFFICIENT_MARGIN = "insufficient_margin"
    CONNECTION_ERROR = "connection_error"
    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"
    MARKET_CLOSED = "market_closed"
    INVALID_STOPS = "invalid_stops"
    INVALID_SYMBOL = "invalid_symbol"
    ACCOUNT_SUSPENDED = "account_suspended"
    OTHER = "other"


class ExecutionReport(Event):
    """The venue's word on one intent; `filled_quantity` is cumulative over the order."""

    report_id: Identifier
    intent_id: Identifier
    account_id: Identifier
    order_id: Identifier
    status: ReportStatus
    filled_quantity: NonNegAmount
    last_quantity: NonNegAmount = Decimal(0)
    last_price: NonNegAmount | None = None
    avg_price: NonNegAmount | None = None
    leaves_quantity: NonNegAmount = Decimal(0)
    reason_code: ReasonCode | None = None
    reason_text: str | None = Field(default=None, max_length=2000)
    venue_time: UtcDatetime

    @model_validator(mode="after")
    def _consistent(self) -> ExecutionReport:
        if self.status is ReportStatus.REJECTED and self.reason_code is None:
            raise ValueError("a rejected report needs reason_code")
        if self.last_quantity > self.filled_quantity:
            raise ValueError("last_quantity cannot exceed the cumulative filled_quantity")
        if self.last_quantity > 0 and self.last_price is None:
            raise ValueError("a report with last_quantity needs last_price")
        if self.filled_quantity > 0 and self.last_price is None and self.avg_price is None:
            raise ValueError("a report with filled quantity needs avg_price or last_price")
        return self


class ResultStatus(StrEnum):
    PLANNED = "planned"
    EXECUTING = "executing"
    COMPLETED = "completed"
    PARTIALLY_COMPLETED = "partially_completed"
    REJECTED = "rejected"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self not in (ResultStatus.PLANNED, ResultStatus.EXECUTING)


class ResultLine(Event):
    account_id: Identifier
    requested: NonNegAmount
    filled: NonNegAmount
    avg_price: NonNegAmount | None = None
    status: str
    attempts: int = Field(ge=0)


class ExecutionResult(Event):
    """Progress and outcome of one signal across all its accounts; `seq` orders the updates."""

    signal_id: Identifier
    portfolio: Identifier
    status: ResultStatus
    seq: int = Field(ge=1)
    lines: tuple[ResultLine, ...]
    requested_total: NonNegAmount
    filled_total: NonNegAmount
    avg_price: NonNegAmount | None = None
    reason: str
    updated_at: UtcDatetime


class AuditEvent(Event):
    """One decision or transition, hash-chained per portfolio so tampering is detectable."""

    event_id: Identifier
    seq: int = Field(ge=1)
    ts: UtcDatetime
    type: Identifier
    portfolio: Identifier
    signal_id: Identifier | None = None
    intent_id: Identifier | None = None
    account_id: Identifier | None = None
    rationale: str
    data: dict[str, Any] = Field(
        default_factory=dict, description="The numbers behind the rationale (any JSON object)."
    )
    prev_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")


class ControlType(StrEnum):
    PAUSE_ACCOUNT = "pause_account"
    RESUME_ACCOUNT = "resume_account"
    HALT = "halt"
    RESUME = "resume"
    CANCEL_SIGNAL = "cancel_signal"
    RESOLVE_INTERVENTION = "resolve_intervention"


class InterventionAction(StrEnum):
    RETRY = "retry"
    REROUTE = "reroute"
    ACCEPT_PARTIAL = "accept_partial"
    CANCEL = "cancel"


class ControlCommand(Event):
    """An operator's instruction; targets depend on `type` and are checked here."""

    command_id: Identifier
    type: ControlType
    portfolio: Identifier | None = None
    account_id: Identifier | None = None
    signal_id: Identifier | None = None
    intervention_id: Identifier | None = None
    action: InterventionAction | None = None
    reroute_account_id: Identifier | None = None
    reason: str | None = Field(default=None, max_length=2000)
    issued_by: str = Field(min_length=1, max_length=200)
    issued_at: UtcDatetime
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _targets(self) -> ControlCommand:
        needed: dict[ControlType, tuple[str, ...]] = {
            ControlType.PAUSE_ACCOUNT: ("account_id",),
            ControlType.RESUME_ACCOUNT: ("account_id",),
            ControlType.HALT: ("portfolio",),
            ControlType.RESUME: ("portfolio",),
            ControlType.CANCEL_SIGNAL: ("signal_id",),
            ControlType.RESOLVE_INTERVENTION: ("intervention_id", "action"),
        }
        missing = [f for f in needed[self.type] if getattr(self, f) is None]
        if missing:
            raise ValueError(f"{self.type.value} needs {', '.join(missing)}")
        return self

    def signing_payload(self) -> bytes:
        """The bytes an HMAC signature covers: the command without its signature."""
        from orch_worker.domain.canonical import canonical_json

        return canonical_json(self.model_dump(mode="json", exclude={"signature"}))


class Intervention(Event):
    """A decision the orchestrator will not take alone; resolved by `resolve_intervention`."""

    intervention_id: Identifier
    signal_id: Identifier
    portfolio: Identifier
    intent_id: Identifier | None = None
    account_id: Identifier | None = None
    reason_code: str
    reason: str
    options: tuple[InterventionAction, ...]
    default_action: InterventionAction
    created_at: UtcDatetime
    timeout_at: UtcDatetime


class DeadLetter(Event):
    """A message the worker refused, kept with where it came from and why."""

    original_topic: str
    partition: int
    offset: int
    key: str | None
    value: str = Field(description="The raw value, UTF-8 if it decoded, else base64.")
    value_encoding: str = Field(pattern=r"^(utf-8|base64)$")
    value_bytes: int = Field(default=0, ge=0, description="Size of the original value.")
    value_truncated: bool = Field(
        default=False, description="Only the first MAX_KEPT bytes are kept (oversized input)."
    )
    error_type: str
    error: str
    dead_lettered_at: UtcDatetime
    consumer: str


EVENT_MODELS: dict[str, type[Event]] = {
    "Signal": Signal,
    "AccountState": AccountState,
    "PriceTick": PriceTick,
    "Position": Position,
    "OrderIntent": OrderIntent,
    "ExecutionReport": ExecutionReport,
    "ExecutionResult": ExecutionResult,
    "ResultLine": ResultLine,
    "AuditEvent": AuditEvent,
    "ControlCommand": ControlCommand,
    "Intervention": Intervention,
    "DeadLetter": DeadLetter,
}


def as_json(event: BaseModel) -> dict[str, Any]:
    """JSON-ready dict of an event (decimals as strings, timestamps RFC 3339 UTC)."""
    return event.model_dump(mode="json")
