"""What a restart needs survives the changelog: open orders with their timers, pending retries,
open interventions, account rests; and the same inputs give the same decisions (ids, delays)."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest

from orch_worker.adapters.kafka.changelog import (
    SNAPSHOT_PART_BYTES,
    BrokenChangelogError,
    OutRecord,
    Recovered,
    SnapshotScan,
    StateDumper,
    decision_record,
    fence_record,
    fold,
    snapshot_parts,
)
from orch_worker.domain.coordinator import IntentStatus, SignalState
from orch_worker.domain.decider import PortfolioState, next_wake
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


def _fold_all(records: list[bytes], partition: int = 0) -> Recovered:
    rec = Recovered()
    for r in records:
        fold(rec, r, partition)
    return rec


def test_a_snapshot_alone_rebuilds_what_the_whole_history_does() -> None:
    run = busy_portfolio()
    pf = run.pf.model_copy(update={"seen_commands": ("c-1",), "forgotten": {"old": f.NOW}})
    history = [decision_record("o-1", pf, tuple(pf.signals), None, [])]
    parts = list(snapshot_parts("snap", [pf], 4))
    assert len(parts) >= 2

    from_history, from_snapshot = _fold_all(history), _fold_all(parts)

    assert from_snapshot.portfolios["demo"].signals == from_history.portfolios["demo"].signals
    back = from_snapshot.portfolios["demo"]
    assert back == pf
    assert from_snapshot.snapshots == 1
    assert from_snapshot.records == 0


def test_a_snapshot_clears_outboxes_before_it_and_sets_the_epoch() -> None:
    run = busy_portfolio()
    pf = run.pf
    pending = decision_record("o-1", pf, (), None, [OutRecord("t", None, b"x")], epoch=4)
    rec = _fold_all([pending, *snapshot_parts("snap", [pf], 4)], partition=1)
    assert rec.pending == {}
    assert rec.epochs == {1: 4}
    fold(rec, decision_record("o-2", pf, (), None, [], epoch=3), 1)  # a deposed owner's
    assert rec.deposed == 1


def test_many_signals_are_cut_into_parts_and_a_missing_part_spoils_the_snapshot() -> None:
    run = Run(config())
    for n in range(120):
        run.signal(f.signal(f"s-{n}"))
    parts = list(snapshot_parts("snap", [run.pf], None))
    assert len(parts) > 2
    assert max(len(p) for p in parts) < 2 * SNAPSHOT_PART_BYTES
    whole = _fold_all(parts)
    assert len(whole.portfolios["demo"].signals) == 120
    gap = _fold_all(parts[:1] + parts[2:])
    assert gap.snapshots == 0
    assert "demo" not in gap.portfolios


def test_the_scan_finds_the_newest_complete_snapshot_written_by_a_current_owner() -> None:
    run = busy_portfolio()
    pf = run.pf
    old = list(snapshot_parts("old", [pf], 5))
    new = list(snapshot_parts("new", [pf], 5))
    zombie = list(snapshot_parts("zombie", [pf], 5))
    cut = list(snapshot_parts("cut", [pf], 7))[:-1]
    log = [
        fence_record(5),
        decision_record("o-1", pf, (), None, []),
        *old,
        decision_record("o-2", pf, (), None, []),
        *new,
        fence_record(7),
        *zombie,  # written by the epoch-5 owner after epoch 7 took over
        *cut,  # the epoch-7 owner crashed before its last part
    ]
    scan = SnapshotScan()
    for offset, value in enumerate(log):
        scan.feed(offset, value)
    assert scan.start == 2 + len(old) + 1


def test_many_forgotten_ids_are_cut_into_parts_below_the_message_limit() -> None:
    run = busy_portfolio()
    gone = {f"old-{n:06d}-{'x' * 20}": f.NOW for n in range(30_000)}
    pf = run.pf.model_copy(update={"forgotten": gone})
    parts = list(snapshot_parts("snap", [pf], None))
    assert max(len(p) for p in parts) < 512 * 1024
    back = _fold_all(parts).portfolios["demo"]
    assert back.forgotten == gone
    assert back.signals == pf.signals


def test_a_state_written_from_its_parts_reads_back_as_the_whole_state() -> None:
    """Every decision's changed signals, written by one dumper along the run as the worker
    does, parse to what pydantic writes for the whole state, and validate back to it."""
    run = busy_portfolio()
    run.at(40).due("sig-1")
    run.due("sig-2")
    dump = StateDumper()
    written = 0
    for d in run.decisions:
        for sid in d.changed_signals:
            st = d.state.signals[sid]
            raw = dump(st)
            assert orjson.loads(raw) == orjson.loads(st.model_dump_json())
            assert SignalState.model_validate_json(raw) == st
            written += 1
    assert written >= len(run.decisions)
    assert len(dump) == len(run.pf.signals)


def test_an_unchanged_state_is_not_written_again_and_a_forgotten_one_is_let_go() -> None:
    run = busy_portfolio()
    dump = StateDumper()
    st = run.st("sig-1")
    first = dump(st)
    assert dump(st) is first
    dump.keep({"sig-2"})
    assert len(dump) == 0
    dump(run.st("sig-2"))
    dump.forget("sig-2")
    assert len(dump) == 0


def _history(run: Run) -> list[bytes]:
    """Every decision of the run as the worker writes it: open signals as patches."""
    dump = StateDumper()
    before = PortfolioState(portfolio="demo")
    out = []
    for k, d in enumerate(run.decisions):
        out.append(
            decision_record(
                f"o-{k}", d.state, d.changed_signals, None, [], dump=dump, before=before
            )
        )
        before = d.state
    return out


def test_a_history_of_patches_folds_back_to_the_state_it_was_written_from() -> None:
    run = busy_portfolio()
    run.at(40).due("sig-1")
    run.due("sig-2")
    history = _history(run)
    patched = sum(len(orjson.loads(r)["patches"]) for r in history)
    assert patched >= len(history) // 2, "open signals are written as patches"

    rec = Recovered()
    for k, value in enumerate(history):
        fold(rec, value)
        if k % 3 == 0:
            rec.settle()  # later patches apply to validated states too
    assert rec.portfolios["demo"].signals == run.pf.signals


def test_a_signal_finished_before_the_decision_is_written_whole() -> None:
    run = Run(config())
    run.signal()
    for i in run.intents():
        run.report(i, "filled", i.intent.quantity, price="1.1000")
    assert run.status().terminal
    finished = run.pf
    run.at(5).report(run.intents()[0], "filled", "0.50", price="1.1000")  # a late fill
    d = run.decisions[-1]
    assert d.changed_signals == ("sig-1",)
    doc = orjson.loads(decision_record("o", d.state, d.changed_signals, None, [], before=finished))
    assert doc["patches"] == []
    assert len(doc["signals"]) == 1


def test_a_patch_without_the_state_before_it_is_refused() -> None:
    run = busy_portfolio()
    history = _history(run)
    first_patch = next(k for k, r in enumerate(history) if orjson.loads(r)["patches"])
    rec = Recovered()
    with pytest.raises(BrokenChangelogError, match="without the signal's state"):
        fold(rec, history[first_patch])
