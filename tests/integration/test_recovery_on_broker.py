"""Partial fills and failure recovery on the real broker: the worker and the paper venue run in
this process with the real clock; the venue is set to produce partial fills and each reject
reason, and every recovery path is followed to a final result and checked in the audit trail.

Timeouts and backoffs are shortened through the portfolio's `execution` settings. A worker
killed with SIGKILL while retries are pending and orders are open, then restarted, must finish
every signal with nothing lost and nothing released twice.
"""

from __future__ import annotations

import asyncio
import os
import signal as signals
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from orch_worker.adapters.kafka.embedded import free_port
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.adapters.kafka.venue_app import run_venue
from orch_worker.domain.config import KafkaConfig, OrchConfig
from orch_worker.domain.models import PriceTick, Signal
from orch_worker.settings import load_config
from tests import factories as f
from tests.integration.bounded import STOP_S, stop_processes, within, worker_running
from tests.integration.kafka_io import Collector, publish

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

Json = dict[str, Any]
Clock = Callable[[], datetime]

BASE_EXECUTION = {
    "ack_timeout_s": 5,
    "completion_timeout_s": 1,
    "retry_base_s": 0.05,
    "retry_cap_s": 0.2,
    "intervention_timeout_s": 30,
}
QUIET_VENUE = {
    "latency_ms_min": 1,
    "latency_ms_max": 5,
    "partial_fill_probability": 0,
    "reject_probability": {},
}


def configured(
    kafka: KafkaConfig,
    *,
    venue: dict[str, Any] | None = None,
    execution: dict[str, Any] | None = None,
    instrument: dict[str, Any] | None = None,
    **portfolio: Any,
) -> OrchConfig:
    """Three accounts, equal split, no stagger; the venue quiet unless told otherwise."""
    cfg = f.config(kafka, execution={**BASE_EXECUTION, **(execution or {})}, **portfolio)
    run = uuid.uuid4().hex[:8]
    doc = cfg.model_dump(mode="json")
    doc["worker"]["group_id"] = f"rec-worker-{run}"
    doc["venue"] = {**QUIET_VENUE, **(venue or {}), "group_id": f"rec-venue-{run}", "http_port": 0}
    doc["instruments"]["EURUSD"] |= instrument or {}
    return OrchConfig.model_validate(doc)


