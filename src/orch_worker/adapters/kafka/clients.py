"""aiokafka client settings derived from `KafkaConfig`, and topic creation.

Everything the embedded broker cannot do (idempotent producer, fast group joins) is a setting
with a real-Kafka default; the `embedded` profile switches them for the demo and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError
from aiokafka.partitioner import DefaultPartitioner, murmur2

from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.config import KafkaConfig

log = logging.getLogger(__name__)


def security_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"security_protocol": cfg.security_protocol}
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        ctx = ssl.create_default_context(cafile=cfg.ssl_cafile)
        if cfg.ssl_certfile:
            ctx.load_cert_chain(cfg.ssl_certfile, cfg.ssl_keyfile)
        kw["ssl_context"] = ctx
    if cfg.security_protocol.startswith("SASL"):
        kw["sasl_mechanism"] = cfg.sasl_mechanism or "PLAIN"
        kw["sasl_plain_username"] = cfg.sasl_username
        kw["sasl_plain_password"] = (
            cfg.sasl_password.get_secret_value() if cfg.sasl_password else None
        )
    return kw


class KeyHashPartitioner:
    """Kafka's default partitioning (murmur2 of the key), with each key's hash remembered.

    aiokafka's murmur2 is pure Python, a few microseconds a key, and a worker sends the same
    few portfolio and signal ids again and again: five times per release. A keyless record
    goes where aiokafka's default partitioner would send it.
    """

    LIMIT = 65_536
    """Hashes kept; the memo is emptied when full and refills with the keys in use."""

    def __init__(self) -> None:
        self._hashes: dict[bytes, int] = {}

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return int(DefaultPartitioner()(key, all_partitions, available))
        h = self._hashes.get(key)
        if h is None:
            if len(self._hashes) >= self.LIMIT:
                self._hashes.clear()
            h = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return all_partitions[h % len(all_partitions)]


def producer_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    return {
        "partitioner": KeyHashPartitioner(),
        "bootstrap_servers": cfg.bootstrap,
        "acks": "all",
        "enable_idempotence": cfg.idempotence,
        "linger_ms": 0,
        "compression_type": cfg.compression_type,
        "max_request_size": cfg.max_message_bytes,
        "max_batch_size": max(cfg.max_message_bytes, 1_048_576),
        **security_kwargs(cfg),
    }


def consumer_kwargs(cfg: KafkaConfig, group_id: str | None) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "bootstrap_servers": cfg.bootstrap,
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": cfg.auto_offset_reset,
        "fetch_max_wait_ms": cfg.fetch_wait,
        "fetch_max_bytes": max(cfg.max_message_bytes * 4, 4 * 1_048_576),
        "max_partition_fetch_bytes": max(cfg.max_message_bytes * 2, 1_048_576),
        **security_kwargs(cfg),
    }
    if group_id is not None:
        kw["session_timeout_ms"] = cfg.session_timeout
        kw["heartbeat_interval_ms"] = cfg.heartbeat_interval
    return kw


def _topic_configs(topic: str, topics: Topics) -> dict[str, str]:
    if topic in topics.compacted():
        return {"cleanup.policy": "compact"}
    if topic in topics.retained_forever():
        return {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
    return {}


async def ensure_topics(cfg: KafkaConfig, topics: Topics, *, attempts: int = 30) -> None:
    """Create missing topics with explicit partitions (auto-creation would pick its own count)."""
    if not cfg.create_topics:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=cfg.bootstrap, **security_kwargs(cfg))
    for attempt in range(attempts):
        try:
            await admin.start()
            break
        except KafkaConnectionError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.2)
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in topics.all() if t not in existing]
        if not missing:
            return
        new = [
            NewTopic(
                t,
                cfg.partitions,
                cfg.replication_factor,
                topic_configs=_topic_configs(t, topics),
            )
            for t in missing
        ]
        # Another process may create them between our list and create.
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics(new)
        log.info("created topics: %s", ", ".join(missing))
    finally:
        await admin.close()


def faststream_security(cfg: KafkaConfig) -> Any:
    """The same security settings as `security_kwargs`, in FastStream's form."""
    from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

    use_ssl = cfg.security_protocol in ("SSL", "SASL_SSL")
    ctx = security_kwargs(cfg).get("ssl_context")
    if not cfg.security_protocol.startswith("SASL"):
        return BaseSecurity(ssl_context=ctx, use_ssl=use_ssl) if use_ssl else None
    user = cfg.sasl_username or ""
    password = cfg.sasl_password.get_secret_value() if cfg.sasl_password else ""
    cls = {"SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512}.get(
        cfg.sasl_mechanism or "PLAIN", SASLPlaintext
    )
    return cls(username=user, password=password, ssl_context=ctx, use_ssl=use_ssl)
