"""Bounded waits for the tests' stop paths: a stop that hangs fails its test, never holds the run.

`asyncio.wait_for` alone is no bound on Python 3.11: once its timeout passes it cancels the
awaited task and then waits, without limit, for that task to finish, so a stop that swallows or
outlives the cancel (a client flushing to a broker that no longer answers) still hangs. A
process that ignores SIGTERM must be killed, not left running after the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from orch_worker.adapters.kafka.worker_app import Worker
from orch_worker.domain.config import OrchConfig

T = TypeVar("T")

START_S = 60.0
"""How long an in-process worker may take to start (topics, tables, the group join)."""
STOP_S = 15.0
"""How long a client, the venue or the sink may take to stop."""
WORKER_STOP_S = 30.0
"""How long an in-process worker may take to stop (10 s graceful timeout, then a drain)."""
CANCEL_GRACE_S = 5.0
"""After a timeout: how long what was cancelled may take to unwind before it is abandoned."""


async def within(aw: Awaitable[T], timeout_s: float, what: str) -> T:
    """Await `aw` for at most `timeout_s`; past that cancel it and raise TimeoutError.

    What was cancelled gets `CANCEL_GRACE_S` to unwind and is then abandoned (the event loop's
    own teardown cancels it again), so the caller never waits longer than both together.
    """
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if done:
        return task.result()
    task.cancel()
    await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
    cause = task.exception() if task.done() and not task.cancelled() else None
    left = "" if task.done() else f"; still running {CANCEL_GRACE_S:g}s after its cancel"
    raise TimeoutError(f"{what} did not finish within {timeout_s:g}s{left}") from cause


def stop_processes(*procs: subprocess.Popen[bytes], timeout_s: float = STOP_S) -> None:
    """SIGTERM every process still running; SIGKILL those not gone after `timeout_s`.

    Raises once all are gone if any had to be killed, as the plain `wait` it replaces did.
    """
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.terminate()
    deadline = time.monotonic() + timeout_s
    killed = []
    for p in running:
        try:
            p.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
            killed.append(p.pid)
    if killed:
        raise TimeoutError(f"processes {killed} ignored SIGTERM for {timeout_s:g}s: killed")


@contextlib.asynccontextmanager
async def worker_running(
    cfg: OrchConfig, clock: Callable[[], datetime] | None = None
) -> AsyncIterator[Worker]:
    """An in-process worker, ready, whose start and stop are both bounded."""
    worker = Worker(cfg, http=False, **({"clock": clock} if clock else {}))
    try:
        await within(worker.app.start(), START_S, "the worker's start")
        await worker.wait_ready()
        yield worker
    finally:
        await within(worker.app.stop(), WORKER_STOP_S, "the worker's stop")
