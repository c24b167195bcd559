"""Decoding raw Kafka records into events, and building dead letters for the ones that fail.

Validation happens here, at the edge, with pydantic's JSON parser (exact decimals, no float
round trip). A record that does not decode never reaches the core.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from orch_worker.domain.models import DeadLetter, Event
from orch_worker.settings import explain

E = TypeVar("E", bound=Event)

MAX_ERROR_CHARS = 4000
MAX_KEPT_BYTES = 65_536
"""A dead letter keeps at most this much of the raw value: an oversized input must not make
its dead letter too large to publish (which would stop the worker)."""


class DecodeError(ValueError):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def decode(model: type[E], value: bytes | None) -> E:
    if value is None:
        raise DecodeError("empty", "record has no value (tombstone or null)")
    try:
        return model.model_validate_json(value)
    except ValidationError as exc:
        kinds = {e["type"] for e in exc.errors()}
        error_type = "malformed_json" if "json_invalid" in kinds else "schema_invalid"
        detail = "; ".join(explain(exc))
        raise DecodeError(error_type, f"{model.__name__}: {detail}"[:MAX_ERROR_CHARS]) from exc


def encode(event: BaseModel) -> bytes:
    return orjson.dumps(event.model_dump(mode="json"))


def dead_letter(
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    error_type: str,
    error: str,
    now: datetime,
    consumer: str,
) -> DeadLetter:
    whole = value or b""
    raw = whole[:MAX_KEPT_BYTES]
    try:
        text, encoding = raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        if len(whole) > MAX_KEPT_BYTES:
            # The cut may split a multi-byte character; keep what decodes, mark the cut.
            text, encoding = raw.decode("utf-8", "ignore"), "utf-8"
        else:
            text, encoding = base64.b64encode(raw).decode("ascii"), "base64"
    return DeadLetter(
        original_topic=topic,
        partition=partition,
        offset=offset,
        key=key.decode("utf-8", "replace") if key is not None else None,
        value=text,
        value_encoding=encoding,
        value_bytes=len(whole),
        value_truncated=len(whole) > MAX_KEPT_BYTES,
        error_type=error_type,
        error=error[:MAX_ERROR_CHARS],
        dead_lettered_at=now,
        consumer=consumer,
    )
