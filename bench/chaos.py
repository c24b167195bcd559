"""Chaos harness (`make chaos`, `python -m bench.chaos`): kill -9, broker pauses, and the counts.

Runs N signals through real processes on a real Kafka-protocol broker -- the embedded Tansu
broker, `orch-worker run` (W workers in one consumer group), `orch-worker venue` (partial fills
and every reject reason on) and `orch-worker sink` (SQLite) -- while it SIGKILLs a random worker
at K random moments (seeded) and restarts it, and SIGSTOPs the broker for a few seconds
mid-run. At the end it waits until every signal has a terminal ExecutionResult, stops
everything, and checks what users rely on:

* every signal terminal;
* every planned intent released exactly once, counted by intent id at the venue (the
  order-intents topic read from the beginning), and the same set of intents the audit's
  `intent_released` events name; a planned intent that was not released must have an audit
  event saying why (`intent_expired`, `release_cancelled`);
* no account's limits exceeded by its fills: per intent filled <= its quantity, per result line
  filled <= requested, per account filled <= what plans (and reroutes) gave it, and the
  margin of all its fills (filled x value_per_unit x avg price x margin_rate) within the
  `margin_available` its account state gave. Account states are static here (no broker
  bridge books fills), so the harness gives each account a little more margin than its share
  of every signal could ever need: a duplicate release or an overfill is what breaks it;
* the ExecutionResults agree with the venue's reports (filled per account);
* `orch-worker audit verify` exits 0 (hash chains and completeness);
* the sink holds every audit event once: distinct event ids on the audit topic == rows in the
  store, no id twice, no conflicts; and no event id on the topic with two different hashes;
* nothing dead-lettered (every input is valid), and no process exited on its own.

It prints progress as it goes and a summary table of every number checked, and exits non-zero
on any violation. Retries and reroutes (when the worker makes them) are counted, never assumed.

Child processes die with the harness (PR_SET_PDEATHSIG and an atexit hook); a broker pause is
run by a small helper process that always sends SIGCONT, even if the harness is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import IO, Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from orch_worker.adapters.kafka.clients import consumer_kwargs, ensure_topics, producer_kwargs
from orch_worker.adapters.kafka.embedded import EmbeddedBroker, free_port
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.config import KafkaConfig, KafkaProfile

CLI = [sys.executable, "-m", "orch_worker.cli"]

REJECT_REASONS = (
    "connection_error",
    "timeout",
    "rate_limited",
    "insufficient_margin",
    "market_closed",
    "invalid_stops",
    "invalid_symbol",
    "account_suspended",
    "other",
)

# symbol -> (value_per_unit, margin_rate, reference price, stop distance)
INSTRUMENTS: dict[str, tuple[Decimal, Decimal, Decimal, Decimal]] = {
    "EURUSD": (Decimal(100000), Decimal("0.0333"), Decimal("1.1000"), Decimal("0.0040")),
    "GBPUSD": (Decimal(100000), Decimal("0.05"), Decimal("1.2700"), Decimal("0.0050")),
}
LOT = Decimal("0.01")
SLIPPAGE_BPS_MAX = Decimal(2)
"""The venue's default worst slippage; the margin budget allows for it."""

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
VERIFY_TIMEOUT_S = 300.0
NOT_RELEASED = ("intent_expired", "release_cancelled")
"""Audit event types that end a planned intent without releasing it (with the reason)."""


@dataclass(frozen=True, slots=True)
class ChaosOptions:
    signals: int = 1000
    kills: int = 20
    seed: int = 7
    workers: int = 1
    pauses: int = 1
    pause_s: float = 3.0
    rate: float = 10.0
    """Signals published per second, steadily."""
    portfolios: int = 3
    accounts_per_portfolio: int = 4
    timeout_s: float = 180.0
    """After publishing and the last fault: how long every signal may take to become terminal."""
    workdir: Path | None = None
    """Logs, config and the audit store; a fresh temp dir (removed on success) when None."""
    keep: bool = False


# -- small helpers -------------------------------------------------------------------------


class Progress:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {message}", flush=True)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in (headers, *rows)) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


# -- the scenario: accounts, signals, configuration ------------------------------------------


@dataclass(frozen=True, slots=True)
class Account:
    account_id: str
    portfolio: str
    margin_available: Decimal
    equity: Decimal


@dataclass(frozen=True, slots=True)
class Scenario:
    portfolios: tuple[str, ...]
    accounts: tuple[Account, ...]
    signals: tuple[dict[str, Any], ...]
    """Signal documents without `created_at`, which is stamped when each is published."""

    def account(self, account_id: str) -> Account:
        return next(a for a in self.accounts if a.account_id == account_id)


def _margin(symbol: str, quantity: Decimal, price: Decimal) -> Decimal:
    value_per_unit, margin_rate, _, _ = INSTRUMENTS[symbol]
    return quantity * value_per_unit * price * margin_rate


def make_scenario(opts: ChaosOptions, rng: random.Random) -> Scenario:
    portfolios = tuple(f"P{p + 1}" for p in range(opts.portfolios))
    signals = []
    for i in range(opts.signals):
        portfolio = portfolios[i % len(portfolios)]
        symbol = rng.choice(sorted(INSTRUMENTS))
        _, _, price, stop = INSTRUMENTS[symbol]
        side = rng.choice(("buy", "sell"))
        quantity = LOT * rng.randint(3, 40)
        signals.append(
            {
                "signal_id": f"chaos-{i + 1:06d}",
                "portfolio": portfolio,
                "strategy_id": "chaos",
                "symbol": symbol,
                "side": side,
                "order_type": "market",
                "reference_price": str(price),
                "stop_loss": str(price - stop if side == "buy" else price + stop),
                "quantity": str(quantity),
                "urgency": "normal",
                "confidence": 0.8,
            }
        )
    # Each account gets enough margin for every signal of its portfolio in full, at the worst
    # slippage: whatever a correct worker excludes, reduces or reroutes, one account can never
    # be given more than the whole signal. Only fills beyond the plans (a duplicate release, an
    # overfill) could break it; the exact checks (per intent, per signal, per account against
    # its allocations) are the sharp ones.
    worst = (Decimal(10000) + SLIPPAGE_BPS_MAX) / Decimal(10000)
    accounts = []
    for portfolio in portfolios:
        need = sum(
            (
                _margin(
                    str(s["symbol"]),
                    Decimal(str(s["quantity"])),
                    Decimal(str(s["reference_price"])) * worst,
                )
                for s in signals
                if s["portfolio"] == portfolio
            ),
            start=Decimal(0),
        )
        for j in range(opts.accounts_per_portfolio):
            margin = max(need, Decimal(1000)).quantize(Decimal(1), ROUND_CEILING) + 1000 * j
            accounts.append(Account(f"{portfolio}-ACC-{j + 1}", portfolio, margin, margin * 2))
    return Scenario(portfolios, tuple(accounts), tuple(signals))


