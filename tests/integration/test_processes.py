"""The real command line, as separate processes: readiness, metrics, publish, and a kill -9.

A worker killed with SIGKILL while signals are in flight, then restarted, must release every
planned intent exactly once (counted by intent id on the order-intents topic).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from orch_worker.adapters.kafka.embedded import free_port
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.config import KafkaConfig
from tests import factories as f
from tests.integration.bounded import stop_processes
from tests.integration.kafka_io import Collector

pytestmark = pytest.mark.integration

CONFIG = """
[kafka]
partitions = 3

[worker]
max_signal_age_s = 600
max_batch = 20

[instruments.EURUSD]
value_per_unit = "100000"
lot_step = "0.01"
min_quantity = "0.01"
max_quantity = "50"
margin_rate = "0.0333"

[portfolios.demo]
allocation = "equal"
# Releases are staggered, so the kill lands while many are still pending.
stagger = { min_s = 0.2, max_s = 4 }

[accounts.ACC-1]
portfolio = "demo"
[accounts.ACC-2]
portfolio = "demo"
[accounts.ACC-3]
portfolio = "demo"
"""

CLI = [sys.executable, "-m", "orch_worker.cli"]
PUBLISH_S = 60.0


def _env(kafka: KafkaConfig) -> dict[str, str]:
    return {
        **os.environ,
        "ORCH_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "ORCH_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "ORCH_KAFKA_PROFILE": kafka.profile.value,
        # Groups of their own per test, like the topics: one shared broker serves the session,
        # and a member a finished test left behind must not hold up another test's join.
        "ORCH_WORKER_GROUP_ID": f"{kafka.topic_prefix}worker",
        "ORCH_VENUE_GROUP_ID": f"{kafka.topic_prefix}venue",
        "ORCH_SINK_GROUP_ID": f"{kafka.topic_prefix}sink",
    }


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), ""
    except OSError:
        return 0, ""


async def _until_ready(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "process exited before becoming ready"
        if (await asyncio.to_thread(_get, port, "/readyz"))[0] == 200:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("not ready in time")


def _start(args: list[str], kafka: KafkaConfig, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([*CLI, *args], env=_env(kafka), stdout=out, stderr=out)


async def _publish_cli(topic: str, path: Path, cfg_path: Path, kafka: KafkaConfig) -> None:
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        "publish",
        topic,
        str(path),
        "--config",
        str(cfg_path),
        env=_env(kafka),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), PUBLISH_S)
    except TimeoutError:
        raise AssertionError(f"publish {topic} did not finish within {PUBLISH_S:g}s") from None
    finally:
        if proc.returncode is None:  # timed out or cancelled: never left running
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()


def _at(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


def _jsonl(path: Path, events: list[object]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(e.model_dump(mode="json")) + b"\n" for e in events))  # type: ignore[attr-defined]
    return path


async def test_worker_killed_with_sigkill_releases_every_intent_exactly_once(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    cfg_path = tmp_path / "orch.toml"
    cfg_path.write_text(CONFIG)
    t = Topics(kafka.topic_prefix)
    now = datetime.now(UTC)
    accounts = _jsonl(
        tmp_path / "accounts.jsonl", [f.account(a, at=now) for a in ("ACC-1", "ACC-2", "ACC-3")]
    )
    n = 600
    signals = _jsonl(tmp_path / "signals.jsonl", [f.signal(f"s-{i:04d}", at=now) for i in range(n)])
    await _publish_cli("account-state", accounts, cfg_path, kafka)

    port = free_port()
    log = tmp_path / "worker.log"
    run = ["run", "--config", str(cfg_path), "--http-port", str(port)]
    worker = _start(run, kafka, log)
    try:
        await _until_ready(worker, port)
        status, body = await asyncio.to_thread(_get, port, "/metrics")
        assert status == 200
        assert "orch_messages_consumed_total" in body
        assert (await asyncio.to_thread(_get, port, "/healthz"))[0] == 200
        async with Collector(kafka, t.order_intents) as intents:
            await _publish_cli("signals", signals, cfg_path, kafka)
            await intents.wait_for(lambda v: len(v) >= 3)
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
            seen_at_kill = len(intents.values)
            worker = _start(run, kafka, log)
            await _until_ready(worker, port)
            ready_at = time.time()
            await intents.wait_for(lambda v: len({i["intent_id"] for i in v}) >= 3 * n, 60)
            await asyncio.sleep(1.0)  # anything released twice would arrive by now
            counts = Counter(i["intent_id"] for i in intents.values)
        # Releases due after the restart went out at their time; none waited for a stagger
        # that had already passed.
        after = [i for i in intents.values if _at(i["scheduled_at"]) > ready_at + 0.2]
        assert after, "some releases must have been pending across the kill"
        lags = sorted(_at(i["released_at"]) - _at(i["scheduled_at"]) for i in after)
        # At its time, not a new stagger window later (accuracy itself is measured by the
        # scheduling bench; this machine may be loaded while the suite runs).
        assert lags[-1] < 1.0, f"released late after restart: max lag {lags[-1]:.3f}s"
        assert seen_at_kill < 3 * n, "the kill must land mid-stream for this test to mean anything"
        assert len(counts) == 3 * n
        twice = {k: c for k, c in counts.items() if c > 1}
        assert not twice, f"released more than once: {twice}"
        assert {i["signal_id"] for i in intents.values} == {f"s-{i:04d}" for i in range(n)}
    finally:
        stop_processes(worker)
