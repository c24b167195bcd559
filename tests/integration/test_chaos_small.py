"""A small run of the chaos harness (`bench/chaos.py`, `make chaos`) inside the test suite.

Real processes on a real Kafka-protocol broker of its own (the harness pauses it, so it never
touches the session's broker): a worker, the paper venue with partial fills and every reject
reason, and the audit sink; 60 signals, 3 SIGKILLs of the worker with restarts, one broker
SIGSTOP/SIGCONT. Every invariant the harness checks must hold: every signal terminal, every
planned intent released exactly once at the venue, no account filled beyond its plans or its
margin, the audit chain verifies and the sink holds every event once.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from bench.chaos import ChaosOptions, run_chaos

pytestmark = pytest.mark.integration


async def test_small_chaos_run_keeps_every_invariant(tmp_path: Path) -> None:
    started = time.monotonic()
    opts = ChaosOptions(
        signals=60,
        kills=3,
        pauses=1,
        pause_s=3.0,
        seed=11,
        rate=10.0,
        timeout_s=60.0,
        workdir=tmp_path / "chaos",
    )
    outcome = await run_chaos(opts)
    print(outcome.summary)
    assert outcome.ok, outcome.summary
    for line in ("CHAOS PASSED", "ok   workers SIGKILLed and restarted ready", "3/3"):
        assert line in outcome.summary
    assert time.monotonic() - started < 90, "the small chaos run should take well under 60 s"