def config_toml(opts: ChaosOptions, scenario: Scenario, kafka: KafkaConfig) -> str:
    lines = [
        "# Written by bench/chaos.py for one chaos run.",
        "[kafka]",
        f'bootstrap = "{kafka.bootstrap}"',
        f'topic_prefix = "{kafka.topic_prefix}"',
        'profile = "embedded"',
        f"partitions = {kafka.partitions}",
        "",
        "[worker]",
        "max_signal_age_s = 86400",
        "max_batch = 50",
        "",
    ]
    for symbol, (value_per_unit, margin_rate, _, _) in INSTRUMENTS.items():
        lines += [
            f"[instruments.{symbol}]",
            f'value_per_unit = "{value_per_unit}"',
            f'lot_step = "{LOT}"',
            f'min_quantity = "{LOT}"',
            'max_quantity = "50"',
            f'margin_rate = "{margin_rate}"',
            "",
        ]
    for portfolio in scenario.portfolios:
        lines += [
            f"[portfolios.{portfolio}]",
            'allocation = "equal"',
            "stagger = { min_s = 0.1, max_s = 2.0 }",
            f"[portfolios.{portfolio}.rules]",
            'max_daily_loss_pct = "5"',
            'max_drawdown_pct = "10"',
            "",
            *_execution_section(portfolio),
        ]
    lines += ["[brokers.paper]", "max_orders_per_s = 1000", ""]
    for a in scenario.accounts:
        lines += [f"[accounts.{a.account_id}]", f'portfolio = "{a.portfolio}"', 'broker = "paper"']
    rejects = ", ".join(f"{r} = 0.02" for r in REJECT_REASONS)
    lines += [
        "",
        "[venue]",
        f"seed = {opts.seed}",
        "latency_ms_min = 10",
        "latency_ms_max = 300",
        "partial_fill_probability = 0.3",
        f"reject_probability = {{ {rejects} }}",
        "",
    ]
    return "\n".join(lines)


EXECUTION_SETTINGS: dict[str, float] = {
    "intervention_timeout_s": 5.0,
    "suspension_cooldown_s": 5.0,
    "breaker_cooldown_s": 5.0,
}
"""Short timeouts and cooldowns for a chaos run: nobody answers interventions (each takes its
default action soon), and accounts that rejected with account_suspended or tripped their
breaker come back soon, so every account keeps trading and the run keeps its load."""


def _execution_section(portfolio: str) -> list[str]:
    """`EXECUTION_SETTINGS` this orch-worker knows (keys are never guessed: the configuration
    refuses unknown keys)."""
    from orch_worker.domain import config

    execution = getattr(config, "ExecutionConfig", None)
    if "execution" not in config.PortfolioConfig.model_fields or execution is None:
        return []
    known = {k: v for k, v in EXECUTION_SETTINGS.items() if k in execution.model_fields}
    if not known:
        return []
    return [
        f"[portfolios.{portfolio}.execution]",
        *(f"{k} = {v}" for k, v in known.items()),
        "",
    ]


def account_state(a: Account) -> dict[str, Any]:
    return {
        "account_id": a.account_id,
        "portfolio": a.portfolio,
        "broker": "paper",
        "status": "active",
        "currency": "USD",
        "balance": str(a.equity),
        "equity": str(a.equity),
        "margin_used": "0",
        "margin_available": str(a.margin_available),
        "day_start_equity": str(a.equity),
        "peak_equity": str(a.equity),
        "positions": [],
        "updated_at": _now(),
    }


# -- processes -------------------------------------------------------------------------------


