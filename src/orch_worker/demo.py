"""`orch-worker demo`: the whole system on one machine, with nothing to set up.

Starts the embedded broker, then the worker, the paper venue and the audit sink in this process,
publishes sample account states and signals, prints progress as results arrive, and ends with a
summary and an audit verification. The sample data is fixed, and the venue seeded, so two runs
tell the same story.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from orch_worker.adapters.kafka.clients import consumer_kwargs, ensure_topics, producer_kwargs
from orch_worker.adapters.kafka.embedded import EmbeddedBroker
from orch_worker.adapters.kafka.sink_app import SinkStats, run_sink
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.adapters.kafka.venue_app import run_venue
from orch_worker.adapters.kafka.worker_app import Worker
from orch_worker.audit_tools import verify_store
from orch_worker.domain.config import OrchConfig
from orch_worker.domain.models import AccountState, ExecutionResult, Signal
from orch_worker.settings import load_config

SYMBOLS = (
    ("EURUSD", "1.0850", "0.0040"),
    ("GBPUSD", "1.2700", "0.0050"),
    ("XAUUSD", "2650.0", "12.0"),
)


def demo_config(bootstrap: str) -> OrchConfig:
    path = resources.files("orch_worker") / "demo.toml"
    with resources.as_file(path) as p:
        return load_config(p, env={}, bootstrap=bootstrap)


def sample_accounts(now: datetime) -> list[AccountState]:
    """Five accounts: three healthy, one short of margin, one suspended by its broker."""
    rows = [
        ("ACC-1", "active", "100000", "95000"),
        ("ACC-2", "active", "250000", "240000"),
        ("ACC-3", "active", "50000", "48000"),
        ("ACC-4", "active", "20000", "150"),
        ("ACC-5", "suspended", "80000", "80000"),
    ]
    return [
        AccountState.model_validate(
            {
                "account_id": a,
                "portfolio": "demo",
                "broker": "paper",
                "status": status,
                "currency": "USD",
                "balance": equity,
                "equity": equity,
                "margin_used": "0",
                "margin_available": free,
                "day_start_equity": equity,
                "peak_equity": equity,
                "positions": [],
                "updated_at": now,
            }
        )
        for a, status, equity, free in rows
    ]


def sample_signals(now: datetime, n: int) -> list[Signal]:
    out = []
    for i in range(n):
        symbol, price, stop = SYMBOLS[i % len(SYMBOLS)]
        side = "buy" if i % 2 == 0 else "sell"
        p, d = Decimal(price), Decimal(stop)
        out.append(
            Signal.model_validate(
                {
                    "signal_id": f"demo-{now:%Y%m%d%H%M%S}-{i + 1:03d}",
                    "portfolio": "demo",
                    "strategy_id": "demo-trend",
                    "symbol": symbol,
                    "side": side,
                    "order_type": "market",
                    "reference_price": str(p),
                    "stop_loss": str(p - d if side == "buy" else p + d),
                    "quantity": str(Decimal("0.50") + Decimal(i % 4) * Decimal("0.25")),
                    "urgency": "normal",
                    "confidence": 0.8,
                    "created_at": now,
                    "expires_at": now + timedelta(minutes=10),
                }
            )
        )
    return out


async def _publish(cfg: OrchConfig, topic: str, items: list[tuple[str, Any]]) -> None:
    producer = AIOKafkaProducer(**producer_kwargs(cfg.kafka))
    await producer.start()
    try:
        for key, event in items:
            await producer.send(
                topic, orjson.dumps(event.model_dump(mode="json")), key=key.encode()
            )
        await producer.flush()
    finally:
        await producer.stop()


def _table(results: dict[str, ExecutionResult]) -> str:
    head = (
        f"{'signal':<28} {'accounts':>8} {'requested':>10} {'filled':>8} {'avg price':>11}  status"
    )
    lines = [head, "-" * len(head)]
    for sid, r in sorted(results.items()):
        avg = f"{r.avg_price:.5f}" if r.avg_price is not None else "-"
        lines.append(
            f"{sid:<28} {len(r.lines):>8} {r.requested_total:>10} {r.filled_total:>8} {avg:>11}  "
            f"{r.status.value}"
            + (f" ({r.reason})" if r.status.value in ("rejected", "failed") else "")
        )
    return "\n".join(lines)


async def run_demo(workdir: Path, *, n_signals: int = 8, timeout_s: float = 90.0) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    db_path = (workdir / "audit.db").resolve()
    for suffix in ("", "-wal", "-shm", "-writer"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    db_url = f"sqlite:///{db_path}"
    print(f"orch-worker demo: {n_signals} signals over 5 paper accounts; audit in {db_path}")
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        print(f"  embedded broker on {broker.bootstrap}")
        cfg = demo_config(broker.bootstrap)
        t = Topics(cfg.kafka.topic_prefix)
        await ensure_topics(cfg.kafka, t)
        now = datetime.now(UTC)
        await _publish(cfg, t.account_state, [(a.account_id, a) for a in sample_accounts(now)])
        print("  published 5 account states (ACC-4 is short of margin, ACC-5 is suspended)")

        stop = asyncio.Event()
        venue_ready, sink_ready = asyncio.Event(), asyncio.Event()
        sink_counters = SinkStats()
        worker = Worker(cfg)
        await worker.app.start()
        tasks = [
            asyncio.create_task(run_venue(cfg, stop=stop, ready=venue_ready)),
            asyncio.create_task(
                run_sink(cfg, stop=stop, ready=sink_ready, db_url=db_url, stats=sink_counters)
            ),
        ]
        try:
            await asyncio.wait_for(
                asyncio.gather(worker.wait_ready(), venue_ready.wait(), sink_ready.wait()), 30
            )
            print("  worker, paper venue and audit sink are up")
            results = await _run_signals(cfg, t, sample_signals(now, n_signals), timeout_s)
            expected = sum(p.audit_seq for p in worker.portfolios.values())
            await _until(lambda: sink_counters.events_written >= expected, 20)
        finally:
            stop.set()
            await worker.app.stop()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(task, 15)
    print()
    print(_table(results))
    print()
    verdict = verify_store(db_url)
    print(f"audit store: {db_path}")
    print(f"audit verify: {verdict.text()}")
    unfinished = [s for s, r in results.items() if not r.status.terminal]
    if len(results) < n_signals or unfinished:
        print(f"demo FAILED: {n_signals - len(results) + len(unfinished)} signals did not finish")
        return 1
    return 0 if verdict.ok else 1


async def _until(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `condition` (a counter owned by another task) until true or timed out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)  # the counter has no event to wait on
    return True


async def _run_signals(
    cfg: OrchConfig, t: Topics, signals: list[Signal], timeout_s: float
) -> dict[str, ExecutionResult]:
    consumer = AIOKafkaConsumer(t.execution_results, **consumer_kwargs(cfg.kafka, None))
    await consumer.start()
    results: dict[str, ExecutionResult] = {}
    try:
        await _publish(cfg, t.signals, [(s.portfolio, s) for s in signals])
        print(f"  published {len(signals)} signals; following them:")
        deadline = time.monotonic() + timeout_s
        wanted = {s.signal_id for s in signals}
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for rec in records:
                    r = ExecutionResult.model_validate_json(rec.value)
                    old = results.get(r.signal_id)
                    if old is not None and old.seq >= r.seq:
                        continue
                    results[r.signal_id] = r
                    if old is None or old.status != r.status:
                        print(
                            f"    {r.signal_id}: {r.status.value:<20} filled {r.filled_total} of "
                            f"{r.requested_total} over {len(r.lines)} accounts"
                        )
            if wanted <= set(results) and all(results[s].status.terminal for s in wanted):
                break
    finally:
        await consumer.stop()
    return results
