"""`orch-worker publish`: events from a JSON or JSONL file (or stdin) onto a topic, validated.

Each event is validated against its topic's model before anything is sent, so a typo is reported
with its line number instead of becoming a dead letter. Keys follow the contract's key column.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from pydantic import BaseModel, ValidationError

from orch_worker.adapters.kafka.clients import ensure_topics, producer_kwargs
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.config import OrchConfig
from orch_worker.domain.control_auth import signature
from orch_worker.domain.models import AccountState, ControlCommand, ExecutionReport, Signal
from orch_worker.settings import ConfigError, explain


def _key(topic: str, t: Topics, event: BaseModel) -> str:
    if isinstance(event, Signal):
        return event.portfolio
    if isinstance(event, (AccountState, ExecutionReport)):
        return event.account_id
    if isinstance(event, ControlCommand):
        return event.portfolio or event.account_id or event.signal_id or event.command_id
    raise ConfigError(f"cannot publish to {topic}")


def parse_events(text: str) -> list[Any]:
    """A JSON array, a single JSON object, or JSON Lines."""
    stripped = text.strip()
    if not stripped:
        return []
    if stripped[0] == "[":
        docs = orjson.loads(stripped)
        return list(docs)
    try:
        return [orjson.loads(stripped)]
    except orjson.JSONDecodeError:
        return [orjson.loads(line) for line in stripped.splitlines() if line.strip()]


def sign(doc: dict[str, Any], secret: str) -> dict[str, Any]:
    unsigned = ControlCommand.model_validate({**doc, "signature": None})
    return {**doc, "signature": signature(unsigned, secret.encode())}


def _read(source: Path | None) -> str:
    return source.read_text(encoding="utf-8") if source else sys.stdin.read()


STAMP_FIELDS = {"created_at", "updated_at", "issued_at", "venue_time"}
RFC3339 = "%Y-%m-%dT%H:%M:%S.%fZ"


def stamp(doc: Any, now: datetime) -> Any:
    """The event with its own timestamp set to now (sample files would otherwise go stale).

    A signal's `expires_at` moves by the same amount, so its lifetime is kept.
    """
    if not isinstance(doc, dict):
        return doc
    out = dict(doc)
    if out.get("created_at") and out.get("expires_at"):
        with contextlib.suppress(TypeError, ValueError):  # left as is; validation reports it
            life = datetime.fromisoformat(out["expires_at"]) - datetime.fromisoformat(
                out["created_at"]
            )
            out["expires_at"] = (now + life).strftime(RFC3339)
    for key in STAMP_FIELDS & out.keys():
        out[key] = now.strftime(RFC3339)
    return out


async def publish_file(
    cfg: OrchConfig,
    topic_name: str,
    source: Path | None,
    *,
    secret: str | None = None,
    now: datetime | None = None,
) -> int:
    t = Topics(cfg.kafka.topic_prefix)
    topic = t.by_short_name(topic_name)
    models: dict[str, type[BaseModel]] = {
        t.signals: Signal,
        t.account_state: AccountState,
        t.control: ControlCommand,
        t.execution_reports: ExecutionReport,
    }
    if topic not in models:
        raise ConfigError(
            f"{topic} is an output topic; publish to signals, account-state, control "
            "or execution-reports"
        )
    text = await asyncio.to_thread(_read, source)
    events: list[BaseModel] = []
    for n, parsed in enumerate(parse_events(text), start=1):
        raw = stamp(parsed, now) if now is not None else parsed
        doc = sign(raw, secret) if topic == t.control and secret and isinstance(raw, dict) else raw
        try:
            events.append(models[topic].model_validate(doc))
        except ValidationError as exc:
            raise ConfigError(f"event {n}: " + "; ".join(explain(exc))) from exc
    await ensure_topics(cfg.kafka, t)
    producer = AIOKafkaProducer(**producer_kwargs(cfg.kafka))
    await producer.start()
    try:
        for e in events:
            await producer.send(
                topic, orjson.dumps(e.model_dump(mode="json")), key=_key(topic, t, e).encode()
            )
        await producer.flush()
    finally:
        await producer.stop()
    return len(events)
