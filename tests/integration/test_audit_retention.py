"""Retention and the report/replay queries of the audit store, on SQLite and PostgreSQL alike.

Pruning must take only whole finished signals older than the cutoff, leave a tombstone for every
event it deletes so `audit verify` still walks each chain, and never let a late redelivery
bring part of a pruned signal back.
"""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import JsonValue

from orch_worker.adapters.db.store import AuditStore, open_store
from orch_worker.audit_tools import prune_cutoff, verify_store
from orch_worker.domain.audit import AuditDraft, ChainHead, chain, event_hash
from orch_worker.domain.models import AuditEvent

pytestmark = pytest.mark.integration

PG_URL = os.environ.get("ORCH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
T0 = datetime(2025, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)


@dataclass
class Db:
    url: str
    sql: Callable[[str], list[tuple[Any, ...]]]


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    if request.param == "sqlite":
        path = tmp_path / "audit.db"

        def lite(statement: str) -> list[tuple[Any, ...]]:
            with sqlite3.connect(path) as conn:
                return conn.execute(statement).fetchall()

        yield Db(f"sqlite:///{path}", lite)
        return
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc}")
    schema = f"t_ret_{uuid.uuid4().hex[:12]}"

    def pg(statement: str) -> list[tuple[Any, ...]]:
        with admin.transaction():
            admin.execute(f"SET LOCAL search_path TO {schema}")
            cur = admin.execute(statement)
            return cur.fetchall() if cur.description else []

    sep = "&" if "?" in PG_URL else "?"
    try:
        yield Db(f"{PG_URL}{sep}schema={schema}", pg)
    finally:
        admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.close()


@pytest.fixture
def store(db: Db) -> Iterator[AuditStore]:
    with open_store(db.url) as s:
        yield s


def _signal(signal_id: str, final: str | None = "completed") -> list[AuditDraft]:
    """A signal with one intent; `final` None leaves it open."""
    intent = f"{signal_id}-i"

    def step(status: str, **extra: JsonValue) -> AuditDraft:
        data: dict[str, JsonValue] = {"intent_status": status, **extra}
        return AuditDraft("intent_transition", status, data, signal_id, intent, "ACC-1")

    drafts = [
        AuditDraft("signal_received", "in", {"signal_status": "received"}, signal_id),
        AuditDraft("plan_created", "plan", {"signal_status": "planned"}, signal_id),
        step("released", quantity="1.00"),
    ]
    if final is not None:
        drafts += [
            step("filled", filled_quantity="1.00"),
            AuditDraft("signal_status", final, {"signal_status": final}, signal_id),
        ]
    return drafts


class Trail:
    """One portfolio's chain, appended to in steps at given times."""

    def __init__(self, portfolio: str = "demo") -> None:
        self.portfolio, self.head = portfolio, ChainHead()
        self.events: list[AuditEvent] = []

    def add(self, drafts: list[AuditDraft], ts: datetime) -> list[AuditEvent]:
        self.head, events = chain(self.portfolio, self.head, drafts, ts)
        self.events += events
        return list(events)


def _control(ts_note: str) -> AuditDraft:
    return AuditDraft("control_applied", ts_note, {"outcome": "applied"})


def test_prune_takes_only_whole_finished_signals_older_than_the_cutoff(
    store: AuditStore, db: Db
) -> None:
    trail = Trail()
    trail.add(_signal("old-done"), T0)
    trail.add([_control("pause")], T0)  # no signal: never pruned
    trail.add(_signal("old-open", final=None), T0)
    trail.add(_signal("new-done"), T0 + timedelta(days=10))
    store.write_batch(trail.events)
    late = AuditDraft(
        "intent_transition", "late", {"outcome": "late"}, "old-late", "old-late-i", "ACC-1"
    )
    more = trail.add(_signal("old-late"), T0)
    more += trail.add([late], T0 + timedelta(days=10))  # a late report keeps it
    store.write_batch(more)

    cutoff = T0 + timedelta(days=5)
    dry = store.prune(cutoff, pruned_at=T0 + timedelta(days=30), dry_run=True)
    assert dry.signal_ids == ("old-done",)
    assert store.count() == len(trail.events)

    result = store.prune(cutoff, pruned_at=T0 + timedelta(days=30))

    assert result.signal_ids == ("old-done",)
    assert result.events == 5
    assert store.signal_events(["old-done"]) == []
    assert store.signal_status("old-done") is None
    assert store.intent_statuses("old-done") == {}
    for kept in ("old-open", "new-done", "old-late"):
        assert store.signal_events([kept]), kept
    assert [t.seq for t in store.tombstones()] == [1, 2, 3, 4, 5]
    assert {t.signal_id for t in store.tombstones()} == {"old-done"}
    assert db.sql("SELECT value FROM schema_meta WHERE key = 'version'") == [("2",)]
    report = verify_store(db.url)
    assert not report.breaks, report.text()
    assert report.pruned == 5


