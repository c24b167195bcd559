"""End to end through an independent client: kcat publishes, the worker and venue work, kcat reads.

Everything a user would touch from outside goes through kcat (librdkafka): the account states
and signals as keyed JSON lines, the execution results and order intents read back as JSON. The
worker and the paper venue run in this process on the real broker, each in its own consumer
group, with the real clock, so the only thing simulated is the market.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from orch_worker.adapters.kafka.topics import Topics
from orch_worker.adapters.kafka.venue_app import run_venue
from orch_worker.domain.config import KafkaConfig, OrchConfig, VenueConfig, WorkerConfig
from tests import factories as f
from tests.integration.bounded import STOP_S, within, worker_running
from tests.integration.kcat import Kcat, KcatRecord, find_kcat

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EXPECTED: dict[str, tuple[str, dict[str, str]]] = {
    # signal_id: (quantity, filled per account). 3 accounts, equal split in 0.01 lots; the
    # leftover lot of 0.31 rotates: the portfolio's second signal gives it to the second
    # account in id order.
    "e2e-sig-1": ("1.50", {"ACC-1": "0.50", "ACC-2": "0.50", "ACC-3": "0.50"}),
    "e2e-sig-2": ("0.31", {"ACC-1": "0.10", "ACC-2": "0.11", "ACC-3": "0.10"}),
}


@pytest.fixture
def kcat(kafka_bootstrap: str, tmp_path: Path) -> Kcat:
    binary = find_kcat()
    if binary is None:
        pytest.skip(
            "kcat is not on PATH; `make kcat` (or `apt-get install kcat`) installs it for this "
            "end-to-end test with an independent Kafka client"
        )
    return Kcat.create(binary, kafka_bootstrap, tmp_path)


def configured(kafka: KafkaConfig) -> OrchConfig:
    """Three accounts, equal split, a venue that fills everything at once: one exact outcome."""
    cfg = f.config(kafka)
    run = uuid.uuid4().hex[:8]
    worker = cfg.worker.model_dump() | {"group_id": f"e2e-worker-{run}"}
    venue = VenueConfig(
        group_id=f"e2e-venue-{run}",
        http_port=0,
        latency_ms_min=1,
        latency_ms_max=5,
        partial_fill_probability=0,
        reject_probability={},
    )
    return cfg.model_copy(update={"worker": WorkerConfig.model_validate(worker), "venue": venue})


@asynccontextmanager
async def venue_running(cfg: OrchConfig) -> AsyncIterator[None]:
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_venue(cfg, stop=stop, ready=ready))
    try:
        ready_wait = asyncio.create_task(ready.wait())
        await asyncio.wait({task, ready_wait}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        ready_wait.cancel()
        if task.done():
            task.result()  # raises what stopped the venue
            raise AssertionError("the paper venue stopped before it was ready")
        assert ready.is_set(), "the paper venue did not join its consumer group in 20s"
        yield
    finally:
        stop.set()
        await within(task, STOP_S, "the paper venue's stop")


def finals(records: list[KcatRecord]) -> dict[str, dict[str, Any]]:
    """The completed ExecutionResult of each signal seen so far, by signal id."""
    done: dict[str, dict[str, Any]] = {}
    for r in records:
        result = r.value()
        if result["status"] == "completed":
            done[result["signal_id"]] = result
    return done


async def test_kcat_in_worker_and_venue_between_kcat_out(kafka: KafkaConfig, kcat: Kcat) -> None:
    cfg = configured(kafka)
    t = Topics(kafka.topic_prefix)
    now = datetime.now(UTC)
    states = [f.account(a, at=now) for a in cfg.accounts]
    # The worker loads the account table at start, so the states go in first.
    await kcat.produce(t.account_state, [f"{s.account_id}|{s.model_dump_json()}" for s in states])

    async with venue_running(cfg), worker_running(cfg):
        signals = [f.signal(sid, quantity=q, at=now) for sid, (q, _) in EXPECTED.items()]
        await kcat.produce(t.signals, [f"{s.portfolio}|{s.model_dump_json()}" for s in signals])
        results = await kcat.consume(
            t.execution_results, until=lambda rs: finals(rs).keys() >= EXPECTED.keys()
        )
        intents = await kcat.consume(t.order_intents, until=lambda rs: len(rs) >= 6)

    assert all(r.key == r.value()["signal_id"] for r in results), "results are keyed by signal"
    for sid, result in finals(results).items():
        quantity, per_account = EXPECTED[sid]
        assert result["portfolio"] == "demo"
        assert Decimal(result["requested_total"]) == Decimal(quantity)
        assert Decimal(result["filled_total"]) == Decimal(quantity)
        lines = {ln["account_id"]: ln for ln in result["lines"]}
        assert {a: Decimal(ln["filled"]) for a, ln in lines.items()} == {
            a: Decimal(q) for a, q in per_account.items()
        }
        assert {a: Decimal(ln["requested"]) for a, ln in lines.items()} == {
            a: Decimal(q) for a, q in per_account.items()
        }
        assert {ln["status"] for ln in lines.values()} == {"filled"}
        assert {ln["attempts"] for ln in lines.values()} == {1}
        seqs = [r.value()["seq"] for r in results if r.key == sid]
        assert seqs == sorted(seqs), "one signal's results stay in order on one partition"
        assert result["seq"] == max(seqs), "completed is the last word"

    assert len({r.value()["intent_id"] for r in intents}) == 6, "one intent per account and signal"
    assert all(r.key == r.value()["account_id"] for r in intents), "intents are keyed by account"
    assert {(r.value()["signal_id"], r.value()["account_id"]) for r in intents} == {
        (sid, a) for sid, (_, per_account) in EXPECTED.items() for a in per_account
    }


async def test_kcat_uses_a_librdkafka_that_speaks_to_the_broker(kcat: Kcat) -> None:
    """Debian's kcat alone links librdkafka 2.0.2, which the embedded broker cannot serve."""
    if kcat.libdir is None:
        pytest.skip("no confluent-kafka wheel: kcat runs with the system librdkafka")
    version = await kcat.librdkafka_version()
    major, minor = (int(x) for x in version.split(".")[:2])
    assert (major, minor) >= (2, 1), f"kcat loaded librdkafka {version}; LD_LIBRARY_PATH unused?"