class Child:
    """One `orch-worker` process (worker, venue or sink), restartable, logging to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.env, self.log_path = name, env, log
        self.port = free_port()
        self.args = [*args, "--http-port", str(self.port)]
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        # Popen from the main thread only: PR_SET_PDEATHSIG fires when the *thread* that
        # started the child ends.
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*CLI, *self.args],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Seconds until /readyz answered 200; raises if the process died or took too long."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise RuntimeError(f"{self.name} exited with {code} before it was ready")
            if await asyncio.to_thread(_http_status, self.port, "/readyz") == 200:
                return time.monotonic() - started
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready within {timeout_s:.0f}s (log {self.log_path})")

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close_log()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL after the timeout; the exit code (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close_log()
        return self.proc.returncode

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class Processes:
    """Every child of the run, so that an exit path (normal, error, ^C, atexit) stops them all."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.broker: EmbeddedBroker | None = None
        self.pausers: list[subprocess.Popen[bytes]] = []

    def add(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        broker_pid = self.broker.pid if self.broker else None
        if broker_pid is not None:  # a stopped broker would ignore SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.kill(broker_pid, signal.SIGCONT)
        for child in self.children:
            with contextlib.suppress(Exception):
                child.stop(5)
        for p in self.pausers:
            if p.poll() is None:
                with contextlib.suppress(Exception):
                    p.kill()
                    p.wait(5)
        if self.broker is not None:
            self.broker.stop()
            self.broker = None


def pause_broker(procs: Processes, seconds: float) -> subprocess.Popen[bytes]:
    """SIGSTOP the broker for `seconds`, from a helper that sends SIGCONT even if we die."""
    assert procs.broker is not None
    assert procs.broker.pid is not None
    pid = procs.broker.pid
    script = f"kill -STOP {pid} && sleep {seconds:.3f}; kill -CONT {pid}"
    helper = subprocess.Popen(["/bin/sh", "-c", script])
    procs.pausers.append(helper)
    return helper


# -- what the topics say ---------------------------------------------------------------------


@dataclass
class Observed:
    """Everything the harness reads back from the topics, from the beginning."""

    intent_records: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    result_records: int = 0
    report_fills: dict[str, Decimal] = field(default_factory=dict)
    report_records: int = 0
    audit_hashes: dict[str, set[str]] = field(default_factory=dict)
    audit_records: int = 0
    audit_released: dict[str, set[str]] = field(default_factory=dict)
    """intent id -> ids of the `intent_released` events naming it (redeliveries share an id)."""
    audit_not_released: dict[tuple[str, str], str] = field(default_factory=dict)
    """(signal, account) -> the audit event type that ended its planned intent unreleased."""
    plans: dict[str, list[tuple[str, Decimal]]] = field(default_factory=dict)
    plan_rejected: set[str] = field(default_factory=set)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)
    interventions: dict[str, str] = field(default_factory=dict)
    """intervention id -> reason code (a chaos run has nobody to answer them)."""

    def terminal(self) -> int:
        return sum(1 for r in self.results.values() if r["status"] not in ("planned", "executing"))

    def on_intent(self, v: dict[str, Any]) -> None:
        self.intent_records.append(v)

    def on_result(self, v: dict[str, Any]) -> None:
        self.result_records += 1
        old = self.results.get(v["signal_id"])
        if old is None or v["seq"] > old["seq"]:
            self.results[v["signal_id"]] = v

    def on_report(self, v: dict[str, Any]) -> None:
        self.report_records += 1
        filled = Decimal(v["filled_quantity"])
        if filled > self.report_fills.get(v["intent_id"], Decimal(0)):
            self.report_fills[v["intent_id"]] = filled

    def on_audit(self, v: dict[str, Any]) -> None:
        self.audit_records += 1
        self.audit_hashes.setdefault(v["event_id"], set()).add(v["hash"])
        kind = v["type"]
        if kind == "intent_released":
            self.audit_released.setdefault(v["intent_id"], set()).add(v["event_id"])
        elif kind in NOT_RELEASED:
            self.audit_not_released[(v["signal_id"], v["account_id"])] = kind
        elif kind == "plan_created":
            plan = v["data"]["plan"]
            self.plans[v["signal_id"]] = [
                (a["account_id"], Decimal(a["quantity"])) for a in plan["allocations"]
            ]
        elif kind == "signal_rejected":
            self.plan_rejected.add(v["signal_id"])

    def on_dead_letter(self, v: dict[str, Any]) -> None:
        self.dead_letters.append(v)

    def on_intervention(self, v: dict[str, Any]) -> None:
        self.interventions[v["intervention_id"]] = v["reason_code"]


