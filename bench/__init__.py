"""Benchmarks (`make bench`, `python -m bench [NAME ...]`): figures and ratios, never pass/fail.

Why ratios: absolute latencies depend on the machine and the broker, so every benchmark also
measures a bare aiokafka consume→produce pass-through on the same broker in the same run and
prints the worker's figures next to it with the ratio. A ratio that drifts is a regression
whatever machine it ran on; a timed unit test would only be flaky.

This package holds what every benchmark shares: the broker (embedded Tansu, or the Kafka named
by `ORCH_BENCH_KAFKA_BOOTSTRAP`), fresh topic prefixes per run, progress lines and statistics.
A benchmark is a module with `TITLE` and `run(env: BenchEnv)` (or `run()` when it needs no
broker; plain or async), listed in `bench.__main__.BENCHES`.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from orch_worker.adapters.kafka.embedded import EmbeddedBroker
from orch_worker.domain.config import KafkaConfig, KafkaProfile
from orch_worker.domain.models import AccountState

BOOTSTRAP_ENV = "ORCH_BENCH_KAFKA_BOOTSTRAP"
"""host:port of a running Kafka to measure instead of starting the embedded broker."""

PROFILE_ENV = "ORCH_BENCH_KAFKA_PROFILE"
"""`kafka` (default with ORCH_BENCH_KAFKA_BOOTSTRAP) or `embedded` for an external Tansu."""

_STARTED = time.monotonic()


def progress(message: str) -> None:
    """A timestamped line, flushed at once, so a user sees the run moving (and where time goes)."""
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {message}", flush=True)


@dataclass(frozen=True, slots=True)
class BenchEnv:
    """Where the benchmarks run; `kafka()` hands out a fresh topic prefix each call."""

    bootstrap: str
    profile: KafkaProfile
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def kafka(self, name: str, partitions: int = 3) -> KafkaConfig:
        """Fresh topics: Tansu slows down as batches pile up in a partition, so never reuse."""
        return KafkaConfig(
            bootstrap=self.bootstrap,
            topic_prefix=f"bench-{self.run_id}-{name}-{uuid.uuid4().hex[:6]}.",
            profile=self.profile,
            partitions=partitions,
        )


def paper_account(
    account_id: str, portfolio: str, at: datetime, money: str = "1000000"
) -> AccountState:
    """A flat paper account with `money` of margin: no rule of the planner binds on it, so
    the benchmarks measure the machinery, not exclusions."""
    return AccountState.model_validate(
        {
            "account_id": account_id,
            "portfolio": portfolio,
            "broker": "paper",
            "status": "active",
            "currency": "USD",
            "balance": money,
            "equity": money,
            "margin_used": "0",
            "margin_available": money,
            "day_start_equity": money,
            "peak_equity": money,
            "positions": [],
            "updated_at": at,
        }
    )


@contextmanager
def broker() -> Iterator[BenchEnv]:
    """The embedded broker for this run (stopped at exit), or the Kafka named in the env."""
    external = os.environ.get(BOOTSTRAP_ENV)
    if external:
        profile = KafkaProfile(os.environ.get(PROFILE_ENV, KafkaProfile.KAFKA.value))
        progress(f"using Kafka at {external} (profile {profile.value}) from ${BOOTSTRAP_ENV}")
        yield BenchEnv(external, profile)
        return
    log = Path(tempfile.mkdtemp(prefix="orch-bench-")) / "tansu.log"
    embedded = EmbeddedBroker(log_path=log)
    bootstrap = embedded.start()
    progress(f"embedded broker (Tansu) on {bootstrap}, pid {embedded.pid}, log {log}")
    try:
        yield BenchEnv(bootstrap, KafkaProfile.EMBEDDED)
    finally:
        embedded.stop()
        progress("embedded broker stopped")


@dataclass(frozen=True, slots=True)
class Latency:
    """Percentiles of a latency sample, in milliseconds."""

    p50: float
    p99: float
    max: float
    n: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        if not seconds:
            raise ValueError("no latency samples")
        ms = np.asarray(seconds, dtype=float) * 1000.0
        return cls(
            p50=float(np.percentile(ms, 50)),
            p99=float(np.percentile(ms, 99)),
            max=float(ms.max()),
            n=len(ms),
        )


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table: first column left-aligned, the figures right-aligned."""
    widths = [max(len(str(r[i])) for r in (headers, *rows)) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])
