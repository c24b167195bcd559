"""`orch-worker publish`: validates before sending, keys by the contract, stamps sample files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.config import KafkaConfig, OrchConfig
from orch_worker.publish import publish_file, stamp
from orch_worker.settings import ConfigError
from tests.integration.kafka_io import Collector

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.integration


async def test_example_signals_are_published_keyed_by_portfolio_with_fresh_timestamps(
    kafka: KafkaConfig,
) -> None:
    cfg = OrchConfig(kafka=kafka)
    t = Topics(kafka.topic_prefix)
    now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    async with Collector(kafka, t.signals) as seen:
        count = await publish_file(cfg, "signals", EXAMPLES / "signals.jsonl", now=now)
        assert count == 4
        values = await seen.wait_for(lambda v: len(v) == 4)
    assert set(seen.keys) == {"demo"}
    assert {v["created_at"] for v in values} == {"2030-01-02T03:04:05.000000Z"}
    assert {v["expires_at"] for v in values} == {"2030-01-02T03:14:05.000000Z"}


async def test_invalid_event_is_refused_with_its_line_and_nothing_is_sent(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    cfg = OrchConfig(kafka=kafka)
    bad = tmp_path / "bad.jsonl"
    good = (EXAMPLES / "signals.jsonl").read_text().splitlines()[0]
    bad.write_text(good + "\n" + good.replace('"quantity":"0.50"', '"quantity":"-1"') + "\n")
    with pytest.raises(ConfigError, match=r"event 2: quantity"):
        await publish_file(cfg, "signals", bad)


async def test_output_topics_cannot_be_published_to(kafka: KafkaConfig) -> None:
    with pytest.raises(ConfigError, match="output topic"):
        await publish_file(OrchConfig(kafka=kafka), "order-intents", EXAMPLES / "signals.jsonl")


def test_stamp_keeps_a_signals_lifetime() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    doc = stamp({"created_at": "2026-11-21T12:00:00Z", "expires_at": "2026-11-21T12:05:00Z"}, now)
    assert doc["expires_at"] == (now + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
