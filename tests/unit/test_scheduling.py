"""The release timing policy: windows, rotation, spacing, rate budgets, urgency, determinism."""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from orch_worker.domain.config import BrokerConfig, StaggerConfig
from orch_worker.domain.scheduling import (
    earliest_slot,
    effective_window,
    release_order,
    schedule,
)
from tests import factories as f

ACCOUNTS = [(f"ACC-{i}", "paper") for i in range(1, 6)]


def test_delays_fall_in_the_window_and_the_first_account_goes_at_its_start() -> None:
    s = schedule(ACCOUNTS, f.signal(), StaggerConfig(min_s=1, max_s=30), {}, rotation=0, now=f.NOW)
    delays = [(slot.scheduled_at - f.NOW).total_seconds() for slot in s.slots]
    assert delays[0] == 1.0
    assert all(1.0 <= d <= 30.0 for d in delays)
    assert delays == sorted(delays), "releases follow the release order"


def test_release_order_rotates_round_robin_with_the_portfolio_sequence() -> None:
    ids = [a for a, _ in ACCOUNTS]
    assert release_order(ids, 0) == ("ACC-1", "ACC-2", "ACC-3", "ACC-4", "ACC-5")
    assert release_order(ids, 2) == ("ACC-3", "ACC-4", "ACC-5", "ACC-1", "ACC-2")
    assert release_order(list(reversed(ids)), 7) == release_order(ids, 2)


def test_each_account_goes_first_equally_often_over_a_thousand_signals() -> None:
    firsts: Counter[str] = Counter()
    for n in range(1000):
        s = schedule(ACCOUNTS, f.signal(f"s-{n}"), StaggerConfig(), {}, rotation=n, now=f.NOW)
        firsts[s.order[0]] += 1
    expected = 1000 / len(ACCOUNTS)
    assert all(abs(c - expected) <= 0.1 * expected for c in firsts.values()), firsts
    assert set(firsts) == {a for a, _ in ACCOUNTS}


def test_urgent_signal_skips_the_stagger_and_says_so() -> None:
    s = schedule(
        ACCOUNTS,
        f.signal(urgency="high"),
        StaggerConfig(min_s=1, max_s=30),
        {},
        rotation=0,
        now=f.NOW,
    )
    assert s.urgent
    assert {slot.scheduled_at for slot in s.slots} == {f.NOW}
    assert "urgency high overrides" in s.rationale
    assert all("urgent" in slot.reasons[0] for slot in s.slots)


def test_urgent_releases_still_respect_the_broker_rate_budget() -> None:
    s = schedule(
        ACCOUNTS,
        f.signal(urgency="high"),
        StaggerConfig(),
        {"paper": BrokerConfig(max_orders_per_s=4)},
        rotation=0,
        now=f.NOW,
    )
    gaps = [(b.scheduled_at - a.scheduled_at).total_seconds() for a, b in pairwise(s.slots)]
    assert all(abs(g - 0.25) < 1e-6 for g in gaps)
    assert "paper budget 4/s" in s.slots[1].reasons[-1]


def test_window_shrinks_as_volatility_rises() -> None:
    cfg = StaggerConfig(min_s=1, max_s=31, volatility_ref=0.01)
    assert effective_window(cfg, None) == (1, 31)
    assert effective_window(cfg, 0.01) == (1, 16)
    lo, hi = effective_window(cfg, 0.09)
    assert (lo, round(hi, 6)) == (1, 4.0)


def test_same_signal_gives_the_same_schedule_and_another_signal_differs() -> None:
    cfg = StaggerConfig()
    a = schedule(ACCOUNTS, f.signal("x"), cfg, {}, rotation=3, now=f.NOW)
    b = schedule(ACCOUNTS, f.signal("x"), cfg, {}, rotation=3, now=f.NOW)
    c = schedule(ACCOUNTS, f.signal("y"), cfg, {}, rotation=3, now=f.NOW)
    assert a == b
    assert [s.scheduled_at for s in a.slots] != [s.scheduled_at for s in c.slots]