def test_a_pruned_event_redelivered_is_a_duplicate_and_stays_pruned(store: AuditStore) -> None:
    trail = Trail()
    old = trail.add(_signal("old"), T0)
    store.write_batch(old)
    store.prune(T0 + timedelta(days=1), pruned_at=T0 + timedelta(days=2))
    newer = trail.add(_signal("new"), T0 + timedelta(days=3))

    again = store.write([*old, *newer])

    assert (again.new, again.duplicates, again.conflicts) == (len(newer), len(old), 0)
    assert store.signal_events(["old"]) == []
    assert store.signal_status("old") is None
    assert not verify_store_breaks(store, trail)


def verify_store_breaks(store: AuditStore, trail: Trail) -> list[str]:
    from orch_worker.audit_tools import verify_with_gaps

    broken = verify_with_gaps(store.events(trail.portfolio), store.tombstones(trail.portfolio))
    return [broken] if broken else []


def test_a_different_version_of_a_pruned_event_is_kept_as_a_conflict(store: AuditStore) -> None:
    trail = Trail()
    old = trail.add(_signal("old"), T0)
    store.write_batch(old)
    store.prune(T0 + timedelta(days=1), pruned_at=T0 + timedelta(days=2))
    forged = old[1].model_copy(update={"rationale": "forged"})
    forged = forged.model_copy(update={"hash": event_hash(forged)})

    result = store.write([forged])

    assert (result.new, result.conflicts) == (0, 1)
    assert [c.rationale for c in store.conflicts()] == ["forged"]
    assert store.count() == 0


def test_received_signals_and_signal_events_serve_the_report(store: AuditStore) -> None:
    trail = Trail()
    trail.add(_signal("a"), T0)
    trail.add(_signal("b"), T0 + timedelta(hours=1))
    other = Trail("other")
    other.add(_signal("c"), T0 + timedelta(hours=2))
    store.write_batch(trail.events + other.events)

    everything = store.received_signals()
    assert [(r.signal_id, r.portfolio) for r in everything] == [
        ("a", "demo"),
        ("b", "demo"),
        ("c", "other"),
    ]
    assert everything[0].received_ts == T0
    window = store.received_signals(T0 + timedelta(minutes=30), T0 + timedelta(hours=2))
    assert [r.signal_id for r in window] == ["b"]
    events = store.signal_events(["c", "a"])
    assert [(e.portfolio, e.signal_id) for e in events] == [("demo", "a")] * 5 + [
        ("other", "c")
    ] * 5
    assert events == [e for e in trail.events if e.signal_id == "a"] + other.events


def test_prune_cutoff_is_explicit_or_configured_never_a_default() -> None:
    now = datetime(2026, 1, 31, tzinfo=UTC)

    assert prune_cutoff(None, None, now) is None
    assert prune_cutoff(None, 30, now) == datetime(2026, 1, 1, tzinfo=UTC)
    given = datetime(2025, 6, 1)  # no offset: UTC
    assert prune_cutoff(given, 30, now) == given.replace(tzinfo=UTC)


def test_report_and_replay_read_either_backend(store: AuditStore) -> None:
    from orch_worker.domain.decider import Context, PortfolioState, on_report, on_signal
    from orch_worker.replay import replay_signal
    from orch_worker.report import report_html
    from tests import factories as f

    ctx = Context(
        config=f.config(n_accounts=3),
        now=f.NOW,
        accounts={a: f.account(a) for a in ("ACC-1", "ACC-2", "ACC-3")},
    )
    d = on_signal(PortfolioState(portfolio="demo"), f.signal("sig-1"), ctx)
    events, pf = list(d.audit), d.state
    for n, it in enumerate(d.intents):
        r = f.report(it.intent_id, it.account_id, "filled", str(it.quantity), n=n, price="1.1011")
        d = on_report(pf, "sig-1", r, ctx)
        events += d.audit
        pf = d.state
    store.write_batch(events)

    text, status = replay_signal(store, "sig-1", None)
    assert status == 0, text
    assert "SAME plan" in text
    page, data = report_html(store, f.NOW - timedelta(minutes=1), f.NOW + timedelta(minutes=1))
    assert [v.signal_id for v in data.signals] == ["sig-1"]
    assert data.fills == 3
    assert data.accounts["ACC-1"].slippage_bps == 10.0
    assert 'data-metric="filled" data-account="ACC-1">0.34<' in page
    empty, _ = report_html(store, f.NOW + timedelta(minutes=1))
    assert 'data-metric="signals">0<' in empty
