"""Large produce requests are built off the event loop.

aiokafka builds each produce request (every batch's records encoded and compressed) inside its
sender task, on the event loop. After a burst of decisions that made steps of 2 to 8 ms on the
worker's loop, and a release timer falling due meanwhile waited for them: in a traced run of the
scheduling bench they were the first thing in the way of a quarter of the late releases. The
compression (cramjam) lets go of the GIL, so a request of large batches has them built in a
thread of their own first; aiokafka's request then finds each batch built and only frames them.

A small request is built on the loop as before: handing it to a thread and back costs more than
building it. Nothing else changes: the same batches, in the same request, built by aiokafka's own
code; one that fails to build in the thread is built (and fails) again in aiokafka's request, so
its error reaches the sender as it would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

OFF_LOOP_BYTES = 64 * 1024
"""Uncompressed bytes in a request from which its batches are built in the thread."""


def build_off_loop(producer: Any, min_bytes: int = OFF_LOOP_BYTES) -> bool:
    """Have `producer` (an `AIOKafkaProducer`) build large requests in a thread; False if its
    internals are not the ones this relies on (it then builds on the loop, as before).

    Wraps whatever `_send_produce_req` is installed at the time, the lease fence included, so
    that the fence's checks still run right before the write, after the thread's work.
    """
    sender = getattr(producer, "_sender", None)
    send = getattr(sender, "_send_produce_req", None)
    if send is None:
        log.warning("cannot build produce requests off the loop (aiokafka changed?)")
        return False
    if getattr(send, "builds_off_loop", False):
        return True
    builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orch-produce-build")

    async def send_produce_req(node_id: int, batches: dict[Any, Any]) -> None:
        ready = list(batches.values())
        if _size(ready) >= min_bytes:
            # RuntimeError: the executor is shut down (the process is exiting).
            with contextlib.suppress(RuntimeError):
                await asyncio.get_running_loop().run_in_executor(builder, _build, ready)
        await send(node_id, batches)

    send_produce_req.builds_off_loop = True  # type: ignore[attr-defined]
    sender._send_produce_req = send_produce_req  # type: ignore[union-attr]
    return True


def _size(batches: list[Any]) -> int:
    """Bytes of the batches as built so far (uncompressed); 0 if aiokafka's batches changed
    shape, so that the request is built on the loop rather than the sender task failing."""
    try:
        return sum(int(b._builder.size()) for b in batches)
    except (AttributeError, TypeError):
        return 0


def _build(batches: list[Any]) -> None:
    for batch in batches:
        # Built once, then reused by aiokafka's request; one that fails here is built (and
        # fails) again there, which reports it.
        with contextlib.suppress(Exception):
            batch.get_data_buffer()