def test_existing_reservations_push_a_release_and_the_reason_is_given() -> None:
    cfg = StaggerConfig(min_s=0, max_s=0, min_spacing_s=0.5)
    taken = [f.NOW, f.NOW + timedelta(seconds=0.5)]
    s = schedule(ACCOUNTS[:1], f.signal(), cfg, {}, rotation=0, now=f.NOW, portfolio_taken=taken)
    assert s.slots[0].scheduled_at == f.NOW + timedelta(seconds=1.0)
    assert "portfolio spacing 0.5s" in s.slots[0].reasons[-1]


def test_earliest_slot_finds_the_first_gap() -> None:
    assert earliest_slot(0.0, [0.0, 1.0, 2.0], 1.0) == 3.0
    assert earliest_slot(0.0, [5.0], 1.0) == 0.0
    assert earliest_slot(4.5, [5.0], 1.0) == 6.0
    assert earliest_slot(3.0, [1.0, 5.0], 1.0) == 3.0


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=12),
    brokers=st.lists(st.sampled_from(["a", "b", "c"]), min_size=12, max_size=12),
    lo=st.floats(min_value=0, max_value=5),
    width=st.floats(min_value=0, max_value=30),
    spacing=st.sampled_from([0.0, 0.1, 0.5, 2.0]),
    rate=st.sampled_from([None, 1.0, 5.0, 50.0]),
    urgent=st.booleans(),
    rotation=st.integers(min_value=0, max_value=1000),
    taken_pf=st.lists(st.floats(min_value=-5, max_value=40), max_size=6),
    taken_b=st.lists(st.floats(min_value=-5, max_value=40), max_size=6),
)
def test_property_window_spacing_and_rate_budget_are_never_violated(
    n: int,
    brokers: list[str],
    lo: float,
    width: float,
    spacing: float,
    rate: float | None,
    urgent: bool,
    rotation: int,
    taken_pf: list[float],
    taken_b: list[float],
) -> None:
    allocs = [(f"A{i:02d}", brokers[i]) for i in range(n)]
    cfg = StaggerConfig(min_s=lo, max_s=lo + width, min_spacing_s=spacing)
    broker_cfg = {b: BrokerConfig(max_orders_per_s=rate) for b in "abc"}
    pf_times = [f.NOW + timedelta(seconds=round(t, 3)) for t in taken_pf]
    b_times = {"a": [f.NOW + timedelta(seconds=round(t, 3)) for t in taken_b]}
    sig = f.signal(urgency="high" if urgent else "normal")
    s = schedule(
        allocs,
        sig,
        cfg,
        broker_cfg,
        rotation=rotation,
        now=f.NOW,
        portfolio_taken=pf_times,
        broker_taken=b_times,
    )
    assert sorted(s.order) == sorted(a for a, _ in allocs)
    for slot in s.slots:
        if urgent:
            assert slot.base_delay_s == 0
        else:
            assert lo - 1e-9 <= slot.base_delay_s <= lo + width + 1e-9
        assert slot.scheduled_at >= f.NOW + timedelta(seconds=slot.base_delay_s) - timedelta(
            microseconds=1
        )
    times = [slot.scheduled_at for slot in s.slots]
    assert times == sorted(times)
    tol = 2e-6

    def apart(mine: list[datetime], reserved: list[datetime], gap: float) -> None:
        for i, t in enumerate(mine):
            for j, other in enumerate(mine):
                if i != j:
                    assert abs((t - other).total_seconds()) >= gap - tol
            for other in reserved:
                assert abs((t - other).total_seconds()) >= gap - tol

    if spacing:
        apart(times, pf_times, spacing)
    if rate:
        for b in "abc":
            mine = [sl.scheduled_at for sl in s.slots if sl.broker == b]
            apart(mine, list(b_times.get(b, [])), 1 / rate)
