"""The heap policy freezes after decisions and collects everything only when it is time."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from orch_worker.adapters.heap import YOUNG_THRESHOLD, HeapPolicy


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clean_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def _cycle() -> None:
    a: list[object] = []
    a.append(a)  # unreachable once this returns: only a full collection frees it


@pytest.mark.usefixtures("clean_gc")
def test_install_raises_the_young_threshold_and_freezes() -> None:
    HeapPolicy().install()
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    assert gc.get_freeze_count() > 0


@pytest.mark.usefixtures("clean_gc")
def test_settle_freezes_and_collects_fully_only_when_due() -> None:
    clock, pauses = Clock(), []
    heap = HeapPolicy(full_every_s=10, clock=clock, observe=pauses.append)
    heap.install()

    frozen = gc.get_freeze_count()
    _cycle()
    heap.settle(quiet=True)  # not due yet: frozen, nothing collected
    assert heap.full_collections == 0
    assert gc.get_freeze_count() > frozen

    clock.t = 11
    heap.settle(quiet=False)  # due, but something is about to happen: wait
    assert heap.full_collections == 0
    heap.settle(quiet=True)  # due and quiet: collect everything
    assert heap.full_collections == 1
    assert len(pauses) == 1

    clock.t = 11 + 21
    heap.settle(quiet=False)  # overdue twice over: collect even when busy
    assert heap.full_collections == 2


@pytest.mark.usefixtures("clean_gc")
def test_a_full_collection_frees_cycles_that_were_frozen() -> None:
    heap = HeapPolicy()
    heap.install()
    for _ in range(100):
        _cycle()
    gc.freeze()  # the cycles are now invisible to ordinary collections
    assert gc.collect() == 0
    assert heap.collect_all() >= 100
    assert gc.get_freeze_count() > 0  # and everything alive is frozen again


@pytest.mark.usefixtures("clean_gc")
def test_between_slices_a_young_collection_finds_nothing_left_by_the_last_slice() -> None:
    heap = HeapPolicy()
    heap.install()
    kept = [[n] for n in range(5_000)]  # what a slice of decisions leaves alive
    before = gc.get_freeze_count()
    heap.freeze()
    assert gc.get_freeze_count() >= before + len(kept)
    assert gc.get_count()[0] == 0  # the young generation starts empty again
