"""Backpressure (`make backpressure`, `python -m bench.backpressure`): a burst and the memory.

Issue 7: a burst of 50,000 signals must not grow the worker's memory without bound; the worker
keeps up or applies backpressure, and loses nothing. This runs the real processes on a real
Kafka-protocol broker -- the embedded Tansu broker (or `ORCH_BENCH_KAFKA_BOOTSTRAP`),
`orch-worker run` and `orch-worker venue` (no rejects, no partial fills: every signal should
complete) -- publishes N signals as fast as the producer goes, and samples every 0.5 s:

* the worker's, the venue's and the embedded broker's resident memory (VmRSS in
  /proc/PID/status; the kernel's high-water mark VmHWM is printed beside the sampled peak);
* how many signals have a terminal ExecutionResult (the execution-results topic, read from the
  beginning by a plain aiokafka consumer in this process, with order-intents and dead-letter);
* the worker's open signals (its /metrics) and its consumer lag on the signals topic (signals
  published minus the offsets its group committed).

It ends when every signal is terminal (or at `--timeout`), waits `finished_linger_s` and a
little more so finished signals can leave the worker's memory, and prints: signals published,
terminal results, signals missing, signals that ended other than completed, duplicate intent
ids on order-intents, dead letters, the worker's RSS at start / peak / end, its RSS growth per
10,000 signals over the second half of the signals (a least-squares slope of RSS against
signals done, beside the first half's), RSS per open signal, the throughput, and memory against
signals done over time. It exits non-zero if a signal is missing or did not complete, an
intent id appears twice, a record other than a late answer to a cancel was dead-lettered, or
a process died.

The embedded broker keeps every record in memory (hundreds of KiB per signal here, with five
accounts), so the run stops itself, and says so, if the machine's available memory falls below
`MEM_FLOOR`. `--backlog` publishes the whole burst before the worker starts (a backlog waiting
in Kafka); by default the worker is up and idle first, so "RSS at start" is the idle worker's.

Debugging growth: with `ORCH_BENCH_OBJECTS=1` the worker is started through a small shim
(`python -c`, the same `orch_worker.cli` main: nothing under src/ changes) that writes a census
of its heap to the workdir on SIGUSR1: live gc-tracked objects by type with their shallow sizes
(frozen ones included) and the length of every container the `Worker` and its `PortfolioState`s
hold. The bench takes one when the worker is ready, at every quarter of the signals done, every
minute and at the end, where a second one follows a full collection (what was only garbage). With
`ORCH_BENCH_OBJECTS=trace` tracemalloc runs too and the end census lists live memory by
allocation site. A census stalls the worker for seconds and tracemalloc slows it down, so such
a run's timings (and what timeouts they cause) are not the worker's.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench import BenchEnv, broker, paper_account, progress, table
from bench.chaos import _die_with_parent, _http_status
from orch_worker.adapters.kafka.clients import consumer_kwargs, ensure_topics, producer_kwargs
from orch_worker.adapters.kafka.embedded import free_port
from orch_worker.adapters.kafka.topics import Topics
from orch_worker.domain.config import KafkaConfig

TITLE = "a burst of signals: worker memory, backpressure and the counts"

CLI = [sys.executable, "-m", "orch_worker.cli"]
OBJECTS_ENV = "ORCH_BENCH_OBJECTS"
"""Set to 1 to take heap censuses of the worker, to `trace` to add tracemalloc's allocation
sites (the worker runs slower); see the module docstring."""
CENSUS_OUT_ENV = "ORCH_BENCH_CENSUS_OUT"

QUICK_SIGNALS = 3_000
MIB = 1024 * 1024
LOT = Decimal("0.01")
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
TABLE_ROWS = 10
MEM_FLOOR = 0.15
"""Stop the run when the machine's MemAvailable falls below this share of MemTotal: the embedded
broker keeps every record in memory, and running the machine out of memory would hurt others."""
CENSUS_EVERY_S = 60.0
"""With `OBJECTS_ENV`, a census also this often (a run that stalls never reaches a quarter)."""
FORGET_EVERY_S = 1.0
"""The worker looks for finished signals to forget about once a second (worker_app)."""
TERMINAL_STATUSES = frozenset(
    {"completed", "partially_completed", "rejected", "failed", "cancelled", "expired"}
)
"""ExecutionResult statuses after which a signal is done (ResultStatus.terminal)."""
METRIC_RE = re.compile(
    r"^orch_(open_signals|forgotten_signals_total|pending_releases"
    r'|messages_consumed_total\{topic="[^"]*?([a-z-]+)"\}) ([0-9.e+]+)$',
    re.M,
)
"""The worker's gauges this bench reads, and its consumed counters by topic (short name)."""


@dataclass(frozen=True, slots=True)
class Options:
    signals: int = 50_000
    portfolios: int = 2
    accounts_per_portfolio: int = 5
    timeout_s: float = 900.0
    """From the first signal published: how long every signal may take to become terminal."""
    linger_s: float = 5.0
    """worker.finished_linger_s: finished signals leave the worker's memory this long after."""
    sample_s: float = 0.5
    backlog: bool = False
    workdir: Path | None = None
    keep: bool = False
    census: str = ""
    """`OBJECTS_ENV`: "" (off), anything else for heap censuses, "trace" adds tracemalloc."""


# -- the heap census shim (debug only) --------------------------------------------------------