@asynccontextmanager
async def venue_running(cfg: OrchConfig) -> AsyncIterator[None]:
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_venue(cfg, stop=stop, ready=ready))
    try:
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait({task, waiting}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if task.done():
            task.result()
            raise AssertionError("the paper venue stopped before it was ready")
        assert ready.is_set(), "the paper venue did not join its group in 20s"
        yield
    finally:
        stop.set()
        await within(task, STOP_S, "the paper venue's stop")


class System:
    """The running worker and venue, with collectors on every output topic."""

    def __init__(self, cfg: OrchConfig) -> None:
        self.cfg = cfg
        self.t = Topics(cfg.kafka.topic_prefix)
        self.results = Collector(cfg.kafka, self.t.execution_results)
        self.audit = Collector(cfg.kafka, self.t.audit)
        self.intents = Collector(cfg.kafka, self.t.order_intents)
        self.interventions = Collector(cfg.kafka, self.t.interventions)

    async def final(self, *signal_ids: str, timeout_s: float = 40) -> dict[str, Json]:
        """The final ExecutionResult of each signal, once all of them are final."""

        def done(values: list[Json]) -> bool:
            return all(_final(values, s) is not None for s in signal_ids)

        await self.results.wait_for(done, timeout_s)
        out = {s: _final(self.results.values, s) for s in signal_ids}
        return {s: r for s, r in out.items() if r is not None}

    def events(self, signal_id: str | None = None) -> list[Json]:
        """Audit events (deduplicated by id, in chain order), of one signal if given."""
        by_id = {e["event_id"]: e for e in self.audit.values}
        events = sorted(by_id.values(), key=lambda e: e["seq"])
        return [e for e in events if signal_id in (None, e.get("signal_id"))]

    def types(self, signal_id: str) -> list[str]:
        return [e["type"] for e in self.events(signal_id)]

    def of(self, signal_id: str, *kinds: str) -> list[Json]:
        return [e for e in self.events(signal_id) if e["type"] in kinds]

    def sent(self, signal_id: str) -> list[Json]:
        return [i for i in self.intents.values if i["signal_id"] == signal_id]

    def chain_is_whole(self) -> bool:
        seqs = [e["seq"] for e in self.events()]
        return seqs == list(range(1, len(seqs) + 1))


TERMINAL = {"completed", "partially_completed", "failed", "cancelled", "expired", "rejected"}


def _final(values: list[Json], signal_id: str) -> Json | None:
    mine = [r for r in values if r["signal_id"] == signal_id]
    last = max(mine, key=lambda r: r["seq"], default=None)
    return last if last is not None and last["status"] in TERMINAL else None


@asynccontextmanager
async def running(
    cfg: OrchConfig,
    *,
    clock: Clock | None = None,
    prices: dict[str, str] | None = None,
) -> AsyncIterator[System]:
    system = System(cfg)
    now = (clock or (lambda: datetime.now(UTC)))()
    states = [f.account(a, at=now) for a in cfg.accounts]
    await publish(cfg.kafka, system.t.account_state, [(s.account_id, s) for s in states])
    if prices:
        ticks = [PriceTick(symbol=s, price=Decimal(p), ts=now) for s, p in prices.items()]
        await publish(cfg.kafka, system.t.prices, [(p.symbol, p) for p in ticks])
    async with (
        system.results,
        system.audit,
        system.intents,
        system.interventions,
        venue_running(cfg),
        worker_running(cfg, clock),
    ):
        yield system


async def send_signals(system: System, *sigs: Signal) -> None:
    await publish(system.cfg.kafka, system.t.signals, [(s.portfolio, s) for s in sigs])


def now_signal(signal_id: str, quantity: str = "1.00", **kw: Any) -> Signal:
    return f.signal(signal_id, quantity, at=kw.pop("at", datetime.now(UTC)), **kw)


def limit(signal_id: str, quantity: str = "1.00", **kw: Any) -> Signal:
    return now_signal(
        signal_id, quantity, order_type="limit", limit_price="1.1000", reference_price=None, **kw
    )


def lines(result: Json) -> dict[str, Json]:
    return {ln["account_id"]: ln for ln in result["lines"]}


# --- partial fills (AC4) ------------------------------------------------------------------------

PARTIAL_VENUE = {"partial_fill_probability": 1.0, "faults_max_attempt": 1}


async def test_a_partial_fill_at_the_threshold_is_accepted_and_the_rest_cancelled(
    kafka: KafkaConfig,
) -> None:
    cfg = configured(kafka, venue={**PARTIAL_VENUE, "partial_fill_min_share": 0.85})
    async with running(cfg) as system:
        await send_signals(system, limit("pf-accept"))
        result = (await system.final("pf-accept"))["pf-accept"]

    assert result["status"] == "partially_completed"
    assert Decimal(result["filled_total"]) >= Decimal("0.85")
    sent = system.sent("pf-accept")
    assert sorted(i["kind"] for i in sent) == ["cancel"] * 3 + ["initial"] * 3
    triggers = [e["data"].get("trigger") for e in system.of("pf-accept", "intent_transition")]
    assert triggers.count("partial_fill_enough") == 3
    assert triggers.count("cancel_confirmed") == 3
    assert len(system.of("pf-accept", "partial_accepted")) == 3
    assert system.chain_is_whole()


async def test_a_slow_limit_remainder_is_repriced_toward_the_market_and_completed(
    kafka: KafkaConfig,
) -> None:
    cfg = configured(
        kafka,
        venue={**PARTIAL_VENUE, "partial_fill_min_share": 0.3},
        execution={"partial_fill_threshold": 1.0},
    )
    async with running(cfg, prices={"EURUSD": "1.1004"}) as system:
        await send_signals(system, limit("pf-reprice"))
        result = (await system.final("pf-reprice"))["pf-reprice"]

    assert result["status"] == "completed"
    assert Decimal(result["filled_total"]) == Decimal("1.00")
    completions = [i for i in system.sent("pf-reprice") if i["kind"] == "completion"]
    assert len(completions) == 3
    assert {i["limit_price"] for i in completions} == {"1.1004"}
    assert all(i["attempt"] == 2 and i["parent_intent_id"] for i in completions)
    assert {ln["attempts"] for ln in result["lines"]} == {2}
    # the average is weighted by quantity over both fills of every account
    avg = Decimal(result["avg_price"])
    assert Decimal("1.1000") < avg < Decimal("1.1004")
    assert len(system.of("pf-reprice", "intent_timeout")) == 3
    scheduled = system.of("pf-reprice", "intent_scheduled")
    assert all("re-priced 1.1000 -> 1.1004" in e["rationale"] for e in scheduled)


async def test_without_a_price_the_remainder_is_rerouted_from_account_to_account(
    kafka: KafkaConfig,
) -> None:
    # Every account's first order fills partially here, so each reroute leaves a remainder
    # too: it moves on to the next alternative until none is left, then the partial stands.
    cfg = configured(
        kafka,
        venue={**PARTIAL_VENUE, "partial_fill_min_share": 0.3},
        execution={"partial_fill_threshold": 1.0},
        max_accounts=1,
    )
    async with running(cfg) as system:
        await send_signals(system, limit("pf-reroute"))
        result = (await system.final("pf-reroute"))["pf-reroute"]

    assert result["status"] == "partially_completed"
    orders = [i for i in system.sent("pf-reroute") if i["kind"] != "cancel"]
    assert [i["kind"] for i in orders] == ["initial", "reroute", "reroute"]
    assert len({i["account_id"] for i in orders}) == 3
    for parent, child in pairwise(orders):
        assert child["parent_intent_id"] == parent["intent_id"]
        assert Decimal(child["quantity"]) < Decimal(parent["quantity"])
    filled = sum(Decimal(ln["filled"]) for ln in result["lines"])
    assert filled == Decimal(result["filled_total"])
    assert all(
        "re-checked now" in e["rationale"] for e in system.of("pf-reroute", "intent_scheduled")
    )
    [accepted] = system.of("pf-reroute", "partial_accepted")
    assert "no alternative account" in accepted["rationale"]


# --- rejects by reason (AC5) ------------------------------------------------------------------


@pytest.mark.parametrize("code", ["connection_error", "timeout", "rate_limited"])
async def test_a_transient_reject_is_retried_with_backoff_on_the_same_account(
    kafka: KafkaConfig, code: str
) -> None:
    cfg = configured(kafka, venue={"reject_probability": {code: 1.0}, "faults_max_attempt": 1})
    async with running(cfg) as system:
        await send_signals(system, now_signal("transient"))
        result = (await system.final("transient"))["transient"]

    assert result["status"] == "completed"
    sent = system.sent("transient")
    retries = [i for i in sent if i["kind"] == "retry"]
    assert sorted(i["account_id"] for i in retries) == ["ACC-1", "ACC-2", "ACC-3"]
    initial = {i["intent_id"]: i for i in sent if i["kind"] == "initial"}
    for r in retries:
        parent = initial[r["parent_intent_id"]]
        assert (r["account_id"], r["quantity"], r["attempt"]) == (
            parent["account_id"],
            parent["quantity"],
            2,
        )
        assert r["intent_id"] != parent["intent_id"]
    scheduled = system.of("transient", "intent_scheduled")
    assert {e["data"]["recovery"] for e in scheduled} == {code}
    assert all(0 <= e["data"]["delay_s"] <= 0.05 for e in scheduled)
    assert all("full jitter" in e["rationale"] for e in scheduled)


async def test_insufficient_margin_is_retried_smaller(kafka: KafkaConfig) -> None:
    cfg = configured(
        kafka, venue={"reject_probability": {"insufficient_margin": 1.0}, "faults_max_attempt": 1}
    )
    async with running(cfg) as system:
        await send_signals(system, now_signal("margin", "1.00"))
        result = (await system.final("margin"))["margin"]

    assert result["status"] == "partially_completed"
    reduced = sorted(
        (i["account_id"], i["quantity"]) for i in system.sent("margin") if i["kind"] == "reduced"
    )
    assert reduced == [("ACC-1", "0.23"), ("ACC-2", "0.23"), ("ACC-3", "0.23")]
    assert Decimal(result["filled_total"]) == Decimal("0.69")
    assert {ln["requested"] for ln in result["lines"]} == {"0.23"}


async def test_a_suspended_account_rests_and_its_order_is_rerouted(kafka: KafkaConfig) -> None:
    cfg = configured(
        kafka, venue={"account_reject": {"ACC-1": "account_suspended"}}, max_accounts=2
    )
    async with running(cfg) as system:
        await send_signals(system, now_signal("suspended"))
        result = (await system.final("suspended"))["suspended"]
        await send_signals(system, now_signal("after"))
        after = (await system.final("after"))["after"]

    assert result["status"] == "completed"
    [reroute] = [i for i in system.sent("suspended") if i["kind"] == "reroute"]
    assert reroute["account_id"] == "ACC-3"
    [rest] = system.of("suspended", "account_cooldown_started")
    assert rest["account_id"] == "ACC-1"
    assert "ACC-1" not in lines(after)
    excluded = system.of("after", "account_excluded")
    assert any(e["account_id"] == "ACC-1" and "COOLDOWN" in e["rationale"] for e in excluded)


async def test_market_closed_waits_for_the_next_session(kafka: KafkaConfig) -> None:
    # A calendar of one-minute sessions, one starting every minute, so the next session is at
    # most a minute away; the worker's clock is moved to 57.5 s past a minute before the signal
    # goes out, so it is about 2.5 s away.
    real = datetime.now(UTC).replace(second=0, microsecond=0)
    minutes = [real + timedelta(minutes=k) for k in range(180)]
    sessions = [f"{m:%H:%M}-{m + timedelta(minutes=1):%H:%M}" for m in minutes]
    shift = [timedelta(0)]

    def clock() -> datetime:
        return datetime.now(UTC) + shift[0]

    cfg = configured(
        kafka,
        venue={"reject_probability": {"market_closed": 1.0}, "faults_max_attempt": 1},
        instrument={"sessions": sessions},
    )
    async with running(cfg, clock=clock) as system:
        now = clock()
        shift[0] = timedelta(seconds=(57.5 - now.second - now.microsecond / 1e6) % 60)
        sent_at = clock()
        await send_signals(system, now_signal("closed", at=sent_at))
        result = (await system.final("closed"))["closed"]

    assert result["status"] == "completed"
    retries = [i for i in system.sent("closed") if i["kind"] == "retry"]
    assert len(retries) == 3
    for r in retries:
        scheduled = datetime.fromisoformat(r["scheduled_at"])
        assert (scheduled.second, scheduled.microsecond) == (0, 0)  # the session's start
        assert sent_at < scheduled < sent_at + timedelta(seconds=5)
        assert datetime.fromisoformat(r["released_at"]) >= scheduled
    events = system.of("closed", "intent_scheduled")
    assert {e["data"]["recovery"] for e in events} == {"market_closed"}
    assert all("opens next at" in e["rationale"] for e in events)


async def test_invalid_stops_are_moved_to_the_minimum_distance_once(kafka: KafkaConfig) -> None:
    cfg = configured(
        kafka,
        venue={"reject_probability": {"invalid_stops": 1.0}, "faults_max_attempt": 1},
        instrument={"min_stop_distance": "0.0100"},
    )
    async with running(cfg) as system:
        await send_signals(system, now_signal("stops", "0.90"))
        result = (await system.final("stops"))["stops"]

    assert result["status"] == "partially_completed"  # half the size at twice the distance
    retries = [i for i in system.sent("stops") if i["kind"] == "retry"]
    assert {(i["stop_loss"], i["quantity"]) for i in retries} == {("1.0900", "0.15")}
    assert Decimal(result["filled_total"]) == Decimal("0.45")
    assert all(
        "stop 1.0950 -> 1.0900" in e["rationale"] for e in system.of("stops", "intent_scheduled")
    )


async def test_unrecoverable_rejects_escalate_and_interventions_resolve_them(
    kafka: KafkaConfig,
) -> None:
    cfg = configured(
        kafka,
        venue={
            "account_reject": {"ACC-1": "invalid_symbol", "ACC-2": "other"},
            "faults_max_attempt": 1,
        },
        execution={"intervention_timeout_s": 3},
    )
    async with running(cfg) as system:
        await send_signals(system, now_signal("escalated"))
        found = await system.interventions.wait_for(lambda v: len(v) == 2)
        by_account = {iv["account_id"]: iv for iv in found}
        assert by_account["ACC-1"]["reason_code"] == "invalid_symbol"
        assert by_account["ACC-2"]["reason_code"] == "other"
        assert by_account["ACC-2"]["default_action"] == "accept_partial"
        iv = by_account["ACC-1"]
        command = f.control(
            "resolve-1",
            "resolve_intervention",
            at=datetime.now(UTC),
            intervention_id=iv["intervention_id"],
            signal_id=iv["signal_id"],
            action="retry",
        )
        await publish(cfg.kafka, system.t.control, [("demo", command)])
        result = (await system.final("escalated"))["escalated"]

    assert result["status"] == "partially_completed"
    assert lines(result)["ACC-1"]["filled"] == lines(result)["ACC-1"]["requested"]
    assert lines(result)["ACC-2"]["filled"] == "0"
    [retry] = [i for i in system.sent("escalated") if i["kind"] == "retry"]
    assert (retry["account_id"], retry["attempt"]) == ("ACC-1", 2)
    resolved = {
        e["data"]["resolved_by"]: e for e in system.of("escalated", "intervention_resolved")
    }
    assert resolved["ops@test"]["data"]["action"] == "retry"
    assert resolved["timeout"]["data"]["action"] == "accept_partial"


async def test_an_order_without_any_report_is_escalated_not_resent(kafka: KafkaConfig) -> None:
    cfg = configured(kafka, venue={"silent_accounts": ["ACC-2"]}, execution={"ack_timeout_s": 1})
    async with running(cfg) as system:
        await send_signals(system, now_signal("silent"))
        [iv] = await system.interventions.wait_for(lambda v: len(v) == 1)
        assert (iv["reason_code"], iv["account_id"]) == ("unknown_outcome", "ACC-2")
        await asyncio.sleep(0.5)
        assert [i["kind"] for i in system.sent("silent") if i["account_id"] == "ACC-2"] == [
            "initial"
        ]
        command = f.control(
            "resolve-silent",
            "resolve_intervention",
            at=datetime.now(UTC),
            intervention_id=iv["intervention_id"],
            signal_id="silent",
            action="reroute",
            reroute_account_id="ACC-3",
        )
        await publish(cfg.kafka, system.t.control, [("demo", command)])
        result = (await system.final("silent"))["silent"]

    assert result["status"] == "completed"
    acc2 = [i for i in system.sent("silent") if i["account_id"] == "ACC-2"]
    assert [i["kind"] for i in acc2] == ["initial", "cancel"]  # a safety cancel, no re-send
    [reroute] = [i for i in system.sent("silent") if i["kind"] == "reroute"]
    assert reroute["account_id"] == "ACC-3"
    assert lines(result)["ACC-2"]["status"] == "failed"
    assert lines(result)["ACC-3"]["attempts"] == 2
    types = system.types("silent")
    assert types.index("intent_timeout") < types.index("intervention_opened")
    assert types.index("intervention_opened") < types.index("intervention_resolved")


async def test_the_circuit_breaker_opens_on_repeated_failures_and_closes_after_cooling(
    kafka: KafkaConfig,
) -> None:
    cfg = configured(
        kafka,
        venue={"reject_probability": {"connection_error": 1.0}},
        execution={"retry_max_attempts": 1, "breaker_failures": 2, "breaker_cooldown_s": 3},
    )
    async with running(cfg) as system:
        await send_signals(system, now_signal("breaker-1"))
        first = (await system.final("breaker-1"))["breaker-1"]
        await send_signals(system, now_signal("breaker-2"))
        second = (await system.final("breaker-2"))["breaker-2"]
        await asyncio.sleep(3.2)
        await send_signals(system, now_signal("breaker-3"))
        await system.audit.wait_for(
            lambda v: any(
                e.get("signal_id") == "breaker-3" and e["type"] == "plan_created" for e in v
            )
        )

    assert first["status"] == "failed"
    opened = system.of("breaker-1", "circuit_opened")
    assert sorted(e["account_id"] for e in opened) == ["ACC-1", "ACC-2", "ACC-3"]
    assert second["status"] == "rejected"  # every account resting
    assert "COOLDOWN" in second["reason"] or "NO_ELIGIBLE_ACCOUNT" in second["reason"]
    closed = [e for e in system.events() if e["type"] == "circuit_closed"]
    assert sorted(e["account_id"] for e in closed) == ["ACC-1", "ACC-2", "ACC-3"]
    assert system.chain_is_whole()


# --- kill -9 and restart ------------------------------------------------------------------------

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
stagger = { min_s = 0, max_s = 0 }

[portfolios.demo.execution]
partial_fill_threshold = 1.0     # a partial is always completed, never accepted
completion_timeout_s = 2
retry_base_s = 3                 # the first retry waits 0-3 s, the second 0-6 s
retry_cap_s = 6
ack_timeout_s = 30
breaker_failures = 1000          # 40% of orders fail here: keep every account in play

[accounts.ACC-1]
portfolio = "demo"
[accounts.ACC-2]
portfolio = "demo"
[accounts.ACC-3]
portfolio = "demo"
"""

CLI = [sys.executable, "-m", "orch_worker.cli"]


def _env(kafka: KafkaConfig) -> dict[str, str]:
    return {
        **os.environ,
        "ORCH_KAFKA_BOOTSTRAP": kafka.bootstrap,
        "ORCH_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
        "ORCH_KAFKA_PROFILE": kafka.profile.value,
    }


def _ready(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return int(r.status) == 200
    except OSError:
        return False


async def _until_ready(proc: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the worker exited before becoming ready"
        if await asyncio.to_thread(_ready, port):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the worker was not ready in 30s")


def _start(args: list[str], kafka: KafkaConfig, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([*CLI, *args], env=_env(kafka), stdout=out, stderr=out)


@pytest.mark.timeout(180)
async def test_a_killed_worker_resumes_open_orders_and_pending_retries_exactly_once(
    kafka: KafkaConfig, tmp_path: Path
) -> None:
    cfg_path = tmp_path / "orch.toml"
    cfg_path.write_text(CONFIG)
    worker_cfg = load_config(cfg_path, env={}, bootstrap=kafka.bootstrap)
    doc = worker_cfg.model_dump(mode="json")
    doc["kafka"] = kafka.model_dump(mode="json")
    doc["venue"] = {
        **QUIET_VENUE,
        "group_id": f"kill-venue-{uuid.uuid4().hex[:8]}",
        "http_port": 0,
        "partial_fill_probability": 0.5,
        "reject_probability": {"connection_error": 0.4},
        "faults_max_attempt": 1,  # retries and completions go through
    }
    cfg = OrchConfig.model_validate(doc)
    t = Topics(kafka.topic_prefix)
    now = datetime.now(UTC)
    await publish(kafka, t.account_state, [(a, f.account(a, at=now)) for a in cfg.accounts])
    await publish(
        kafka, t.prices, [("EURUSD", PriceTick(symbol="EURUSD", price=Decimal("1.1004"), ts=now))]
    )
    n = 30
    sigs = [limit(f"k-{i:03d}", "0.30") for i in range(n)]

    port = free_port()
    log = tmp_path / "worker.log"
    run = ["run", "--config", str(cfg_path), "--http-port", str(port)]
    proc = _start(run, kafka, log)
    system = System(cfg)
    try:
        async with (
            system.results,
            system.audit,
            system.intents,
            venue_running(cfg),
        ):
            await _until_ready(proc, port)
            await publish(kafka, t.signals, [("demo", s) for s in sigs])

            def pending(values: list[Json]) -> bool:
                retries = [
                    e
                    for e in values
                    if e["type"] == "intent_scheduled" and e["data"]["delay_s"] > 1
                ]
                partial = [
                    e
                    for e in values
                    if e.get("data", {}).get("intent_status") == "partially_filled"
                ]
                return bool(retries) and bool(partial)

            await system.audit.wait_for(pending, 30)
            proc.send_signal(signals.SIGKILL)
            proc.wait(10)
            killed_at = datetime.now(UTC)
            decided_before = {e["event_id"] for e in system.audit.values}
            proc = _start(run, kafka, log)
            await _until_ready(proc, port)
            finals = await system.final(*(s.signal_id for s in sigs), timeout_s=90)
            await asyncio.sleep(1.0)  # anything released twice would arrive by now
    finally:
        stop_processes(proc)

    # nothing lost: every signal completed in full
    assert {r["status"] for r in finals.values()} == {"completed"}, log.read_text()[-3000:]
    assert all(Decimal(r["filled_total"]) == Decimal("0.30") for r in finals.values())
    # nothing duplicated: every intent (order or cancel) released once
    counts = Counter(i["intent_id"] for i in system.intents.values)
    assert not {k: c for k, c in counts.items() if c > 1}
    # retries decided before the kill went out after the restart, at or after their time
    scheduled_before = [
        e
        for e in system.events()
        if e["type"] == "intent_scheduled" and e["event_id"] in decided_before
    ]
    released_after = {
        i["intent_id"]
        for i in system.intents.values
        if datetime.fromisoformat(i["released_at"]) > killed_at
    }
    resumed = [e for e in scheduled_before if e["intent_id"] in released_after]
    assert resumed, "a retry or completion pending at the kill must be released after the restart"
    # open orders were followed after the restart: their completion timeouts fired there
    timeouts_after = [
        e
        for e in system.events()
        if e["type"] == "intent_timeout" and datetime.fromisoformat(e["ts"]) > killed_at
    ]
    assert timeouts_after or resumed
    assert system.chain_is_whole(), "the audit chain continues across the kill"
    kinds = Counter(i["kind"] for i in system.intents.values)
    assert kinds["retry"] > 0, kinds
    assert kinds["completion"] > 0, kinds
