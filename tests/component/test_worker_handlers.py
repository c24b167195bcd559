"""The worker's FastStream handlers on the in-memory broker: fast checks of the wiring.

The real-broker behaviour (commits, recovery, kill -9) is proven in tests/integration; here the
handler is fed records in memory and its publications are captured by in-memory subscribers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from faststream.kafka import TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage

from orch_worker.adapters.kafka.topics import Topics
from orch_worker.adapters.kafka.worker_app import Worker
from tests import factories as f


def _capture(
    seen: dict[str, list[dict[str, Any]]], topic: str
) -> Callable[[KafkaMessage], Awaitable[None]]:
    async def capture(msg: KafkaMessage) -> None:
        seen.setdefault(topic, []).append(orjson.loads(msg.body))

    return capture


def _worker() -> tuple[Worker, Topics, dict[str, list[dict[str, Any]]]]:
    cfg = f.config()
    worker = Worker(cfg, clock=lambda: f.NOW, http=False)
    for a in cfg.accounts:
        worker.accounts.update(f.account(a))
    worker.recovered = True
    worker.n_partitions, worker.owned = 1, {0}  # what the group would assign a lone worker
    t = Topics(cfg.kafka.topic_prefix)
    seen: dict[str, list[dict[str, Any]]] = {}
    for topic in (t.order_intents, t.execution_results, t.audit, t.dead_letter, t.changelog):
        worker.broker.subscriber(topic)(_capture(seen, topic))

    return worker, t, seen


async def test_signal_handler_publishes_intents_result_audit_and_changelog() -> None:
    worker, t, seen = _worker()
    async with TestKafkaBroker(worker.broker) as br:
        await br.publish(f.signal("sig-1").model_dump_json().encode(), t.signals, key=b"demo")
    assert sorted(i["account_id"] for i in seen[t.order_intents]) == ["ACC-1", "ACC-2", "ACC-3"]
    assert [r["status"] for r in seen[t.execution_results]] == ["executing"]
    assert [c["type"] for c in seen[t.changelog]] == ["decision", "done"]
    decision = seen[t.changelog][0]
    assert len(decision["outbox"]) == 3 + 1 + len(seen[t.audit])


async def test_invalid_signal_is_dead_lettered_in_memory_too() -> None:
    worker, t, seen = _worker()
    async with TestKafkaBroker(worker.broker) as br:
        await br.publish(b'{"signal_id": 1}', t.signals, key=b"demo")
    [letter] = seen[t.dead_letter]
    assert letter["error_type"] == "schema_invalid"
    assert t.order_intents not in seen