class Reader:
    """Reads the output topics from the beginning in the background, into `Observed`."""

    def __init__(self, kafka: KafkaConfig, topics: Topics, seen: Observed) -> None:
        self.kafka = kafka
        self.handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            topics.order_intents: seen.on_intent,
            topics.execution_results: seen.on_result,
            topics.execution_reports: seen.on_report,
            topics.audit: seen.on_audit,
            topics.dead_letter: seen.on_dead_letter,
            topics.interventions: seen.on_intervention,
        }
        self.last_record = time.monotonic()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(*self.handlers, **consumer_kwargs(self.kafka, None))
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=100, max_records=5000)
            for tp, records in batch.items():
                handle = self.handlers[tp.topic]
                for r in records:
                    handle(orjson.loads(r.value))
                if records:
                    self.last_record = time.monotonic()

    async def quiet(self, seconds: float, timeout_s: float) -> bool:
        """Wait until no record arrived for `seconds` (or the timeout): the topics are read."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.raise_if_failed()
            if time.monotonic() - self.last_record >= seconds:
                return True
            await asyncio.sleep(0.1)
        return False

    def raise_if_failed(self) -> None:
        if self._task is not None and self._task.done() and not self._task.cancelled():
            exc = self._task.exception()
            if exc is not None:
                raise RuntimeError(f"reading the output topics failed: {exc!r}") from exc

    async def stop(self) -> None:
        task, consumer = self._task, self._consumer
        self._task = self._consumer = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 10)


# -- the run ---------------------------------------------------------------------------------


@dataclass
class RunLog:
    """What happened during the run, for the summary."""

    published: int = 0
    kills: int = 0
    restarts_ready: int = 0
    restart_s: list[float] = field(default_factory=list)
    pauses: int = 0
    unexpected_exits: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    worker_exit_codes: list[int | None] = field(default_factory=list)
    verify_code: int | None = None
    verify_text: str = ""
    db_rows: int = 0
    db_ids: set[str] = field(default_factory=set)
    db_duplicate_ids: int = 0
    db_conflicts: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class Chaos:
    def __init__(self, opts: ChaosOptions, workdir: Path) -> None:
        self.opts = opts
        self.workdir = workdir
        self.rng = random.Random(opts.seed)
        self.say = Progress()
        self.procs = Processes()
        self.seen = Observed()
        self.log = RunLog()
        self.scenario = make_scenario(opts, self.rng)
        self.db_path = workdir / "audit.db"
        self.db_url = f"sqlite:///{self.db_path}"
        self.workers: list[Child] = []
        self.kafka: KafkaConfig | None = None
        self.reader: Reader | None = None
        self._expected_exit: set[int] = set()
        self.interrupted = False

    # -- setup ----------------------------------------------------------------------------

    async def setup(self) -> None:
        broker = EmbeddedBroker(log_path=self.workdir / "tansu.log")
        self.procs.broker = broker
        bootstrap = broker.start()
        self.say(f"embedded broker (Tansu) on {bootstrap}, pid {broker.pid}")
        self.kafka = KafkaConfig(
            bootstrap=bootstrap,
            topic_prefix=f"chaos-{uuid.uuid4().hex[:8]}.",
            profile=KafkaProfile.EMBEDDED,
            partitions=3,
        )
        topics = Topics(self.kafka.topic_prefix)
        await ensure_topics(self.kafka, topics)
        cfg_path = self.workdir / "chaos.toml"
        cfg_path.write_text(config_toml(self.opts, self.scenario, self.kafka))
        env = {
            **os.environ,
            "ORCH_KAFKA_BOOTSTRAP": self.kafka.bootstrap,
            "ORCH_KAFKA_TOPIC_PREFIX": self.kafka.topic_prefix,
            "ORCH_KAFKA_PROFILE": "embedded",
        }
        self.reader = Reader(self.kafka, topics, self.seen)
        await self.reader.start()
        await self._publish(
            topics.account_state,
            [(a.account_id, account_state(a)) for a in self.scenario.accounts],
        )
        self.say(
            f"{len(self.scenario.accounts)} accounts in {len(self.scenario.portfolios)} "
            f"portfolios; config {cfg_path}; topics {self.kafka.topic_prefix}*"
        )
        cfg = ["--config", str(cfg_path)]
        self.procs.add(Child("venue", ["venue", *cfg], env, self.workdir / "venue.log"))
        self.procs.add(
            Child("sink", ["sink", *cfg, "--db", self.db_url], env, self.workdir / "sink.log")
        )
        for w in range(self.opts.workers):
            log = self.workdir / f"worker-{w + 1}.log"
            self.workers.append(self.procs.add(Child(f"worker-{w + 1}", ["run", *cfg], env, log)))
        for child in self.procs.children:
            child.start()
        for child in self.procs.children:
            took = await child.ready()
            self.say(f"{child.name} ready (pid {child.pid}, :{child.port}) in {took:.1f}s")

    async def _publish(self, topic: str, items: list[tuple[str, dict[str, Any]]]) -> None:
        assert self.kafka is not None
        producer = AIOKafkaProducer(**producer_kwargs(self.kafka))
        await producer.start()
        try:
            for key, value in items:
                await producer.send(topic, orjson.dumps(value), key=key.encode())
            await asyncio.wait_for(producer.flush(), 60)
        finally:
            await asyncio.wait_for(producer.stop(), 30)

    # -- load and faults ------------------------------------------------------------------

    async def publish_signals(self) -> None:
        assert self.kafka is not None
        topic = Topics(self.kafka.topic_prefix).signals
        producer = AIOKafkaProducer(**producer_kwargs(self.kafka))
        await producer.start()
        try:
            started = time.monotonic()
            every = max(1, self.opts.signals // 10)
            for i, doc in enumerate(self.scenario.signals):
                delay = started + i / self.opts.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                value = orjson.dumps({**doc, "created_at": _now()})
                await producer.send(topic, value, key=doc["portfolio"].encode())
                self.log.published = i + 1
                if (i + 1) % every == 0 or i + 1 == self.opts.signals:
                    self.say(f"published {i + 1}/{self.opts.signals} signals; {self._status()}")
            await asyncio.wait_for(producer.flush(), 120)
        finally:
            await asyncio.wait_for(producer.stop(), 30)

    def _status(self) -> str:
        s = self.seen
        return (
            f"{len({v['intent_id'] for v in s.intent_records})} intents released, "
            f"{s.report_records} reports, {s.terminal()}/{self.opts.signals} signals terminal"
        )

    def fault_plan(self) -> list[tuple[float, str]]:
        """(seconds after publishing starts, "kill" | "pause"), sorted; seeded."""
        span = self.opts.signals / self.opts.rate
        moments = [(self.rng.uniform(0.05, 0.95) * span, "kill") for _ in range(self.opts.kills)]
        moments += [(self.rng.uniform(0.2, 0.8) * span, "pause") for _ in range(self.opts.pauses)]
        return sorted(moments)

    async def faults(self, plan: list[tuple[float, str]]) -> None:
        """Kills and pauses on two independent timelines, so a pause may hit a restart.

        Kills follow each other: the next waits until the restarted worker is ready (and a
        moment more). Pauses happen at their own moments, whatever the workers are doing.
        """
        started = time.monotonic()
        kills = [at for at, what in plan if what == "kill"]
        pauses = [at for at, what in plan if what == "pause"]
        await asyncio.gather(
            self._timeline(started, kills, self.kill_one, min_gap_s=0.3),
            self._timeline(started, pauses, self.pause, min_gap_s=0.0),
        )

    @staticmethod
    async def _timeline(
        started: float, moments: list[float], act: Callable[[], Awaitable[None]], min_gap_s: float
    ) -> None:
        for at in moments:
            await asyncio.sleep(max(started + at - time.monotonic(), min_gap_s))
            await act()

    async def kill_one(self) -> None:
        index = self.rng.randrange(len(self.workers))
        w = self.workers[index]
        self.log.kills += 1
        pid = w.pid
        self._expected_exit.add(pid)
        w.kill()
        killed = time.monotonic()
        self.say(
            f"kill #{self.log.kills}/{self.opts.kills}: SIGKILL {w.name} pid {pid} "
            f"({self.log.published}/{self.opts.signals} published; {self._status()})"
        )
        w.start()
        try:
            await w.ready()
        except RuntimeError as exc:
            self.log.errors.append(f"restart after kill #{self.log.kills}: {exc}")
            self.say(f"ERROR {exc}")
            return
        took = time.monotonic() - killed
        self.log.restarts_ready += 1
        self.log.restart_s.append(took)
        self.say(f"restart: {w.name} pid {w.pid} ready {took:.1f}s after the kill")

    async def pause(self) -> None:
        assert self.procs.broker is not None
        self.log.pauses += 1
        secs = self.opts.pause_s
        self.say(
            f"pause #{self.log.pauses}: SIGSTOP broker pid {self.procs.broker.pid} for "
            f"{secs:.1f}s ({self._status()})"
        )
        pid = self.procs.broker.pid
        helper = pause_broker(self.procs, secs)
        try:
            await asyncio.wait_for(asyncio.to_thread(helper.wait), secs + 10)
        finally:
            if pid is not None:  # the helper resumes it; this is only belt and braces
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        self.say(f"pause #{self.log.pauses}: SIGCONT broker; {self._status()}")

    async def watch(self) -> None:
        """Restart any child that exits on its own (a crash), and record it as a violation."""
        while True:
            await asyncio.sleep(0.2)
            for child in self.procs.children:
                if child.proc is None or child.alive() or child.pid in self._expected_exit:
                    continue
                what = f"{child.name} pid {child.pid} exited by itself with {child.proc.returncode}"
                self.log.unexpected_exits.append(what)
                self._expected_exit.add(child.pid)
                self.say(f"VIOLATION {what}; restarting it (log {child.log_path})")
                child.kill()
                child.start()

    async def progress(self) -> None:
        while True:
            await asyncio.sleep(5)
            self.say(
                f"progress: {self.log.published}/{self.opts.signals} published; {self._status()}"
            )

    # -- the end --------------------------------------------------------------------------

    async def until_terminal(self) -> list[str]:
        """Signal ids not terminal when the timeout ran out (empty when all are)."""
        wanted = [s["signal_id"] for s in self.scenario.signals]
        deadline = time.monotonic() + self.opts.timeout_s
        while time.monotonic() < deadline:
            assert self.reader is not None
            self.reader.raise_if_failed()
            if self.seen.terminal() >= len(wanted) and all(self.terminal(s) for s in wanted):
                return []
            await asyncio.sleep(0.2)
        return [s for s in wanted if not self.terminal(s)]

    def terminal(self, signal_id: str) -> bool:
        r = self.seen.results.get(signal_id)
        return r is not None and r["status"] not in ("planned", "executing")

    def db_counts(self) -> tuple[int, set[str], int, int]:
        """Rows, event ids, ids stored twice and conflicts in the sink's SQLite store."""
        if not self.db_path.exists():
            return 0, set(), 0, 0
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        try:
            rows = int(conn.execute("SELECT count(*) FROM audit_events").fetchone()[0])
            ids = {r[0] for r in conn.execute("SELECT event_id FROM audit_events")}
            twice = int(
                conn.execute(
                    "SELECT count(*) FROM (SELECT event_id FROM audit_events"
                    " GROUP BY event_id HAVING count(*) > 1)"
                ).fetchone()[0]
            )
            conflicts = int(conn.execute("SELECT count(*) FROM audit_conflicts").fetchone()[0])
        finally:
            conn.close()
        return rows, ids, twice, conflicts

    async def until_sink_caught_up(self, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                rows, ids, _, _ = await asyncio.to_thread(self.db_counts)
            except sqlite3.Error:
                rows, ids = 0, set()
            if rows >= len(self.seen.audit_hashes) and ids >= set(self.seen.audit_hashes):
                return True
            await asyncio.sleep(0.3)
        return False

    async def finish(self, *, quick: bool = False) -> None:
        """Stop the workers, let the topics and the sink settle, stop the rest, verify.

        `quick` (after an interrupt) waits less: the counts are partial anyway.
        """
        if self.reader is None:
            return
        settle = 10.0 if quick else 60.0
        await asyncio.sleep(0 if quick else 1.5)  # anything released twice would arrive by now
        for w in self.workers:
            if w.proc is not None:
                self._expected_exit.add(w.pid)
                self.log.worker_exit_codes.append(await asyncio.to_thread(w.stop))
        self.say(f"workers stopped (exit codes {self.log.worker_exit_codes})")
        if not await self.reader.quiet(2.0, settle):
            self.log.errors.append(f"the output topics did not go quiet within {settle:g}s")
        if not await self.until_sink_caught_up(settle):
            self.log.errors.append(f"the sink did not store every audit event within {settle:g}s")
        for child in self.procs.children:
            if child not in self.workers and child.proc is not None:
                self._expected_exit.add(child.pid)
                code = await asyncio.to_thread(child.stop)
                if code not in (0, None):
                    self.log.errors.append(f"{child.name} exited with {code} on SIGTERM")
        await self.reader.stop()
        rows, ids, twice, conflicts = self.db_counts()
        self.log.db_rows, self.log.db_ids = rows, ids
        self.log.db_duplicate_ids, self.log.db_conflicts = twice, conflicts
        self.say(f"sink stopped: {rows} audit rows; running audit verify")
        proc = await asyncio.to_thread(
            subprocess.run,
            [*CLI, "audit", "verify", "--db", self.db_url],
            capture_output=True,
            timeout=VERIFY_TIMEOUT_S,
            check=False,
        )
        self.log.verify_code = proc.returncode
        self.log.verify_text = (proc.stdout + proc.stderr).decode(errors="replace").strip()

    async def run(self) -> None:
        """Set up, load, inject faults, drain, then stop and read back; interruptible."""
        t0 = time.monotonic()
        try:
            await self.setup()
            self.log.timings["setup_s"] = time.monotonic() - t0
            await self._load_and_drain()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self.interrupted or task is None:
                raise
            task.uncancel()
            self.log.errors.append("interrupted before the end: the counts are partial")
            self.say("interrupted: stopping everything and checking what is there")
        await self.finish(quick=self.interrupted)
        self.log.timings["total_s"] = time.monotonic() - t0

    def interrupt(self, task: asyncio.Task[Any]) -> None:
        """First ^C / SIGTERM: stop the run where it is and go to the checks."""
        self.interrupted = True
        task.cancel()

    async def _load_and_drain(self) -> None:
        plan = self.fault_plan()
        kills = ", ".join(f"{at:.1f}s" for at, what in plan if what == "kill")
        pauses = ", ".join(f"{at:.1f}s" for at, what in plan if what == "pause")
        self.say(
            f"publishing {self.opts.signals} signals at {self.opts.rate:g}/s; kills at [{kills}]"
            f"; broker pauses of {self.opts.pause_s:g}s at [{pauses}] (seed {self.opts.seed})"
        )
        helpers = [asyncio.create_task(self.watch()), asyncio.create_task(self.progress())]
        t1 = time.monotonic()
        try:
            await asyncio.gather(self.publish_signals(), self.faults(plan))
            self.log.timings["load_and_faults_s"] = time.monotonic() - t1
            self.say(f"all signals published and faults done; {self._status()}")
            t2 = time.monotonic()
            late = await self.until_terminal()
            if late:
                self.say(
                    f"TIMEOUT: {len(late)} signals not terminal after {self.opts.timeout_s:g}s"
                )
            self.log.timings["drain_s"] = time.monotonic() - t2
            self.say(f"{self._status()}")
        finally:
            for h in helpers:
                h.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)


