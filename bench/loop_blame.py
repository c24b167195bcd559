"""Which event-loop steps held late releases back: the scheduling bench's worker, traced.

`python -m bench.loop_blame` runs the worker phase of `bench.scheduling` (default 1-30 s
window, no baseline) with every asyncio callback timed. For each release decided more than
`LATE_MS` after its time, it names the first step longer than `STEP_MS` that was running
between the two, labelled by the task's coroutine chain (outermost, then the two innermost,
as it stood when the step ended). A step that got less than 60% of a CPU for its length is
marked PREEMPTED: the process was not scheduled (other processes, steal), not busy.

This is a diagnostic, not a benchmark: timing every callback costs the loop itself, so its
percentiles run higher than `make bench` prints. Read the tables for where to cut, and measure
a cut with `make bench` (several runs, alternating: single runs here vary by 2x).
"""

from __future__ import annotations

import asyncio
import asyncio.events
import bisect
import collections
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench import broker, table
from bench.scheduling import WINDOWS, bench_worker

LATE_MS = 5.0
"""A release later than this (the issue's p99 target) is looked into."""
STEP_MS = 1.5
"""Steps shorter than this are not recorded."""
SHOWN = 12


def _label(handle: asyncio.Handle) -> str:
    callback: Any = handle._callback  # type: ignore[attr-defined]  # asyncio internals
    task = getattr(callback, "__self__", None)
    if task is None or not hasattr(task, "get_coro"):
        return str(getattr(callback, "__qualname__", None) or type(callback).__name__)
    names: list[str] = []
    coro = task.get_coro()
    while coro is not None and len(names) < 8:
        names.append(str(getattr(coro, "__qualname__", type(coro).__name__)))
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    shown = names if len(names) <= 3 else [names[0], *names[-2:]]
    return "task " + " > ".join(shown)


class Tracer:
    """Records every loop step longer than STEP_MS: (wall start, seconds, label)."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, float, str]] = []
        self._run: Callable[[asyncio.Handle], None] | None = None

    def __enter__(self) -> Tracer:
        run = asyncio.events.Handle._run
        self._run = run
        steps = self.steps

        def traced(handle: asyncio.Handle) -> None:
            wall, began, cpu = time.time(), time.perf_counter(), time.thread_time()
            try:
                run(handle)
            finally:
                took = time.perf_counter() - began
                if took * 1000 > STEP_MS:
                    label = _label(handle)
                    if time.thread_time() - cpu < 0.6 * took:
                        label = "PREEMPTED " + label
                    steps.append((wall, took, label))

        asyncio.events.Handle._run = traced  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._run is not None:
            asyncio.events.Handle._run = self._run  # type: ignore[method-assign,assignment]


def blame(
    released: list[tuple[float, float]], steps: list[tuple[float, float, str]]
) -> tuple[collections.Counter[str], int]:
    """First long step running between each late release's time and its decision."""
    steps = sorted(steps)
    starts = [s[0] for s in steps]
    first: collections.Counter[str] = collections.Counter()
    late = 0
    for scheduled, decided in released:
        if (decided - scheduled) * 1000 <= LATE_MS:
            continue
        late += 1
        i = max(0, bisect.bisect_left(starts, scheduled) - 1)
        label = "(no step over STEP_MS: many short ones)"
        while i < len(steps) and steps[i][0] < decided:
            began, took, name = steps[i]
            if began + took > scheduled:
                label = name
                break
            i += 1
        first[label] += 1
    return first, late


async def run() -> None:
    with broker() as env, Tracer() as tracer:
        phase = await bench_worker(env, WINDOWS[0])
    errors = np.array([(d - s) * 1000 for s, d in phase.released])
    p50, p99, top = np.percentile(errors, [50, 99, 100])
    first, late = blame(phase.released, tracer.steps)
    print(
        f"\n{len(errors):,} releases: p50 {p50:.2f}, p99 {p99:.2f}, max {top:.2f} ms (traced); "
        f"{late:,} later than {LATE_MS:g} ms\n"
    )
    rows = [[name, f"{n:,}", f"{100 * n / max(late, 1):.0f}%"] for name, n in first.most_common()]
    print(table(["first long step in the way", "late releases", "share"], rows[:SHOWN]))
    by_label: dict[str, list[float]] = collections.defaultdict(list)
    for _, took, name in tracer.steps:
        by_label[name].append(took * 1000)
    heavy = sorted(by_label.items(), key=lambda kv: -sum(kv[1]))[:SHOWN]
    rows = [
        [name, f"{len(t):,}", f"{sum(t):,.0f}", f"{np.median(t):.2f}", f"{max(t):.2f}"]
        for name, t in heavy
    ]
    print()
    print(table(["loop step", f"steps > {STEP_MS:g} ms", "total ms", "p50 ms", "max ms"], rows))


if __name__ == "__main__":
    asyncio.run(run())
