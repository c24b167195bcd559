"""Field types shared by every event: exact decimals and RFC 3339 UTC timestamps.

Amounts are accepted as JSON numbers or strings but always emitted as strings, so no consumer
ever sees a binary float for money. Timestamps are always UTC with microseconds so that the
canonical JSON of an audit event (and therefore its hash) is stable.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, PlainSerializer

SCHEMA_VERSION = 1


def _reject_float_noise(value: object) -> object:
    # Python floats reach us only from in-process callers; route them through repr so that 0.1
    # becomes Decimal("0.1") rather than its binary expansion.
    if isinstance(value, float):
        return repr(value)
    return value


MAX_MAGNITUDE = Decimal("1e15")
"""No quantity, price or money amount in a trading book comes near this; anything above it is
a unit mistake or hostile input, and letting it through would overflow fixed-width arithmetic
and encoders downstream."""


def _finite(value: Decimal) -> Decimal:
    if not value.is_finite():
        raise ValueError("must be a finite number")
    if abs(value) >= MAX_MAGNITUDE:
        raise ValueError(f"must be smaller than {MAX_MAGNITUDE:.0e} in magnitude")
    return value


Amount = Annotated[
    Decimal,
    BeforeValidator(_reject_float_noise),
    AfterValidator(_finite),
    Field(allow_inf_nan=False),
    PlainSerializer(lambda d: format(d, "f"), return_type=str, when_used="json"),
]
"""Any decimal quantity, price or money amount; may be negative (signed positions, P&L)."""

NonNegAmount = Annotated[Amount, Field(ge=0)]
PosAmount = Annotated[Amount, Field(gt=0)]


_FORMATTED_MAX = 65_536
_formatted: dict[datetime, str] = {}
"""Memo of `format_ts`: a signal's state is serialised again at every decision about it, with
the same dozens of timestamps each time, and strftime is the costliest step of that. Equal
instants are equal keys whatever their offset, and all format to the same UTC text."""


def format_ts(value: datetime) -> str:
    """RFC 3339 UTC with microseconds, the one timestamp format of the contract."""
    text = _formatted.get(value)
    if text is None:
        text = value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if len(_formatted) >= _FORMATTED_MAX:
            _formatted.clear()  # bounded; refilled from what is in use
        _formatted[value] = text
    return text


def _to_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamp must carry a UTC offset (RFC 3339)")
    return value.astimezone(UTC)


UtcDatetime = Annotated[
    datetime,
    AfterValidator(_to_utc),
    PlainSerializer(format_ts, return_type=str, when_used="json"),
]

Identifier = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@/+-]+$")]
"""Ids and names that appear in Kafka keys, topic-derived ids and database keys."""

Symbol = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9._/:-]+$")]

Ratio = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