# -- the checks ------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    expected: str
    actual: str
    ok: bool
    detail: list[str] = field(default_factory=list)


def _d(x: Decimal) -> str:
    return f"{x.normalize():f}" if x == x.to_integral_value() else f"{x:f}"


def check_signals(c: Chaos) -> list[Check]:
    n = c.opts.signals
    published = {s["signal_id"] for s in c.scenario.signals}
    statuses = Counter(r["status"] for r in c.seen.results.values())
    not_terminal = [s["signal_id"] for s in c.scenario.signals if not c.terminal(s["signal_id"])]
    detail = [
        f"{sid}: {c.seen.results.get(sid, {}).get('status', 'no result')}"
        for sid in not_terminal[:20]
    ]
    if len(not_terminal) > 20:
        detail.append(f"... and {len(not_terminal) - 20} more")
    unknown = sorted(set(c.seen.results) - published)
    return [
        Check("signals published", str(n), str(c.log.published), c.log.published == n),
        Check(
            "signals with a terminal ExecutionResult",
            str(n),
            str(n - len(not_terminal)),
            not not_terminal,
            detail,
        ),
        Check(
            "results for signals never published", "0", str(len(unknown)), not unknown, unknown[:5]
        ),
        Check(
            "  by status",
            "-",
            ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())),
            True,
        ),
        Check(
            "  (info) final status contradicts the fills",
            "-",
            str(len(_contradictions(c))),
            True,
            _contradictions(c)[:5],
        ),
    ]


