"""What a restart needs survives the changelog: open orders with their timers, pending retries,
open interventions, account rests; and the same inputs give the same decisions (ids, delays)."""

from __future__ import annotations

from decimal import Decimal

from orch_worker.adapters.kafka.changelog import (
    OutRecord,
    Recovered,
    decision_record,
    fence_record,
    fold,
)
from orch_worker.domain.coordinator import IntentStatus
from orch_worker.domain.decider import next_wake
from tests import factories as f
from tests.unit.execution_helpers import Run, config, limit_signal


def busy_portfolio() -> Run:
    """A retry waiting for its backoff, a partial limit order on its completion clock, an open
    intervention, a suspended account and a failure count."""
    run = Run(
        config(max_accounts=2, execution={"retry_base_s": 5, "ack_timeout_s": 10}),
        prices={"EURUSD": Decimal("1.1004")},
    )
    run.signal(limit_signal())
    first, second = run.intents()
    run.at(1).report(first, "rejected", code="connection_error")
    run.at(1).report(second, "partially_filled", "0.20", price="1.1000")
    run.at(2).signal(f.signal("sig-2"))
    a, b = run.intents("sig-2")
    run.at(2).report(a, "rejected", code="other", signal_id="sig-2")
    run.at(2).report(b, "rejected", code="account_suspended", signal_id="sig-2")
    return run


def test_a_busy_portfolio_comes_back_whole_from_its_changelog() -> None:
    run = busy_portfolio()
    pf = run.pf
    assert pf.account_health  # a failure count and a suspension
    assert any(st.open_interventions for st in pf.signals.values())

    rec = Recovered()
    fold(rec, decision_record("o-1", pf, tuple(pf.signals), None, [OutRecord("t", None, b"x")]))

    back = rec.portfolios["demo"]
    assert back.account_health == pf.account_health
    assert back.signals == pf.signals
    for sid, st in pf.signals.items():
        assert next_wake(back.signals[sid], run.cfg) == next_wake(st, run.cfg)


def test_the_restarted_state_decides_exactly_as_the_original() -> None:
    run = busy_portfolio()
    rec = Recovered()
    fold(rec, decision_record("o-1", run.pf, tuple(run.pf.signals), None, []))
    twin = Run(run.cfg, prices=dict(run.prices))
    twin.pf = rec.portfolios["demo"]

    for r in (run, twin):
        r.at(40).due("sig-1")
        r.due("sig-2")

    assert [d.intents for d in run.decisions[-2:]] == [d.intents for d in twin.decisions[-2:]]
    assert any(d.intents for d in twin.decisions)  # the retry and the completion's cancel
    assert [d.audit for d in run.decisions[-2:]] == [d.audit for d in twin.decisions[-2:]]
    assert run.pf == twin.pf


def test_a_pending_retry_and_an_open_order_are_what_the_timers_wait_for() -> None:
    run = busy_portfolio()
    st = run.st("sig-1")
    retry = next(i for i in st.intents if i.status is IntentStatus.SCHEDULED)
    partial = next(i for i in st.intents if i.status is IntentStatus.PARTIALLY_FILLED)

    assert next_wake(st, run.cfg) == min(retry.intent.scheduled_at, partial.deadline)  # type: ignore[type-var]


def test_the_same_history_gives_the_same_ids_delays_and_audit() -> None:
    a, b = busy_portfolio(), busy_portfolio()

    assert a.published == b.published
    assert a.audit == b.audit
    assert a.pf == b.pf


def test_decisions_of_a_deposed_owner_are_skipped_with_their_outbox() -> None:
    run = busy_portfolio()
    pf = run.pf
    before = pf.model_copy(update={"audit_seq": 1})
    rec = Recovered()
    fold(rec, fence_record(5), partition=2)
    fold(rec, decision_record("o-1", before, tuple(pf.signals), None, [], epoch=5), partition=2)
    # The new owner's fence (generation 7), then a late decision of the old owner (epoch 5).
    fold(rec, fence_record(7), partition=2)
    late = [OutRecord("intents", "ACC-1", b"released twice")]
    fold(rec, decision_record("o-2", pf, tuple(pf.signals), None, late, epoch=5), partition=2)
    assert rec.deposed == 1
    assert rec.pending == {}
    assert rec.portfolios["demo"].audit_seq == 1
    # The new owner's own decisions apply, and other partitions have their own epochs.
    fold(rec, decision_record("o-3", pf, tuple(pf.signals), None, late, epoch=7), partition=2)
    fold(rec, decision_record("o-4", pf, (), None, [], epoch=1), partition=0)
    assert rec.deposed == 1
    assert list(rec.pending) == ["o-3"]
    assert rec.portfolios["demo"].audit_seq == pf.audit_seq


def test_unstamped_records_and_fences_never_depose() -> None:
    run = busy_portfolio()
    rec = Recovered()
    fold(rec, fence_record(None))
    fold(rec, fence_record(3))
    fold(rec, fence_record(2))  # an older generation never lowers the epoch
    assert rec.epochs == {0: 3}
    fold(rec, decision_record("o-1", run.pf, tuple(run.pf.signals), None, []))
    assert rec.deposed == 0
    assert rec.records == 1