CENSUS_SHIM = r"""
import gc, json, os, runpy, signal, sys, time, tracemalloc

OUT = os.environ["ORCH_BENCH_CENSUS_OUT"]

def _sizes(prefix, obj, out, depth):
    for name, value in list(getattr(obj, "__dict__", {}).items()):
        if isinstance(value, (dict, list, set, frozenset, tuple)):
            out[prefix + name] = len(value)
        elif depth and hasattr(value, "__dict__") and not isinstance(value, type):
            _sizes(prefix + name + ".", value, out, depth - 1)

def _take(label):
    started = time.monotonic()
    counts, sizes, structures = {}, {}, {}
    objs = gc.get_objects()
    for o in objs:
        t = type(o)
        mod, name = getattr(t, "__module__", "?"), getattr(t, "__qualname__", "?")
        mod = mod if isinstance(mod, str) else "?"
        key = mod + "." + (name if isinstance(name, str) else "?")
        counts[key] = counts.get(key, 0) + 1
        if mod != "unittest.mock":  # sizing a mock records a call on it: it would grow
            sizes[key] = sizes.get(key, 0) + sys.getsizeof(o, 0)
        if key == "orch_worker.adapters.kafka.worker_app.Worker":
            _sizes("Worker.", o, structures, 1)
            for pf in o.portfolios.values():
                for part in ("signals", "forgotten", "account_health", "seen_commands"):
                    k = "PortfolioState." + part
                    structures[k] = structures.get(k, 0) + len(getattr(pf, part, ()))
    del objs
    traced = []
    if tracemalloc.is_tracing():
        stats = tracemalloc.take_snapshot().statistics("lineno")
        traced = [[str(st.traceback[0]), st.size, st.count] for st in stats[:25]]
    return {
        "label": label,
        "at": time.time(),
        "took_s": time.monotonic() - started,
        "blocks": sys.getallocatedblocks(),
        "types": counts,
        "bytes": sizes,
        "structures": structures,
        "traced": traced,
    }

def _write(line):
    with open(OUT, "a") as f:
        f.write(json.dumps(line) + "\n")

def census(signum, frame):
    gc.unfreeze()  # frozen objects are not listed by gc.get_objects()
    try:
        _census(signum)
    except Exception as exc:  # a debugging aid must never take the worker down
        _write({"label": "error", "error": repr(exc)})
    finally:
        gc.freeze()

def _census(signum):
    _write(_take("census"))
    if signum == signal.SIGUSR2:
        # How much of it was garbage waiting for a full collection (the worker freezes its
        # heap and collects everything only every full_gc_every_s).
        freed = gc.collect()
        line = _take("after a full collection")
        line["freed"] = freed
        _write(line)

signal.signal(signal.SIGUSR1, census)
signal.signal(signal.SIGUSR2, census)
sys.argv[0] = "orch-worker"
runpy.run_module("orch_worker.cli", run_name="__main__", alter_sys=True)
"""


# -- processes --------------------------------------------------------------------------------


def embedded_broker_pid() -> int | None:
    """The embedded broker `bench.broker()` started: our child process running Tansu."""
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            for pid in (task / "children").read_text().split():
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"tansu" in cmd and b"--listener-url" in cmd:
                    return int(pid)
    return None