def _contradictions(c: Chaos) -> list[str]:
    """Final results whose status says one thing and whose fills another (not an invariant of
    this harness: counted and shown, never failed on)."""
    out = []
    for sid, r in sorted(c.seen.results.items()):
        filled, requested = Decimal(r["filled_total"]), Decimal(r["requested_total"])
        status = r["status"]
        if status in ("failed", "rejected", "expired", "cancelled") and filled > 0:
            out.append(f"{sid}: {status} with {_d(filled)} of {_d(requested)} filled")
        elif status == "completed" and filled < requested:
            out.append(f"{sid}: completed with {_d(filled)} of {_d(requested)} filled")
    return out


def _venue_intents(c: Chaos) -> list[dict[str, Any]]:
    return [v for v in c.seen.intent_records if v["kind"] != "cancel"]


def check_releases(c: Chaos) -> list[Check]:
    venue = _venue_intents(c)
    per_id = Counter(v["intent_id"] for v in venue)
    twice = {k: n for k, n in per_id.items() if n > 1}
    initial: dict[tuple[str, str], set[str]] = defaultdict(set)
    for v in venue:
        if v["kind"] == "initial":
            initial[(v["signal_id"], v["account_id"])].add(v["intent_id"])
    planned = {(sid, acc) for sid, allocs in c.seen.plans.items() for acc, q in allocs if q > 0}
    missing = sorted(k for k in planned if not initial.get(k))
    explained = [k for k in missing if k in c.seen.audit_not_released]
    unexplained = [k for k in missing if k not in c.seen.audit_not_released]
    several = sorted(k for k, ids in initial.items() if len(ids) > 1)
    unplanned = sorted(k for k in initial if k not in planned)
    released_audit = set(c.seen.audit_released)
    at_venue = set(per_id)
    audit_twice = {k: len(e) for k, e in c.seen.audit_released.items() if len(e) > 1}
    kinds = Counter(v["kind"] for v in venue)
    return [
        Check("planned intents (plan_created allocations)", "-", str(len(planned)), True),
        Check(
            "planned intents released at the venue",
            str(len(planned) - len(explained)),
            str(len(planned) - len(missing)),
            not unexplained,
            [f"not released and no audit reason: {k}" for k in unexplained[:10]],
        ),
        Check(
            "  not released, audit says why (expired/cancelled)",
            "-",
            str(len(explained)),
            True,
        ),
        Check(
            "initial intents for an account no plan named",
            "0",
            str(len(unplanned)),
            not unplanned,
            [str(k) for k in unplanned[:10]],
        ),
        Check(
            "planned allocations released under two intent ids",
            "0",
            str(len(several)),
            not several,
            [str(k) for k in several[:10]],
        ),
        Check(
            "intent records at the venue (kind != cancel)",
            "-",
            f"{len(venue)} ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})",
            True,
        ),
        Check(
            "intent ids released more than once",
            "0",
            str(len(twice)),
            not twice,
            [f"{k}: {n} times" for k, n in list(twice.items())[:10]],
        ),
        Check(
            "venue intent ids == audit intent_released ids",
            f"{len(released_audit)} ids",
            f"{len(at_venue)} ids, {len(at_venue ^ released_audit)} differ",
            at_venue == released_audit,
            [f"only at venue: {i}" for i in sorted(at_venue - released_audit)[:5]]
            + [f"only in audit: {i}" for i in sorted(released_audit - at_venue)[:5]],
        ),
        Check(
            "intents named by two distinct intent_released events",
            "0",
            str(len(audit_twice)),
            not audit_twice,
            [f"{k}: {n}" for k, n in list(audit_twice.items())[:5]],
        ),
    ]


@dataclass
class AccountTotals:
    """Per account: what plans gave it, what it filled (results and reports), its margin."""

    allocated: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    filled: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    by_reports: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    margin: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    over_line: list[str] = field(default_factory=list)


def account_totals(c: Chaos) -> AccountTotals:
    t = AccountTotals()
    venue = _venue_intents(c)
    for allocs in c.seen.plans.values():
        for acc, q in allocs:
            t.allocated[acc] += q
    for v in venue:
        if v["kind"] == "reroute":  # a reroute gives the account a share it was not planned
            t.allocated[v["account_id"]] += Decimal(v["quantity"])
    symbol = {s["signal_id"]: s["symbol"] for s in c.scenario.signals}
    for r in c.seen.results.values():
        for ln in r["lines"]:
            f, req = Decimal(ln["filled"]), Decimal(ln["requested"])
            if f > req:
                t.over_line.append(f"{r['signal_id']} {ln['account_id']}: {_d(f)} > {_d(req)}")
            t.filled[ln["account_id"]] += f
            if f > 0:
                price = Decimal(ln["avg_price"])
                t.margin[ln["account_id"]] += _margin(symbol[r["signal_id"]], f, price)
    intent_account = {v["intent_id"]: v["account_id"] for v in venue}
    for i, f in c.seen.report_fills.items():
        if i in intent_account:
            t.by_reports[intent_account[i]] += f
    return t


