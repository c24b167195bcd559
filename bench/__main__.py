"""`python -m bench [NAME ...]`: run the named benchmarks (all of them by default).

A benchmark module has `TITLE` and `run`, which is `run(env: BenchEnv)` when it needs Kafka or
`run()` when it measures the pure core, either plain or `async`. One broker serves the whole
run and is started only if a selected benchmark takes `env`; each benchmark gets fresh topics
and its own event loop, so one benchmark's leftovers cannot slow the next one down.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from types import ModuleType
from typing import Any

from bench import BenchEnv, broker, progress

BENCHES: dict[str, str] = {
    "latency": "bench.latency",
    "planning": "bench.planning",
    "sink": "bench.sink",
    "scheduling": "bench.scheduling",
}
"""Benchmark name -> module, in running order; add new benchmarks here."""


def _needs_env(module: ModuleType) -> bool:
    return bool(inspect.signature(module.run).parameters)


def _run(module: ModuleType, env: BenchEnv | None) -> None:
    run: Callable[..., Any] = module.run
    result = run(env) if env is not None else run()
    if inspect.isawaitable(result):
        asyncio.run(_wait(result))


async def _wait(result: Awaitable[Any]) -> None:
    await result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks against a bare aiokafka pass-through measured in the same run.",
        epilog=f"Benchmarks: {', '.join(BENCHES)}. Set ORCH_BENCH_KAFKA_BOOTSTRAP to use a "
        "running Kafka instead of the embedded broker.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default all)")
    args = parser.parse_args(argv)
    names: list[str] = args.names or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHES)}")
    modules = {name: importlib.import_module(BENCHES[name]) for name in names}
    with ExitStack() as stack:
        env = None
        if any(_needs_env(m) for m in modules.values()):
            env = stack.enter_context(broker())
        for name, module in modules.items():
            progress(f"== {name}: {getattr(module, 'TITLE', name)}")
            _run(module, env if _needs_env(module) else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