def mem_available() -> tuple[int, int]:
    """(MemAvailable, MemTotal) of the machine in bytes, from /proc/meminfo."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":", 1)
            info[name] = int(value.split()[0]) * 1024
    return info["MemAvailable"], info["MemTotal"]


def rss_bytes(pid: int, field_name: str = "VmRSS") -> int | None:
    """A memory figure of /proc/PID/status in bytes (None once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Child:
    """One `orch-worker` process logging to a file; dies with this one (PR_SET_PDEATHSIG)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.env, self.log_path = name, env, log
        self.port = free_port()
        self.argv = [*argv, "--http-port", str(self.port)]
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> int | None:
        return rss_bytes(self.pid) if self.alive() else None

    async def ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited before it was ready (log {self.log_path})")
            if await asyncio.to_thread(_http_status, self.port, "/readyz") == 200:
                return time.monotonic() - started
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready within {timeout_s:.0f}s (log {self.log_path})")

    def metrics(self) -> dict[str, float]:
        """The worker's gauges this bench reads ({} when /metrics does not answer)."""
        import urllib.request

        try:
            url = f"http://127.0.0.1:{self.port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return {}
        return {
            f"consumed {m.group(2)}" if m.group(2) else m.group(1): float(m.group(3))
            for m in METRIC_RE.finditer(text)
        }

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
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode


# -- the scenario -----------------------------------------------------------------------------


def portfolio_names(opts: Options) -> list[str]:
    return [f"BP{p + 1}" for p in range(opts.portfolios)]


def account_ids(opts: Options, portfolio: str) -> list[str]:
    return [f"{portfolio}-ACC-{j + 1}" for j in range(opts.accounts_per_portfolio)]


def config_toml(opts: Options, kafka: KafkaConfig, run_id: str) -> str:
    # Signals must stay fresh however long the burst waits in Kafka, and finished ones should
    # leave memory soon: what stays is then what the worker holds per signal in flight.
    max_age = max(3600.0, 2 * opts.timeout_s)
    lines = [
        "# Written by bench/backpressure.py for one run.",
        "[kafka]",
        f'bootstrap = "{kafka.bootstrap}"',
        f'topic_prefix = "{kafka.topic_prefix}"',
        f'profile = "{kafka.profile.value}"',
        f"partitions = {kafka.partitions}",
        "",
        "[worker]",
        f'group_id = "bp-worker-{run_id}"',
        f"max_signal_age_s = {max_age:g}",
        f"finished_linger_s = {opts.linger_s:g}",
        "",
        "[venue]",
        f'group_id = "bp-venue-{run_id}"',
        "seed = 7",
        "latency_ms_min = 1",
        "latency_ms_max = 5",
        "partial_fill_probability = 0",
        "",
        "[instruments.EURUSD]",
        'value_per_unit = "100000"',
        f'lot_step = "{LOT}"',
        f'min_quantity = "{LOT}"',
        'max_quantity = "50"',
        'margin_rate = "0.0333"',
        "",
    ]
    for portfolio in portfolio_names(opts):
        # Released at once: this measures holding and finishing signals, not release timing.
        lines += [
            f"[portfolios.{portfolio}]",
            'allocation = "equal"',
            "stagger = { min_s = 0, max_s = 0 }",
            "",
        ]
        for account_id in account_ids(opts, portfolio):
            lines += [f"[accounts.{account_id}]", f'portfolio = "{portfolio}"', ""]
    return "\n".join(lines)


def account_state(account_id: str, portfolio: str) -> dict[str, Any]:
    # Static states (no bridge books the fills): margin for every fill of the whole burst.
    at = datetime.now(UTC)
    return paper_account(account_id, portfolio, at, money="1000000000").model_dump(mode="json")


def signal_doc(i: int, portfolio: str, accounts: int, created_at: str) -> dict[str, Any]:
    side = "buy" if i % 2 == 0 else "sell"
    quantity = LOT * accounts * (1 + i % 10)  # every account gets at least one lot
    return {
        "signal_id": f"bp-{i:06d}",
        "portfolio": portfolio,
        "strategy_id": "backpressure",
        "symbol": "EURUSD",
        "side": side,
        "order_type": "market",
        "reference_price": "1.1000",
        "stop_loss": "1.0950" if side == "buy" else "1.1050",
        "quantity": str(quantity),
        "urgency": "normal",
        "confidence": 0.8,
        "created_at": created_at,
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# -- what the topics say ----------------------------------------------------------------------


@dataclass
class Seen:
    terminal: dict[str, str] = field(default_factory=dict)
    """signal id -> its terminal status."""
    last_status: dict[str, str] = field(default_factory=dict)
    result_records: int = 0
    intents: Counter[str] = field(default_factory=Counter)
    intent_kinds: Counter[str] = field(default_factory=Counter)
    cancel_ids: set[str] = field(default_factory=set)
    interventions: Counter[str] = field(default_factory=Counter)
    """Reason code -> interventions opened (nobody answers them here)."""
    dead_letters: list[tuple[str, str, str]] = field(default_factory=list)
    """(error type, intent id, report status) of each dead-lettered record."""

    def on_intent(self, v: dict[str, Any]) -> None:
        self.intents[v["intent_id"]] += 1
        self.intent_kinds[v.get("kind", "initial")] += 1
        if v.get("kind") == "cancel":
            self.cancel_ids.add(v["intent_id"])

    def on_dead_letter(self, v: dict[str, Any]) -> None:
        try:
            report = orjson.loads(v["value"])
            intent_id, status = str(report["intent_id"]), str(report["status"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            intent_id, status = "", ""
        self.dead_letters.append((v.get("error_type", "?"), intent_id, status))

    def late_cancel_answers(self) -> int:
        """Dead letters that are the venue's "nothing to cancel" to a cancel the worker sent,
        arriving after the signal had finished and left memory: nothing is lost by them."""
        return sum(
            1
            for kind, intent_id, status in self.dead_letters
            if kind == "unknown_intent" and intent_id in self.cancel_ids and status == "rejected"
        )


class Reader:
    """Reads order-intents, execution-results and dead-letter from the beginning, no group."""

    def __init__(self, kafka: KafkaConfig, topics: Topics, seen: Seen) -> None:
        self.kafka, self.topics, self.seen = kafka, topics, seen
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        t = self.topics
        self._consumer = AIOKafkaConsumer(
            t.order_intents,
            t.execution_results,
            t.dead_letter,
            t.interventions,
            **consumer_kwargs(self.kafka, None),
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        t, seen = self.topics, self.seen
        while True:
            batch = await self._consumer.getmany(timeout_ms=100, max_records=5000)
            for tp, records in batch.items():
                if tp.topic == t.order_intents:
                    for r in records:
                        seen.on_intent(orjson.loads(r.value))
                elif tp.topic == t.execution_results:
                    for r in records:
                        v = orjson.loads(r.value)
                        seen.result_records += 1
                        seen.last_status[v["signal_id"]] = v["status"]
                        if v["status"] in TERMINAL_STATUSES:
                            seen.terminal[v["signal_id"]] = v["status"]
                elif tp.topic == t.dead_letter:
                    for r in records:
                        seen.on_dead_letter(orjson.loads(r.value))
                else:
                    seen.interventions.update(
                        str(orjson.loads(r.value).get("reason_code")) for r in records
                    )

    async def behind(self) -> int | None:
        """Records on its topics this reader has not read yet, by the high watermarks of its
        last fetches (the embedded broker's `end_offsets` is wrong after batched produces)."""
        assert self._consumer is not None
        try:
            total = 0
            for tp in self._consumer.assignment():
                high = self._consumer.highwater(tp)
                if high is not None:
                    total += max(0, high - await asyncio.wait_for(self._consumer.position(tp), 5))
        except Exception:  # a diagnostic only: never stop the run for it
            return None
        return total

    def raise_if_failed(self) -> None:
        if self._task is not None and self._task.done() and not self._task.cancelled():
            exc = self._task.exception()
            if exc is not None:
                raise RuntimeError(f"reading the output topics failed: {exc!r}") from exc

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._consumer.stop(), 10)


class Lag:
    """The worker group's lag on the signals topic: signals published minus offsets committed.

    This bench is the only producer of its fresh signals topic, so its count of signals
    published is the topic's end (the embedded broker's ListOffsets answer is wrong after
    batched produces, see adapters/kafka/reader.py). Committed offsets are read by a consumer
    that names the worker's group but never subscribes, so it never joins the group (aiokafka's
    admin client cannot decode the embedded broker's OffsetFetch answer; a consumer's can).
    """

    def __init__(self, kafka: KafkaConfig, group: str, topic: str) -> None:
        self.kafka, self.group = kafka, group
        self._consumer: AIOKafkaConsumer | None = None
        self._tps = [TopicPartition(topic, p) for p in range(kafka.partitions)]
        self.failures = 0
        self.error = ""

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(**consumer_kwargs(self.kafka, self.group))
        await self._consumer.start()

    async def __call__(self, published: int) -> int | None:
        if self._consumer is None or self.failures >= 3:
            return None  # not to be had here: skip it rather than slow every sample
        try:
            committed = 0
            for tp in self._tps:
                committed += await asyncio.wait_for(self._consumer.committed(tp), 2.0) or 0
        except Exception as exc:  # lag is optional: note why, carry on without it
            self.failures += 1
            self.error = f"{type(exc).__name__}: {exc}"
            return None
        return published - committed

    async def stop(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._consumer.stop(), 10)


# -- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    """Seconds since the clock started (the first signal published, or the worker ready)."""
    published: int
    terminal: int
    worker_rss: int | None
    venue_rss: int | None
    broker_rss: int | None
    """The embedded broker's (None with an external Kafka): its storage is memory."""
    open_signals: float | None
    forgotten: float | None
    reports_routed: float | None
    """Execution reports the worker's router consumed (and forwards to its decide loop)."""
    reports_decided: float | None
    """Forwarded reports (portfolio-inputs) its decide loop consumed."""
    lag: int | None


@dataclass
class RunLog:
    published: int = 0
    publish_s: float = 0.0
    clock0: float = 0.0
    last_terminal_t: float | None = None
    samples: list[Sample] = field(default_factory=list)
    worker_hwm: int | None = None
    venue_hwm: int | None = None
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    censuses: list[tuple[str, float]] = field(default_factory=list)
    """(label, signals done) of each census asked for, in order."""


class Backpressure:
    def __init__(self, opts: Options, env: BenchEnv, workdir: Path) -> None:
        self.opts, self.env, self.workdir = opts, env, workdir
        self.kafka = env.kafka("backpressure")
        self.topics = Topics(self.kafka.topic_prefix)
        self.seen = Seen()
        self.log = RunLog()
        self.reader = Reader(self.kafka, self.topics, self.seen)
        self.lag = Lag(self.kafka, f"bp-worker-{env.run_id}", self.topics.signals)
        self.census_path = workdir / "census.jsonl"
        self.children: list[Child] = []
        self.worker: Child | None = None
        self.venue: Child | None = None
        self.broker_pid = embedded_broker_pid()
        self.abort = ""

    def stop_all(self) -> None:
        for child in self.children:
            alive = child.alive()  # one that exited by itself is reported as such already
            with contextlib.suppress(Exception):
                code = child.stop()
                if alive:
                    self.log.exit_codes[child.name] = code

    # -- setup ------------------------------------------------------------------------------

    async def setup(self) -> None:
        await ensure_topics(self.kafka, self.topics)
        cfg_path = self.workdir / "backpressure.toml"
        cfg_path.write_text(config_toml(self.opts, self.kafka, self.env.run_id))
        states = [
            (a, account_state(a, p))
            for p in portfolio_names(self.opts)
            for a in account_ids(self.opts, p)
        ]
        await self._publish(self.topics.account_state, states)
        env = {
            **os.environ,
            "ORCH_KAFKA_BOOTSTRAP": self.kafka.bootstrap,
            "ORCH_KAFKA_TOPIC_PREFIX": self.kafka.topic_prefix,
            "ORCH_KAFKA_PROFILE": self.kafka.profile.value,
        }
        cfg = ["--config", str(cfg_path)]
        run, worker_env = [*CLI, "run", *cfg], env
        if self.opts.census:
            run = [sys.executable, "-c", CENSUS_SHIM, "run", *cfg]
            worker_env = {**env, CENSUS_OUT_ENV: str(self.census_path)}
            if self.opts.census == "trace":
                worker_env["PYTHONTRACEMALLOC"] = "1"
        self.venue = Child("venue", [*CLI, "venue", *cfg], env, self.workdir / "venue.log")
        self.worker = Child("worker", run, worker_env, self.workdir / "worker.log")
        self.children = [self.venue, self.worker]
        await self.reader.start()
        await self.lag.start()
        progress(
            f"{len(states)} accounts in {self.opts.portfolios} portfolios; config {cfg_path}; "
            f"topics {self.kafka.topic_prefix}*"
        )

    async def _publish(self, topic: str, items: list[tuple[str, dict[str, Any]]]) -> None:
        producer = AIOKafkaProducer(**producer_kwargs(self.kafka))
        await producer.start()
        try:
            acks = [await producer.send(topic, orjson.dumps(v), key=k.encode()) for k, v in items]
            await asyncio.wait_for(asyncio.gather(*acks), 60)
        finally:
            await asyncio.wait_for(producer.stop(), 30)

    async def start_children(self) -> None:
        for child in self.children:
            child.start()
        for child in self.children:
            took = await child.ready()
            progress(f"{child.name} ready (pid {child.pid}, :{child.port}) in {took:.1f}s")

    # -- load -------------------------------------------------------------------------------

    async def publish_burst(self) -> None:
        """Every signal as fast as the producer goes, keyed by portfolio; waits for the acks."""
        names = portfolio_names(self.opts)
        producer = AIOKafkaProducer(**producer_kwargs(self.kafka))
        await producer.start()
        started = time.monotonic()
        if not self.log.clock0:
            self.log.clock0 = started
        try:
            acks = []
            every = max(1, self.opts.signals // 5)
            for i in range(self.opts.signals):
                portfolio = names[i % len(names)]
                doc = signal_doc(i, portfolio, self.opts.accounts_per_portfolio, _now())
                acks.append(
                    await producer.send(
                        self.topics.signals, orjson.dumps(doc), key=portfolio.encode()
                    )
                )
                self.log.published = i + 1
                if (i + 1) % every == 0:
                    progress(f"publishing: {i + 1:,}/{self.opts.signals:,} handed to the producer")
            await asyncio.wait_for(asyncio.gather(*acks), 300)
        finally:
            await asyncio.wait_for(producer.stop(), 30)
        self.log.publish_s = time.monotonic() - started
        progress(
            f"burst published: {self.opts.signals:,} signals acknowledged in "
            f"{self.log.publish_s:.1f} s ({self.opts.signals / self.log.publish_s:,.0f} signals/s)"
        )

    async def sample(self) -> Sample:
        assert self.worker is not None
        assert self.venue is not None
        t, published, terminal = (
            time.monotonic() - self.log.clock0,
            self.log.published,
            len(self.seen.terminal),
        )
        gauges = await asyncio.to_thread(self.worker.metrics) if self.worker.alive() else {}
        lag = await self.lag(published)
        s = Sample(
            t=t,
            published=published,
            terminal=terminal,
            worker_rss=self.worker.rss(),
            venue_rss=self.venue.rss(),
            broker_rss=rss_bytes(self.broker_pid) if self.broker_pid else None,
            open_signals=gauges.get("open_signals"),
            forgotten=gauges.get("forgotten_signals_total"),
            reports_routed=gauges.get("consumed execution-reports"),
            reports_decided=gauges.get("consumed portfolio-inputs"),
            lag=lag,
        )
        if self.worker.alive():
            self.log.worker_hwm = rss_bytes(self.worker.pid, "VmHWM") or self.log.worker_hwm
        if self.venue.alive():
            self.log.venue_hwm = rss_bytes(self.venue.pid, "VmHWM") or self.log.venue_hwm
        self.log.samples.append(s)
        return s

    async def sampler(self) -> None:
        quarters = [q * self.opts.signals // 4 for q in (1, 2, 3)]
        said = censused = time.monotonic()
        while True:
            s = await self.sample()
            available, total = mem_available()
            if available < MEM_FLOOR * total and not self.abort:
                self.abort = (
                    f"memory guard: the machine has {_mib(available)} of {_mib(total)} "
                    f"available, below {MEM_FLOOR:.0%}; run stopped"
                )
                progress(self.abort)
            while quarters and s.terminal >= quarters[0]:
                await self.census(f"{quarters.pop(0):,} done")
                censused = time.monotonic()
            if time.monotonic() - censused >= CENSUS_EVERY_S:
                await self.census(f"{s.t:.0f} s")
                censused = time.monotonic()
            if time.monotonic() - said >= 10:
                said = time.monotonic()
                behind = await self.reader.behind()
                progress(
                    f"progress: {_status(s, self.opts.signals)}; reader {_count(behind)} behind"
                )
            await asyncio.sleep(self.opts.sample_s)

    async def census(self, label: str, *, collect: bool = False) -> None:
        """Ask the worker for a heap census (and with `collect`, one more after a full gc)."""
        if not self.opts.census or self.worker is None or not self.worker.alive():
            return
        self.log.censuses.append((label, len(self.seen.terminal)))
        if collect:
            self.log.censuses.append(("after full gc", len(self.seen.terminal)))
        os.kill(self.worker.pid, signal.SIGUSR2 if collect else signal.SIGUSR1)
        want = len(self.log.censuses)
        for _ in range(1200):  # the child writes the file: polled, up to two minutes
            if _lines(self.census_path) >= want:
                return
            await asyncio.sleep(0.1)

    async def until_terminal(self) -> None:
        deadline = self.log.clock0 + self.opts.timeout_s
        wanted = self.opts.signals
        while len(self.seen.terminal) < wanted:
            self.reader.raise_if_failed()
            for child in self.children:
                if not child.alive():
                    code = child.proc.returncode if child.proc else None
                    raise RuntimeError(f"{child.name} exited by itself with {code}")
            if self.abort:
                self.log.errors.append(
                    f"{self.abort} with {wanted - len(self.seen.terminal):,} signals not terminal"
                )
                return
            if time.monotonic() > deadline:
                self.log.errors.append(
                    f"timeout: {wanted - len(self.seen.terminal):,} signals not terminal "
                    f"{self.opts.timeout_s:g} s after the clock started"
                )
                return
            await asyncio.sleep(0.05)
        self.log.last_terminal_t = time.monotonic() - self.log.clock0
        progress(f"every signal terminal after {self.log.last_terminal_t:.1f} s")

    async def run(self) -> None:
        await self.setup()
        if self.opts.backlog:
            await self.publish_burst()
        await self.start_children()
        if self.opts.backlog:
            self.log.clock0 = time.monotonic()  # the worker's clock starts when it is ready
        await self.census("ready")
        sampler = asyncio.create_task(self.sampler())
        try:
            if not self.opts.backlog:
                self.log.clock0 = time.monotonic()
                await self.publish_burst()
            await self.until_terminal()
            # Finished signals leave memory `finished_linger_s` after they finish (checked once a
            # second): the end figure is what the worker keeps once the burst is over. Any intent
            # released twice would also have arrived by then.
            settle = self.opts.linger_s + 2 * FORGET_EVERY_S + 1.0
            progress(f"waiting {settle:g} s for finished signals to leave the worker's memory")
            await asyncio.sleep(settle)
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        await self.sample()
        if self.opts.census:
            await self.census("end", collect=True)
            await asyncio.sleep(1.0)
            after = await self.sample()
            progress(f"after a full collection in the worker: RSS {_mib(after.worker_rss)}")

    async def close(self) -> None:
        await asyncio.to_thread(self.stop_all)
        await self.reader.stop()
        await self.lag.stop()


def _lines(path: Path) -> int:
    try:
        return len(path.read_bytes().splitlines())
    except OSError:
        return 0


def _status(s: Sample, n: int) -> str:
    parts = [f"{s.published:,}/{n:,} published", f"{s.terminal:,} terminal"]
    if s.open_signals is not None:
        parts.append(f"{s.open_signals:,.0f} open in the worker")
    if s.lag is not None:
        parts.append(f"lag {s.lag:,}")
    if s.reports_routed is not None:
        parts.append(
            f"reports routed {s.reports_routed:,.0f} / decided {_count(s.reports_decided)}"
        )
    parts.append(f"worker RSS {_mib(s.worker_rss)}")
    if s.broker_rss is not None:
        parts.append(f"broker RSS {_mib(s.broker_rss)}")
    return ", ".join(parts)


# -- the figures ------------------------------------------------------------------------------


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / MIB:,.1f} MiB"


def _count(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def growth_per_10k(samples: Sequence[Sample], lo: int, hi: int) -> float | None:
    """Least-squares slope of worker RSS against signals done, for lo <= done <= hi, in bytes per
    10,000 signals (None with too few distinct points)."""
    pts = [
        (s.terminal, s.worker_rss)
        for s in samples
        if lo <= s.terminal <= hi and s.worker_rss is not None
    ]
    if len({d for d, _ in pts}) < 3:
        return None
    x = np.array([d for d, _ in pts], dtype=float)
    y = np.array([r for _, r in pts], dtype=float)
    slope = float(np.polyfit(x, y, 1)[0])
    return slope * 10_000


def _per_10k(b: float | None) -> str:
    return "n/a" if b is None else f"{b / MIB:+,.2f} MiB per 10,000 signals"


def _mib_col(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MIB:,.1f}"


def over_time(samples: Sequence[Sample]) -> list[list[str]]:
    """TABLE_ROWS samples evenly spaced in time, from the clock's start to the last sample."""
    if not samples:
        return []
    end_t = samples[-1].t
    picked: list[Sample] = []
    for k in range(TABLE_ROWS):
        target = end_t * k / (TABLE_ROWS - 1)
        s = min(samples, key=lambda x: abs(x.t - target))
        if s not in picked:
            picked.append(s)
    return [
        [
            f"{s.t:,.1f}",
            f"{s.published:,}",
            f"{s.terminal:,}",
            _count(s.open_signals),
            _count(s.lag),
            _mib_col(s.worker_rss),
            _mib_col(s.venue_rss),
            _mib_col(s.broker_rss),
        ]
        for s in picked
    ]


def figures(rows: Sequence[tuple[str, str]]) -> str:
    """Named figures, one a line, the values lined up (they are sentences, not columns)."""
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@dataclass(frozen=True, slots=True)
class Verdict:
    missing: int
    not_completed: int
    """The venue fills everything here: another end means the worker lost track of an order
    (an acknowledgement timeout while its reports waited behind the burst, say)."""
    duplicates: int
    dead_letters: int
    """Other than late answers to cancels (`Seen.late_cancel_answers`)."""
    errors: list[str]

    @property
    def ok(self) -> bool:
        bad = (self.missing, self.not_completed, self.duplicates, self.dead_letters)
        return not (any(bad) or self.errors)


def _reports(samples: Sequence[Sample]) -> str:
    """The worker's last known counts of execution reports through its router and decide loop
    (reports sent to the decide loop but not yet decided wait in portfolio-inputs)."""
    last = next((s for s in reversed(samples) if s.reports_routed is not None), None)
    if last is None:
        return "n/a"
    return (
        f"{last.reports_routed:,.0f} / {_count(last.reports_decided)} "
        f"(at {last.t:,.1f} s; the venue sends two per filled order here)"
    )


def _per_open(start: Sample, peak: Sample) -> str:
    if not peak.open_signals or start.worker_rss is None or peak.worker_rss is None:
        return "n/a"
    per = (peak.worker_rss - start.worker_rss) / peak.open_signals
    return f"{per / 1024:,.1f} KiB (RSS above start / {peak.open_signals:,.0f} open)"


def _start_peak_end(values: Sequence[int | None]) -> str:
    known = [v for v in values if v is not None]
    return " / ".join(_mib(x) for x in (known[0], max(known), known[-1])) if known else "n/a"


def memory_rows(b: Backpressure) -> list[tuple[str, str]]:
    opts, log, n = b.opts, b.log, b.opts.signals
    rss = [s for s in log.samples if s.worker_rss is not None]
    if not rss:
        return [("worker RSS", "n/a (no sample)")]
    start, end = rss[0], rss[-1]
    peak = max(rss, key=lambda s: s.worker_rss or 0)
    settle = opts.linger_s + 2 * FORGET_EVERY_S + 1.0
    after = (
        f"{settle:g} s after the last result"
        if log.last_terminal_t is not None
        else "when the run ended"
    )
    open_peak = max((s.open_signals for s in rss if s.open_signals is not None), default=None)
    lag_peak = max((s.lag for s in rss if s.lag is not None), default=None)
    return [
        ("worker RSS at start", f"{_mib(start.worker_rss)} (idle, ready)"),
        (
            "worker RSS peak",
            f"{_mib(peak.worker_rss)} at {peak.t:,.1f} s, {peak.terminal:,} signals done "
            f"(kernel high-water mark VmHWM {_mib(log.worker_hwm)})",
        ),
        ("worker RSS at end", f"{_mib(end.worker_rss)} ({after})"),
        (
            "RSS growth, 2nd half of the signals",
            f"{_per_10k(growth_per_10k(rss, n // 2, n))} (least squares, RSS vs signals done)",
        ),
        ("RSS growth, 1st half of the signals", _per_10k(growth_per_10k(rss, 0, n // 2))),
        ("open signals in the worker, peak", _count(open_peak)),
        ("RSS per open signal at the peak", _per_open(start, peak)),
        (
            "worker lag on signals, peak",
            _count(lag_peak) if lag_peak is not None else f"n/a ({b.lag.error or 'no sample'})",
        ),
        ("reports routed / decided, last seen", _reports(rss)),
        ("venue RSS start / peak / end", _start_peak_end([s.venue_rss for s in rss])),
        ("broker RSS start / peak / end", _start_peak_end([s.broker_rss for s in rss])),
    ]


def summarize(b: Backpressure) -> tuple[Verdict, str]:
    opts, log, seen = b.opts, b.log, b.seen
    n = opts.signals
    missing = [f"bp-{i:06d}" for i in range(n) if f"bp-{i:06d}" not in seen.terminal]
    duplicates = sum(c - 1 for c in seen.intents.values() if c > 1)
    statuses = Counter(seen.terminal.values())
    not_completed = sum(n for status, n in statuses.items() if status != "completed")
    late = seen.late_cancel_answers()
    done_t = log.last_terminal_t
    publish = (
        f"{log.publish_s:,.1f} s ({log.published / log.publish_s:,.0f} signals/s)"
        if log.publish_s
        else "n/a"
    )
    rows = [
        ("signals published", f"{log.published:,}, acknowledged in {publish}"),
        ("terminal results seen", f"{len(seen.terminal):,} ({seen.result_records:,} records)"),
        ("  by status", ", ".join(f"{k} {v:,}" for k, v in sorted(statuses.items())) or "-"),
        ("signals missing (must be 0)", f"{len(missing):,}"),
        ("terminal but not completed (must be 0)", f"{not_completed:,}"),
        (
            "intents on order-intents",
            f"{sum(seen.intents.values()):,} ("
            + ", ".join(f"{k} {v:,}" for k, v in sorted(seen.intent_kinds.items()))
            + ")",
        ),
        ("duplicate intent ids (must be 0)", f"{duplicates:,}"),
        (
            "interventions opened",
            ", ".join(f"{k} {v:,}" for k, v in sorted(seen.interventions.items())) or "0",
        ),
        (
            "dead-lettered records",
            f"{len(seen.dead_letters):,}: {late:,} late answers to cancels of finished signals, "
            f"{len(seen.dead_letters) - late:,} other (must be 0)",
        ),
        *memory_rows(b),
        (
            "throughput",
            f"{n / done_t:,.1f} signals/s ({n:,} terminal in {done_t:,.1f} s)"
            if done_t
            else "n/a (timeout)",
        ),
    ]
    out = [
        "",
        f"backpressure: {n:,} signals, {opts.portfolios} portfolios x "
        f"{opts.accounts_per_portfolio} accounts, "
        + ("published before the worker started" if opts.backlog else "burst at a running worker")
        + f", finished_linger_s {opts.linger_s:g}",
        "",
        figures(rows),
        "",
        "memory against signals done (t from "
        + ("the worker ready" if opts.backlog else "the first signal published")
        + ", RSS in MiB)",
        table(
            ["t s", "published", "terminal", "open", "lag", "worker", "venue", "broker"],
            over_time(log.samples),
        ),
    ]
    if missing:
        out += [
            "",
            "missing (first 10): "
            + ", ".join(
                f"{sid} ({seen.last_status.get(sid, 'no result')})" for sid in missing[:10]
            ),
        ]
    if opts.census:
        out += ["", *census_report(b.census_path, log.censuses)]
    errors = [*log.errors]
    errors += [f"{k} exited with {c} on SIGTERM" for k, c in log.exit_codes.items() if c]
    out += [f"ERROR {e}" for e in errors]
    out.append(f"workdir: {b.workdir}")
    verdict = Verdict(
        len(missing), not_completed, duplicates, len(seen.dead_letters) - late, errors
    )
    out.append("BACKPRESSURE PASSED" if verdict.ok else "BACKPRESSURE FAILED")
    return verdict, "\n".join(out)


def census_report(path: Path, asked: Sequence[tuple[str, float]]) -> list[str]:
    """What grew between the first census and the last: structures, types, allocation sites."""
    try:
        lines = [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]
    except OSError:
        return ["census: none written"]
    errors = [c["error"] for c in lines if "error" in c]
    lines = [c for c in lines if "error" not in c]
    if errors:
        return [f"census failed in the worker: {errors[0]}"]
    if len(lines) < 2:
        return [f"census: {len(lines)} written, need 2"]
    labels = [label for label, _ in asked][: len(lines)]
    first, end = lines[0], lines[-2] if "freed" in lines[-1] else lines[-1]

    def grown(part: str) -> list[str]:
        keys = set().union(*(c[part] for c in lines))
        return sorted(keys, key=lambda k: -(end[part].get(k, 0) - first[part].get(k, 0)))

    rows = [[k, *(f"{c['structures'].get(k, 0):,}" for c in lines)] for k in grown("structures")]
    trows = [
        [k.removeprefix("builtins."), *(f"{c['types'].get(k, 0):,}" for c in lines)]
        for k in grown("bytes")[:15]
    ]
    brows = [
        [k.removeprefix("builtins."), *(_mib(c["bytes"].get(k, 0)) for c in lines)]
        for k in grown("bytes")[:10]
    ]
    blocks = ["allocated blocks (all objects)", *(f"{c['blocks']:,}" for c in lines)]
    took = ", ".join(f"{c['took_s']:.1f}" for c in lines)
    out = [
        f"heap census of the worker ({OBJECTS_ENV}; each stalled it for {took} s)",
        table(["container in the Worker (len)", *labels], rows[:15]),
        "",
        table(["gc-tracked objects (count)", *labels], [blocks, *trows]),
        "",
        table(["gc-tracked objects (shallow size)", *labels], brows),
    ]
    if "freed" in lines[-1]:
        out.append(f"a full collection at the end freed {lines[-1]['freed']:,} objects")
    if end.get("traced"):
        out += ["", "tracemalloc at the end: live memory by allocation site (top 15)"]
        out += [
            f"  {_mib(size):>12} {count:>10,}  {site}" for site, size, count in end["traced"][:15]
        ]
    return out


# -- entry points -----------------------------------------------------------------------------


async def run_backpressure(opts: Options) -> tuple[bool, str]:
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="orch-backpressure-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with broker() as env:
        bp = Backpressure(opts, env, workdir)
        atexit.register(bp.stop_all)
        try:
            await bp.run()
        except Exception as exc:
            bp.log.errors.append(f"{type(exc).__name__}: {exc}")
            progress(f"ERROR {type(exc).__name__}: {exc}")
        finally:
            await bp.close()
            atexit.unregister(bp.stop_all)
        verdict, summary = summarize(bp)
    if verdict.ok and opts.workdir is None and not opts.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return verdict.ok, summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.backpressure",
        description="A burst of signals at a worker process: its memory over time and the counts.",
        epilog=f"Set {OBJECTS_ENV}=1 (or =trace, with tracemalloc) for heap censuses of the "
        "worker when debugging its memory growth.",
    )
    d = Options()
    parser.add_argument("--signals", type=int, default=d.signals, help="signals in the burst")
    parser.add_argument(
        "--quick", action="store_true", help=f"a smoke run of {QUICK_SIGNALS:,} signals"
    )
    parser.add_argument("--portfolios", type=int, default=d.portfolios)
    parser.add_argument(
        "--accounts", type=int, default=d.accounts_per_portfolio, help="accounts per portfolio"
    )
    parser.add_argument(
        "--timeout", type=float, default=d.timeout_s, help="seconds for every signal to end"
    )
    parser.add_argument(
        "--linger", type=float, default=d.linger_s, help="worker.finished_linger_s, seconds"
    )
    parser.add_argument("--sample", type=float, default=d.sample_s, help="sampling period, s")
    parser.add_argument(
        "--backlog", action="store_true", help="publish the burst before the worker starts"
    )
    parser.add_argument("--workdir", type=Path, help="keep config and logs here")
    parser.add_argument("--keep", action="store_true", help="keep the temp workdir on success")
    a = parser.parse_args(argv)
    signals = QUICK_SIGNALS if a.quick else a.signals
    if signals < 1 or a.portfolios < 1 or a.accounts < 1 or a.timeout <= 0 or a.sample <= 0:
        parser.error("need signals, portfolios, accounts >= 1 and timeout, sample > 0")
    opts = Options(
        signals=signals,
        portfolios=a.portfolios,
        accounts_per_portfolio=a.accounts,
        timeout_s=a.timeout,
        linger_s=a.linger,
        sample_s=a.sample,
        backlog=a.backlog,
        workdir=a.workdir,
        keep=a.keep,
        census="" if os.environ.get(OBJECTS_ENV, "0") in ("", "0") else os.environ[OBJECTS_ENV],
    )
    try:
        ok, summary = asyncio.run(run_backpressure(opts))
    except KeyboardInterrupt:
        print("interrupted; child processes stopped", file=sys.stderr)
        return 130
    print(summary, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
