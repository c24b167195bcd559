"""Scale-out: two workers in one group share the portfolios; one is killed mid-run (or frozen
past its session and thawed again) and the survivor takes its portfolios over, resuming open
orders and pending releases. Every signal ends terminal, every intent is released once, and no
portfolio's audit chain ever forks (a fork would mean two workers deciding for one portfolio at
the same time)."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from orch_worker.adapters.kafka.embedded import free_port
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.adapters.kafka.venue_app import run_venue
from orch_worker.domain.config import KafkaConfig, OrchConfig
from tests import factories as f
from tests.integration.bounded import stop_processes, within
from tests.integration.kafka_io import Collector, publish
from tests.integration.test_processes import _get, _start, _until_ready

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

PORTFOLIOS = ("alpha", "beta", "gamma")

CONFIG = """
[kafka]
partitions = 3

[worker]
max_signal_age_s = 600

[instruments.EURUSD]
value_per_unit = "100000"
lot_step = "0.01"
min_quantity = "0.01"
max_quantity = "50"
margin_rate = "0.0333"
"""


def _config_text(stagger_max_s: float) -> str:
    text = CONFIG
    for p in PORTFOLIOS:
        text += f'\n[portfolios.{p}]\nallocation = "equal"\n'
        text += f"stagger = {{ min_s = 0.1, max_s = {stagger_max_s} }}\n"
        for n in (1, 2):
            text += f'[accounts.{p}-{n}]\nportfolio = "{p}"\n'
    return text


def _venue_config(kafka: KafkaConfig) -> OrchConfig:
    return OrchConfig.model_validate(
        {
            "kafka": kafka.model_dump(),
            "venue": {
                "group_id": f"{kafka.topic_prefix}venue",
                "seed": 7,
                "latency_ms_min": 5,
                "latency_ms_max": 60,
                "partial_fill_probability": 0.3,
                "reject_probability": {},
            },
        }
    )


def _gauge(body: str, name: str) -> float:
    line = next(ln for ln in body.splitlines() if ln.startswith(name + " "))
    return float(line.split()[1])


@pytest.mark.parametrize("fault", ["kill", "freeze"])
async def test_a_lost_workers_portfolios_move_to_the_survivor(
    kafka: KafkaConfig, tmp_path: Path, fault: str
) -> None:
    """`freeze` stops a worker (SIGSTOP) for four sessions, with releases pending, and thaws it:
    the group has given its partitions away meanwhile, and on waking it must release nothing
    it no longer owns (its due timers fire at once) and rebuild before deciding again."""
    cfg_path = tmp_path / "orch.toml"
    cfg_path.write_text(_config_text(1.5 if fault == "kill" else 4.0))
    t = Topics(kafka.topic_prefix)
    now = datetime.now(UTC)
    states = [f.account(f"{p}-{n}", portfolio=p, at=now) for p in PORTFOLIOS for n in (1, 2)]
    await publish(kafka, t.account_state, [(s.account_id, s) for s in states])
    ports = [free_port(), free_port()]
    workers = [
        _start(
            ["run", "--config", str(cfg_path), "--http-port", str(port)],
            kafka,
            tmp_path / f"worker-{i}.log",
        )
        for i, port in enumerate(ports)
    ]
    stop = asyncio.Event()
    venue = asyncio.create_task(run_venue(_venue_config(kafka), stop=stop))
    n = 90
    signals = [
        f.signal(f"s-{i:03d}", portfolio=PORTFOLIOS[i % 3], at=now, quantity="0.50")
        for i in range(n)
    ]
    try:
        for w, port in zip(workers, ports, strict=True):
            await _until_ready(w, port)
        await asyncio.sleep(1.5)  # let the group settle on two members
        owned = [await asyncio.to_thread(_get, port, "/metrics") for port in ports]
        shares = [_gauge(body, "orch_owned_partitions") for _, body in owned]
        assert sorted(shares) == [1.0, 2.0], f"both workers decide for some partitions: {shares}"
        async with (
            Collector(kafka, t.order_intents) as intents,
            Collector(kafka, t.execution_results) as results,
            Collector(kafka, t.audit) as audit,
        ):
            await publish(kafka, t.signals, [(s.portfolio, s) for s in signals[: n // 2]])
            await intents.wait_for(lambda v: len(v) >= 10)
            if fault == "kill":
                workers[0].send_signal(signal.SIGKILL)
                workers[0].wait(10)
            else:
                workers[0].send_signal(signal.SIGSTOP)
                await asyncio.sleep(4 * kafka.session_timeout / 1000 + 1)
                workers[0].send_signal(signal.SIGCONT)
            await publish(kafka, t.signals, [(s.portfolio, s) for s in signals[n // 2 :]])

            def all_terminal(values: list[dict[str, Any]]) -> bool:
                latest: dict[str, dict[str, Any]] = {}
                for r in values:
                    if r["signal_id"] not in latest or r["seq"] > latest[r["signal_id"]]["seq"]:
                        latest[r["signal_id"]] = r
                done = {"completed", "partially_completed", "failed", "rejected", "cancelled"}
                return len(latest) == n and all(r["status"] in done for r in latest.values())

            await results.wait_for(all_terminal, timeout_s=90)
            await asyncio.sleep(1.0)
            counts = Counter(i["intent_id"] for i in intents.values if i["kind"] != "cancel")
            events = list(audit.values)
        assert {i["signal_id"] for i in intents.values} == {s.signal_id for s in signals}
        assert len(counts) == 2 * n, "every signal's two intents were released"
        assert max(counts.values()) == 1, "no intent was released twice"
        by_id: dict[str, dict[str, Any]] = {}
        for e in events:
            first = by_id.setdefault(e["event_id"], e)
            assert first == e, f"audit chain forked at {e['portfolio']} seq {e['seq']}"
        seqs: dict[str, list[int]] = defaultdict(list)
        for e in by_id.values():
            seqs[e["portfolio"]].append(e["seq"])
        for p, ss in seqs.items():
            assert sorted(ss) == list(range(1, len(ss) + 1)), f"{p}: gap in the chain"
    finally:
        stop.set()
        try:
            await within(venue, 20, "the paper venue's stop")
        finally:  # also when the venue failed or hung: no worker outlives the test
            stop_processes(*workers)
