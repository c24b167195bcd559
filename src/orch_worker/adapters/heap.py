"""Keeping the garbage collector's pauses out of release timing.

The worker's state is many small long-lived objects (signal states, intents, audit drafts)
and almost no cyclic garbage: in the scheduling benchmark the collector found about 1,300
unreachable objects in 10,000 releases, yet its full collections stopped the event loop for
up to 400 ms each, which is 400 ms of lateness for every release due meanwhile.

So the heap is frozen after every decision (`gc.freeze` moves everything alive into a
generation the collector never scans, in constant time): a collection then only walks what
was allocated since, and takes microseconds. Acyclic garbage is still freed at once by
reference counting, frozen or not. What freezing keeps is cyclic garbage that became
unreachable after it was frozen (exception tracebacks, mostly), so a full collection of
everything still runs every `full_every_s`, at a quiet moment when the caller knows nothing
is due soon, or regardless once `full_every_s` has passed twice.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

YOUNG_THRESHOLD = 10_000
"""Allocations between young collections (CPython's default is 700): fewer, still short."""


class HeapPolicy:
    def __init__(
        self,
        *,
        full_every_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        observe: Callable[[float], None] | None = None,
    ) -> None:
        self.full_every_s = full_every_s
        self._clock = clock
        self._observe = observe
        self._last_full = clock()
        self.full_collections = 0

    def install(self) -> None:
        """Raise the young threshold and freeze what start-up built."""
        _, g1, g2 = gc.get_threshold()
        gc.set_threshold(YOUNG_THRESHOLD, g1, g2)
        gc.freeze()

    def settle(self, *, quiet: bool) -> None:
        """After a decision: freeze what it left alive; collect fully when it is time.

        `quiet` says nothing is due for a while, so a full collection's pause costs no one.
        """
        since = self._clock() - self._last_full
        if since >= 2 * self.full_every_s or (quiet and since >= self.full_every_s):
            self.collect_all()
        gc.freeze()

    @staticmethod
    def freeze() -> None:
        """Freeze what is alive now, between two slices of work: a young collection then walks
        only what the last few milliseconds allocated, not what a whole batch of decisions (or
        a snapshot) left behind, which took a generation-1 collection over 10 ms."""
        gc.freeze()

    def collect_all(self) -> int:
        """A full collection of everything, frozen or not; returns what it freed."""
        started = self._clock()
        gc.unfreeze()
        freed = gc.collect()
        gc.freeze()
        took = self._clock() - started
        self._last_full = self._clock()
        self.full_collections += 1
        if self._observe is not None:
            self._observe(took)
        log.info("full garbage collection: %d objects freed in %.0f ms", freed, took * 1000)
        return freed

    @staticmethod
    def uninstall() -> None:
        gc.unfreeze()
        gc.set_threshold(700, 10, 10)
