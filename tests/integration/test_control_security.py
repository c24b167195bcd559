"""A worker with a control secret acts only on signed, fresh, new commands; the rest are
dead-lettered with the reason, and the secret appears in no log line or dead letter."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from pydantic import SecretStr

from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.config import KafkaConfig
from orch_worker.domain.control_auth import signature
from tests import factories as f
from tests.integration.kafka_io import Collector, publish
from tests.integration.test_worker import running, seed_accounts

pytestmark = pytest.mark.integration

SECRET = "correct-horse-battery-staple"  # noqa: S105 - a test key


async def test_only_signed_fresh_new_commands_are_applied(
    kafka: KafkaConfig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    base = f.config(kafka)
    cfg = base.model_copy(
        update={"worker": base.worker.model_copy(update={"control_secret": SecretStr(SECRET)})}
    )
    t = Topics(kafka.topic_prefix)
    await seed_accounts(cfg, t)
    halt = f.control("halt-1", "halt", portfolio="demo")
    good = halt.model_copy(update={"signature": signature(halt, SECRET.encode())})
    old = f.control("old-1", "halt", portfolio="demo", at=f.NOW - timedelta(hours=1))
    old = old.model_copy(update={"signature": signature(old, SECRET.encode())})
    async with (
        Collector(kafka, t.dead_letter) as dead,
        Collector(kafka, t.audit) as audit,
        running(cfg),
    ):
        await publish(
            kafka,
            t.control,
            [
                ("demo", halt),  # unsigned
                ("demo", good),
                ("demo", good),  # the same signed command again: a replay
                ("demo", old),
            ],
        )
        letters = await dead.wait_for(lambda v: len(v) == 3)
        applied = await audit.wait_for(lambda v: any(e["type"] == "control_applied" for e in v))
    assert [d["error_type"] for d in letters] == ["unauthorized", "replayed", "replayed"]
    assert "not signed" in letters[0]["error"]
    assert "already applied" in letters[1]["error"]
    assert "older than 300s" in letters[2]["error"]
    assert [
        e["data"]["command"]["command_id"] for e in applied if e["type"] == "control_applied"
    ] == ["halt-1"]
    assert SECRET not in caplog.text
    assert all(SECRET not in str(d) for d in letters)
    assert SECRET not in repr(cfg)