def _overfilled_signals(c: Chaos) -> list[str]:
    """Signals whose fills (venue reports, and the results' totals) exceed what was planned."""
    planned = {sid: sum((q for _, q in a), start=Decimal(0)) for sid, a in c.seen.plans.items()}
    intent_signal = {v["intent_id"]: v["signal_id"] for v in _venue_intents(c)}
    by_reports: dict[str, Decimal] = defaultdict(Decimal)
    for i, f in c.seen.report_fills.items():
        if i in intent_signal:
            by_reports[intent_signal[i]] += f
    bad = [
        f"{sid}: venue filled {_d(f)} > planned {_d(planned.get(sid, Decimal(0)))}"
        for sid, f in sorted(by_reports.items())
        if f > planned.get(sid, Decimal(0))
    ]
    bad += [
        f"{sid}: result filled_total {r['filled_total']} > requested_total {r['requested_total']}"
        for sid, r in sorted(c.seen.results.items())
        if Decimal(r["filled_total"]) > Decimal(r["requested_total"])
    ]
    return bad


def _count_check(name: str, bad: list[str], of: int | None = None) -> Check:
    total = f" of {of}" if of is not None else ""
    return Check(name, f"0{total}", f"{len(bad)}{total}", not bad, bad[:10])


def check_limits(c: Chaos) -> tuple[list[Check], list[list[str]]]:
    quantity = {v["intent_id"]: Decimal(v["quantity"]) for v in _venue_intents(c)}
    over_intent = [
        f"{i}: filled {_d(f)} > quantity {_d(quantity[i])}"
        for i, f in c.seen.report_fills.items()
        if i in quantity and f > quantity[i]
    ]
    over_signal = _overfilled_signals(c)
    t = account_totals(c)
    rows, over_alloc, over_margin, disagree = [], [], [], []
    for a in c.scenario.accounts:
        acc = a.account_id
        allocated, filled, margin = t.allocated[acc], t.filled[acc], t.margin[acc]
        rows.append(
            [
                acc,
                _d(allocated),
                _d(filled),
                _d(t.by_reports[acc]),
                f"{margin:.2f}",
                _d(a.margin_available),
                f"{margin / a.margin_available * 100:.1f}%",
            ]
        )
        if filled > allocated:
            over_alloc.append(f"{acc}: filled {_d(filled)} > allocated {_d(allocated)}")
        if margin > a.margin_available:
            over_margin.append(f"{acc}: margin {margin:.2f} > {a.margin_available}")
        if filled != t.by_reports[acc]:
            disagree.append(f"{acc}: results {_d(filled)} != reports {_d(t.by_reports[acc])}")
    n = len(c.scenario.accounts)
    checks = [
        _count_check("intents filled beyond their quantity (venue reports)", over_intent),
        _count_check("signals filled beyond their planned total", over_signal),
        _count_check("result lines filled beyond requested", t.over_line),
        _count_check("accounts filled beyond what plans allocated", over_alloc, n),
        _count_check("accounts whose fills' margin exceeds margin_available", over_margin, n),
        _count_check("accounts where results disagree with venue reports", disagree, n),
    ]
    return checks, rows


def check_audit(c: Chaos) -> list[Check]:
    topic_ids = set(c.seen.audit_hashes)
    forked = sorted(k for k, h in c.seen.audit_hashes.items() if len(h) > 1)
    only_topic = sorted(topic_ids - c.log.db_ids)
    only_db = sorted(c.log.db_ids - topic_ids)
    verify_lines = c.log.verify_text.splitlines()
    return [
        Check(
            "audit verify exit code",
            "0",
            str(c.log.verify_code),
            c.log.verify_code == 0,
            verify_lines[:20],
        ),
        Check(
            "audit records on the topic (with redeliveries)", "-", str(c.seen.audit_records), True
        ),
        Check(
            "audit event ids on the topic with two hashes",
            "0",
            str(len(forked)),
            not forked,
            forked[:5],
        ),
        Check(
            "sink rows == distinct audit event ids",
            str(len(topic_ids)),
            str(c.log.db_rows),
            c.log.db_rows == len(topic_ids) and not only_topic and not only_db,
            [f"not stored: {i}" for i in only_topic[:5]]
            + [f"stored, not on topic: {i}" for i in only_db[:5]],
        ),
        Check(
            "event ids stored twice in the sink",
            "0",
            str(c.log.db_duplicate_ids),
            c.log.db_duplicate_ids == 0,
        ),
        Check(
            "sink conflicts (audit_conflicts rows)",
            "0",
            str(c.log.db_conflicts),
            c.log.db_conflicts == 0,
        ),
    ]


def _restart_figures(restarts: list[float]) -> str:
    if not restarts:
        return ""
    ordered = sorted(restarts)
    return (
        f"kill -> ready min {ordered[0]:.1f}s / median {ordered[len(ordered) // 2]:.1f}s / "
        f"max {ordered[-1]:.1f}s"
    )


def check_run(c: Chaos) -> list[Check]:
    dl = c.seen.dead_letters
    reasons = Counter(f"{d.get('original_topic', '?')}: {d.get('error_type')}" for d in dl)
    w_codes = c.log.worker_exit_codes
    took = _restart_figures(c.log.restart_s)
    return [
        Check(
            "workers SIGKILLed and restarted ready",
            f"{c.opts.kills}/{c.opts.kills}",
            f"{c.log.kills}/{c.log.restarts_ready}",
            c.log.kills == c.opts.kills == c.log.restarts_ready,
            [took] if took else [],
        ),
        Check(
            "broker pauses (SIGSTOP/SIGCONT)",
            str(c.opts.pauses),
            str(c.log.pauses),
            c.log.pauses == c.opts.pauses,
        ),
        Check(
            "processes that exited by themselves",
            "0",
            str(len(c.log.unexpected_exits)),
            not c.log.unexpected_exits,
            c.log.unexpected_exits,
        ),
        Check(
            "workers exiting 0 on SIGTERM at the end",
            str(len(w_codes)),
            str(sum(1 for x in w_codes if x == 0)),
            all(x == 0 for x in w_codes),
        ),
        Check(
            "interventions opened (taken by default at their timeout)",
            "-",
            ", ".join(f"{k} {n}" for k, n in sorted(Counter(c.seen.interventions.values()).items()))
            or "0",
            True,
        ),
        Check(
            "dead-lettered records",
            "0",
            str(len(dl)),
            not dl,
            [f"{k}: {n}" for k, n in reasons.items()],
        ),
        Check("harness errors", "0", str(len(c.log.errors)), not c.log.errors, c.log.errors),
    ]


