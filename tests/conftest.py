"""Shared fixtures: one real Kafka-protocol broker per test session, fresh topics per test.

The embedded Tansu broker runs unless `ORCH_TEST_KAFKA_BOOTSTRAP` points at a real Kafka, in
which case the embedded-only settings are not applied.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orch_worker.adapters.kafka.clients import ensure_topics
from orch_worker.adapters.kafka.embedded import EmbeddedBroker
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.config import KafkaConfig, KafkaProfile

REAL_KAFKA = os.environ.get("ORCH_TEST_KAFKA_BOOTSTRAP")
REAL_KAFKA_IN_USE = bool(REAL_KAFKA)


def _docker_reachable() -> bool:
    sock = Path("/var/run/docker.sock")
    return bool(os.environ.get("DOCKER_HOST")) or sock.exists()


def _testcontainers_kafka() -> Iterator[str] | None:
    """Apache Kafka in a container when a Docker engine answers; None otherwise."""
    if os.environ.get("ORCH_TEST_NO_DOCKER") or not _docker_reachable():
        return None
    try:
        from testcontainers.kafka import KafkaContainer

        container = KafkaContainer().with_kraft()
        container.start()
    except Exception:  # no engine, no image, no network: use the embedded broker
        return None

    def run() -> Iterator[str]:
        try:
            yield container.get_bootstrap_server()
        finally:
            container.stop()

    return run()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if REAL_KAFKA:
        yield REAL_KAFKA
        return
    containerised = _testcontainers_kafka()
    if containerised is not None:
        global REAL_KAFKA_IN_USE  # noqa: PLW0603 - one broker per session decides the profile
        REAL_KAFKA_IN_USE = True
        yield from containerised
        return
    log = Path(tmp_path_factory.mktemp("broker")) / "tansu.log"
    broker = EmbeddedBroker(log_path=log)
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
async def kafka(kafka_bootstrap: str) -> KafkaConfig:
    """A Kafka config with a fresh topic prefix; its topics exist when the test starts."""
    cfg = KafkaConfig(
        bootstrap=kafka_bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}.",
        profile=KafkaProfile.KAFKA if REAL_KAFKA_IN_USE else KafkaProfile.EMBEDDED,
        partitions=3,
    )
    await ensure_topics(cfg, Topics(cfg.topic_prefix))
    return cfg


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if REAL_KAFKA:
        return
    skip = pytest.mark.skip(reason="needs real Apache Kafka semantics; embedded broker in use")
    for item in items:
        if "real_kafka" in item.keywords:
            item.add_marker(skip)