def summarize(c: Chaos) -> tuple[bool, str]:
    limits, accounts = check_limits(c)
    checks = [*check_signals(c), *check_releases(c), *limits, *check_audit(c), *check_run(c)]
    rows = [[("ok  " if k.ok else "FAIL") + " " + k.name, k.expected, k.actual] for k in checks]
    out = [
        "",
        f"chaos summary: {c.opts.signals} signals, {c.opts.kills} kills, {c.opts.pauses} broker "
        f"pause(s) of {c.opts.pause_s:g}s, {c.opts.workers} worker(s), seed {c.opts.seed}",
        "",
        table(["check", "expected", "actual"], rows),
        "",
        table(
            ["account", "allocated", "filled", "by reports", "margin used", "available", "use"],
            accounts,
        ),
        "",
    ]
    for k in checks:
        if k.detail and (not k.ok or k.name.strip().startswith("(info)")):
            name = k.name.strip().removeprefix("(info) ")
            out.append(f"{'FAIL' if not k.ok else 'info'} {name}:")
            out += [f"    {d}" for d in k.detail]
    t = c.log.timings
    out.append(
        "timings: "
        + ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in t.items())
        + f"; read {c.seen.result_records} results, {c.seen.report_records} reports, "
        f"{c.seen.audit_records} audit records"
    )
    if c.log.restart_s:
        out.append(f"restarts: {_restart_figures(c.log.restart_s)}")
    verdict = c.log.verify_text.splitlines()
    out.append(f"audit verify: {verdict[0] if verdict else '(no output)'}")
    out.append(f"workdir: {c.workdir}")
    ok = all(k.ok for k in checks)
    out.append("CHAOS PASSED" if ok else "CHAOS FAILED")
    return ok, "\n".join(out)


# -- entry points ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChaosOutcome:
    ok: bool
    summary: str
    workdir: Path


async def run_chaos(opts: ChaosOptions, *, handle_signals: bool = False) -> ChaosOutcome:
    """Run the harness once; every child process is stopped whatever happens.

    With `handle_signals` (the command line), a first SIGINT/SIGTERM ends the run early but
    still stops everything and prints the partial counts; a second one exits at once.
    """
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="orch-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    chaos = Chaos(opts, workdir)
    atexit.register(chaos.procs.stop_all)
    loop = asyncio.get_running_loop()
    try:
        task = asyncio.create_task(chaos.run())
        if handle_signals:

            def on_signal() -> None:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)  # a second signal acts at once
                signal.signal(signal.SIGTERM, _exit_now)
                chaos.interrupt(task)

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal)
        try:
            await task
        except asyncio.CancelledError:
            if not chaos.interrupted:
                raise
            chaos.log.errors.append("interrupted while stopping: the counts are partial")
        except Exception as exc:
            chaos.log.errors.append(f"{type(exc).__name__}: {exc}")
            chaos.say(f"ERROR {type(exc).__name__}: {exc}")
        ok, summary = summarize(chaos)
    finally:
        if chaos.reader is not None:
            await chaos.reader.stop()
        await asyncio.to_thread(chaos.procs.stop_all)
        atexit.unregister(chaos.procs.stop_all)
    if ok and opts.workdir is None and not opts.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return ChaosOutcome(ok, summary, workdir)


def _exit_now(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description="Kill -9 workers and pause the broker while signals run; check the counts.",
    )
    d = ChaosOptions()
    parser.add_argument("--signals", type=int, default=d.signals, help="signals to publish")
    parser.add_argument("--kills", type=int, default=d.kills, help="SIGKILLs of a worker")
    parser.add_argument("--seed", type=int, default=d.seed, help="seeds faults, data, venue")
    parser.add_argument("--workers", type=int, default=d.workers, help="workers in the group")
    parser.add_argument("--pauses", type=int, default=d.pauses, help="broker SIGSTOP/SIGCONTs")
    parser.add_argument("--pause-s", type=float, default=d.pause_s, help="length of a pause")
    parser.add_argument("--rate", type=float, default=d.rate, help="signals per second")
    parser.add_argument("--portfolios", type=int, default=d.portfolios)
    parser.add_argument(
        "--accounts", type=int, default=d.accounts_per_portfolio, help="accounts per portfolio"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=d.timeout_s,
        help="seconds, after load and faults, for every signal to end",
    )
    parser.add_argument("--workdir", type=Path, help="keep config, logs and audit store here")
    parser.add_argument("--keep", action="store_true", help="keep the temp workdir on success")
    a = parser.parse_args(argv)
    if a.signals < 1 or a.kills < 0 or a.workers < 1 or a.pauses < 0 or a.rate <= 0:
        parser.error("need signals >= 1, kills >= 0, workers >= 1, pauses >= 0, rate > 0")
    opts = ChaosOptions(
        signals=a.signals,
        kills=a.kills,
        seed=a.seed,
        workers=a.workers,
        pauses=a.pauses,
        pause_s=a.pause_s,
        rate=a.rate,
        portfolios=a.portfolios,
        accounts_per_portfolio=a.accounts,
        timeout_s=a.timeout,
        workdir=a.workdir,
        keep=a.keep,
    )
    try:
        outcome = asyncio.run(run_chaos(opts, handle_signals=True))
    except KeyboardInterrupt:
        print("interrupted; child processes stopped", file=sys.stderr)
        return 130
    print(outcome.summary, flush=True)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
