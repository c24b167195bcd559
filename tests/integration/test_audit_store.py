"""The audit store against real SQLite and a real PostgreSQL: one behaviour, two backends.

PostgreSQL is `ORCH_TEST_POSTGRES_URL` (default: trust auth on 127.0.0.1:5432, database `test`);
each test gets its own schema, dropped afterwards, so runs never see each other's rows. When no
server answers, the PostgreSQL cases are skipped with the reason.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import JsonValue

from orch_worker.adapters.db import store as store_module
from orch_worker.adapters.db.rows import record_from_json
from orch_worker.adapters.db.store import (
    AuditStore,
    SchemaVersionError,
    SqliteStore,
    StoreUnavailableError,
    StoreUrlError,
    UnstorableEventError,
    open_store,
)
from orch_worker.adapters.kafka.codec import encode
from orch_worker.domain.audit import AuditDraft, ChainHead, chain, verify_chain
from orch_worker.domain.models import AuditEvent

pytestmark = pytest.mark.integration

PG_URL = os.environ.get("ORCH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
SPLIT = 7
"""Where the two-batch tests cut `_signal_lifecycle`."""
T0 = datetime(2025, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)


@dataclass
class Backend:
    """A store URL plus raw SQL access to the same database, bypassing the store."""

    name: str
    url: str
    sql: Callable[[str], list[tuple[Any, ...]]]


def _sqlite_backend(tmp_path: Path) -> Generator[Backend, None, None]:
    path = tmp_path / "audit.db"

    def sql(statement: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(path) as conn:
            return conn.execute(statement).fetchall()

    yield Backend("sqlite", f"sqlite:///{path}", sql)


def _postgres_backend() -> Generator[Backend, None, None]:
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc}")
    schema = f"t_audit_{uuid.uuid4().hex[:12]}"

    def sql(statement: str) -> list[tuple[Any, ...]]:
        with admin.transaction():
            admin.execute(f"SET LOCAL search_path TO {schema}")
            cur = admin.execute(statement)
            return cur.fetchall() if cur.description else []

    sep = "&" if "?" in PG_URL else "?"
    try:
        yield Backend("postgresql", f"{PG_URL}{sep}schema={schema}", sql)
    finally:
        admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield from _sqlite_backend(tmp_path)
    else:
        yield from _postgres_backend()


@pytest.fixture
def store(backend: Backend) -> Iterator[AuditStore]:
    s = open_store(backend.url)
    try:
        yield s
    finally:
        s.close()


def _chain(
    portfolio: str, drafts: list[AuditDraft], head: ChainHead | None = None, ts: datetime = T0
) -> tuple[ChainHead, list[AuditEvent]]:
    new_head, events = chain(portfolio, head or ChainHead(), drafts, ts)
    return new_head, list(events)


def _signal_lifecycle(signal_id: str = "sig-1") -> list[AuditDraft]:
    """A signal on two accounts: A fills in two steps; B fills 0.20 of 0.70, then is cancelled.

    A's quantity is only known at release, after its first status. Split after the seventh
    event (SPLIT), B's cancellation (which carries no filled_quantity) lands in a later batch
    than its fill, so the view must keep the earlier filled_quantity.
    """
    a, b = f"{signal_id}-int-a", f"{signal_id}-int-b"

    def intent(intent_id: str, account: str, status: str, **amounts: str) -> AuditDraft:
        data: dict[str, JsonValue] = {"intent_status": status, **amounts}
        return AuditDraft("intent_transition", f"{status}.", data, signal_id, intent_id, account)

    def signal(status: str) -> AuditDraft:
        return AuditDraft("signal_status", f"{status}.", {"signal_status": status}, signal_id)

    return [
        AuditDraft("signal_received", "Signal received.", {}, signal_id=signal_id),
        intent(a, "ACC-1", "planned"),
        signal("planned"),
        intent(a, "ACC-1", "released", quantity="1.50"),
        intent(b, "ACC-2", "released", quantity="0.70"),
        signal("executing"),
        intent(b, "ACC-2", "partially_filled", filled_quantity="0.20"),
        # ---- second batch in the two-batch tests
        intent(a, "ACC-1", "partially_filled", filled_quantity="0.50"),
        intent(b, "ACC-2", "cancelled"),
        intent(a, "ACC-1", "filled", filled_quantity="1.50"),
        signal("partially_completed"),
    ]


class TestAuditStore:
    def test_written_chain_reads_back_equal_and_verifies(self, store: AuditStore) -> None:
        _, alpha = _chain("alpha", _signal_lifecycle("sig-a"))
        _, beta = _chain("beta", _signal_lifecycle("sig-b"), ts=T0 + timedelta(seconds=1))

        assert store.write_batch(beta + alpha) == len(alpha) + len(beta)

        assert list(store.events("alpha")) == alpha
        assert list(store.events()) == alpha + beta
        assert list(store.events(signal_id="sig-b")) == beta
        assert list(store.events("alpha", signal_id="sig-b")) == []
        assert store.portfolios() == ["alpha", "beta"]
        assert store.count() == len(alpha) + len(beta)
        for portfolio in store.portfolios():
            assert verify_chain(store.events(portfolio)) is None

    def test_reading_pages_through_a_chain_longer_than_a_page(
        self, store: AuditStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(store_module, "PAGE_SIZE", 4)
        _, events = _chain("alpha", [AuditDraft("note", f"Note {i}.") for i in range(11)])
        _, other = _chain("beta", [AuditDraft("note", "Other.")] * 3)
        store.write_batch(events + other)

        assert [e.seq for e in store.events("alpha")] == list(range(1, 12))
        assert list(store.events()) == events + other

    def test_redelivered_batch_is_stored_once(self, store: AuditStore) -> None:
        head, first = _chain("alpha", _signal_lifecycle())
        _, second = _chain("alpha", [AuditDraft("note", "More.")] * 3, head)

        assert store.write_batch(first) == len(first)
        again = store.write(first)
        overlapping = store.write(first[-2:] + second + second[:1])

        assert (again.new, again.duplicates, again.conflicts) == (0, len(first), 0)
        assert (overlapping.new, overlapping.duplicates) == (3, 3)
        assert store.count() == len(first) + len(second)
        assert verify_chain(store.events("alpha")) is None

    def test_current_state_follows_the_status_conventions(
        self, store: AuditStore, backend: Backend
    ) -> None:
        _, events = _chain("alpha", _signal_lifecycle("sig-1"))
        # In two batches, so the intent columns are also carried across transactions.
        store.write_batch(events[:SPLIT])
        assert store.signal_status("sig-1") == "executing"
        assert store.intent_statuses("sig-1") == {
            "sig-1-int-a": "released",
            "sig-1-int-b": "partially_filled",
        }
        store.write_batch(events[SPLIT:])
        # The same story in one batch, so it is also carried across events of one batch.
        _, one_batch = _chain("beta", _signal_lifecycle("sig-2"))
        store.write_batch(one_batch)

        for signal_id in ("sig-1", "sig-2"):
            assert store.signal_status(signal_id) == "partially_completed"
            assert store.intent_statuses(signal_id) == {
                f"{signal_id}-int-a": "filled",
                f"{signal_id}-int-b": "cancelled",
            }
        assert store.signal_status("unknown") is None
        assert store.intent_statuses("unknown") == {}
        rows = backend.sql(
            "SELECT intent_id, portfolio, account_id, filled_quantity, quantity, last_seq"
            " FROM intents ORDER BY intent_id"
        )
        assert rows == [
            ("sig-1-int-a", "alpha", "ACC-1", "1.50", "1.50", 10),
            ("sig-1-int-b", "alpha", "ACC-2", "0.20", "0.70", 9),
            ("sig-2-int-a", "beta", "ACC-1", "1.50", "1.50", 10),
            ("sig-2-int-b", "beta", "ACC-2", "0.20", "0.70", 9),
        ]

    def test_current_state_never_goes_backwards(self, store: AuditStore) -> None:
        _, events = _chain("alpha", _signal_lifecycle("sig-1"))
        late, early = events[SPLIT:], events[:SPLIT]
        final = {"sig-1-int-a": "filled", "sig-1-int-b": "cancelled"}

        store.write_batch(late)
        store.write_batch(early)  # arrives after the later events: must not win
        assert store.signal_status("sig-1") == "partially_completed"
        assert store.intent_statuses("sig-1") == final

        store.write_batch(early)  # redelivered: still must not win
        assert store.signal_status("sig-1") == "partially_completed"
        assert store.intent_statuses("sig-1") == final

    def test_a_batch_out_of_order_yields_its_latest_state(self, store: AuditStore) -> None:
        _, events = _chain("alpha", _signal_lifecycle("sig-1"))

        store.write_batch(list(reversed(events)))

        assert store.signal_status("sig-1") == "partially_completed"
        assert store.intent_statuses("sig-1") == {
            "sig-1-int-a": "filled",
            "sig-1-int-b": "cancelled",
        }

    def test_another_portfolio_cannot_move_a_signals_status(self, store: AuditStore) -> None:
        _, mine = _chain("alpha", [AuditDraft("s", "Planned.", {"signal_status": "planned"}, "s1")])
        _, theirs = _chain(
            "beta",
            [AuditDraft("x", "Noise.")] * 5
            + [AuditDraft("s", "Gone.", {"signal_status": "x"}, "s1")],
        )
        store.write_batch(mine)
        store.write_batch(theirs)

        assert store.signal_status("s1") == "planned"

    def test_a_row_edited_in_sql_fails_verification(
        self, store: AuditStore, backend: Backend
    ) -> None:
        _, events = _chain("alpha", _signal_lifecycle())
        store.write_batch(events)
        assert verify_chain(store.events("alpha")) is None

        backend.sql(
            "UPDATE audit_events SET rationale = 'Nothing happened.'"
            " WHERE portfolio = 'alpha' AND seq = 3"
        )

        problem = verify_chain(store.events("alpha"))
        assert problem is not None
        assert "seq 3" in problem
        assert "altered" in problem

    def test_a_deleted_row_fails_verification(self, store: AuditStore, backend: Backend) -> None:
        _, events = _chain("alpha", _signal_lifecycle())
        store.write_batch(events)

        backend.sql("DELETE FROM audit_events WHERE portfolio = 'alpha' AND seq = 4")

        problem = verify_chain(store.events("alpha"))
        assert problem is not None
        assert "expected seq 4" in problem

    def test_a_forked_event_is_kept_as_a_conflict_not_dropped(self, store: AuditStore) -> None:
        head, common = _chain("alpha", [AuditDraft("note", "Start.")])
        _, ours = _chain("alpha", [AuditDraft("note", "Bought 1 lot.")], head)
        _, fork = _chain("alpha", [AuditDraft("note", "Bought 9 lots.")], head)
        assert ours[0].event_id == fork[0].event_id  # ids derive from (portfolio, seq)

        store.write_batch(common + ours)
        result = store.write(fork)

        assert (result.new, result.duplicates, result.conflicts) == (0, 0, 1)
        assert list(store.events("alpha")) == common + ours
        assert store.conflicts() == fork
        assert store.write(fork).conflicts == 1  # seen again: still reported, stored once
        assert store.conflicts() == fork

    def test_a_forked_event_in_a_batch_moves_no_state_and_the_rest_of_the_batch_does(
        self, store: AuditStore
    ) -> None:
        def status(signal_id: str, value: str) -> AuditDraft:
            return AuditDraft("s", f"Signal {value}.", {"signal_status": value}, signal_id)

        head, common = _chain("alpha", [status("sig-f", "planned")])
        later, ours = _chain("alpha", [status("sig-f", "executing")], head)
        _, fork = _chain("alpha", [status("sig-g", "cancelled")], head)
        _, after = _chain("alpha", [status("sig-f", "completed")], later)
        store.write_batch(common + ours)

        result = store.write(fork + after)

        assert (result.new, result.duplicates, result.conflicts) == (1, 0, 1)
        assert store.signal_status("sig-f") == "completed"
        assert store.signal_status("sig-g") is None  # only the conflicting version named it
        assert store.conflicts() == fork

    def test_awkward_values_round_trip_exactly(self, store: AuditStore) -> None:
        data: dict[str, JsonValue] = {
            "big_float": 1e20,
            "tiny": 1e-7,
            "tenth": 0.1,
            "whole_float": 100.0,
            "big_int": 2**62,
            "decimal": "0.000000010",
            "unicode": "Zürich ✓ 東京",
            "nul_in_json": "a\u0000b",
            "nested": {"z": [1, None, True, {"k": "v"}], "a": []},
        }
        _, events = _chain(
            "alpha",
            [AuditDraft("odd", "Ünïcödé rationale — with \"quotes\" and 'ticks'.", data)],
            ts=datetime(2025, 1, 1, tzinfo=UTC),  # zero microseconds must still round-trip
        )
        store.write_batch(events)

        assert list(store.events()) == events
        assert verify_chain(store.events("alpha")) is None

    def test_nul_in_rationale_is_refused_or_kept_never_truncated(
        self, store: AuditStore, backend: Backend
    ) -> None:
        _, events = _chain("alpha", [AuditDraft("ok", "Fine."), AuditDraft("odd", "a\x00b")])

        if backend.name == "postgresql":
            assert store.unstorable_reason(events[1]) is not None
            with pytest.raises(UnstorableEventError):
                store.write_batch(events)
            assert store.count() == 0  # the whole batch, not just the bad event
        else:
            assert store.unstorable_reason(events[1]) is None
            store.write_batch(events)
            assert list(store.events()) == events

    def test_records_built_from_the_json_read_back_as_the_events(self, store: AuditStore) -> None:
        data: dict[str, JsonValue] = {"big_int": 2**63 - 1, "nul": "a\u0000b", "f": 1e20}
        _, alpha = _chain("alpha", [*_signal_lifecycle(), AuditDraft("odd", "Odd.", data)])
        records = [record_from_json(encode(e)) for e in alpha]
        assert all(r is not None for r in records)  # the sink's fast path, not the model's

        result = store.write_records([r for r in records if r is not None])

        assert (result.new, result.duplicates, result.conflicts) == (len(alpha), 0, 0)
        assert list(store.events()) == alpha
        assert verify_chain(store.events("alpha")) is None
        assert store.intent_statuses("sig-1") == {
            "sig-1-int-a": "filled",
            "sig-1-int-b": "cancelled",
        }

    def test_two_portfolios_claiming_one_signal_in_one_batch_leave_it_to_the_first(
        self, store: AuditStore
    ) -> None:
        def claim(portfolio: str, status: str) -> list[AuditEvent]:
            draft = AuditDraft("s", "Claim.", {"signal_status": status, "intent_status": status})
            shared = AuditDraft(draft.type, draft.rationale, draft.data, "sig-x", "int-x", "A-1")
            return _chain(portfolio, [shared])[1]

        store.write_batch(claim("alpha", "planned") + claim("beta", "hijacked"))

        assert store.signal_status("sig-x") == "planned"
        assert store.intent_statuses("sig-x") == {"int-x": "planned"}

    def test_a_seq_beyond_64_bits_is_refused_not_truncated(self, store: AuditStore) -> None:
        _, events = _chain("alpha", [AuditDraft("ok", "Fine."), AuditDraft("odd", "Far.")])
        far = events[1].model_copy(update={"seq": 2**63})

        assert store.unstorable_reason(events[0]) is None
        assert "64-bit" in (store.unstorable_reason(far) or "")
        with pytest.raises(UnstorableEventError, match="64-bit"):
            store.write_batch([events[0], far])
        assert store.count() == 0

    def test_reopening_keeps_the_data_and_a_newer_schema_is_refused(
        self, store: AuditStore, backend: Backend
    ) -> None:
        _, events = _chain("alpha", _signal_lifecycle())
        store.write_batch(events)
        store.close()

        with open_store(backend.url) as reopened:
            assert list(reopened.events()) == events
            assert reopened.signal_status("sig-1") == "partially_completed"

        backend.sql("UPDATE schema_meta SET value = '99' WHERE key = 'version'")
        with pytest.raises(SchemaVersionError, match="99"):
            open_store(backend.url)


def test_a_new_sqlite_store_has_8_kib_pages_and_an_older_one_keeps_its_own(
    tmp_path: Path,
) -> None:
    older = tmp_path / "older.db"
    with sqlite3.connect(older) as conn:
        conn.execute("PRAGMA page_size = 4096")
        conn.execute("CREATE TABLE unrelated (x)")
    _, events = _chain("alpha", _signal_lifecycle())

    for path, page in ((tmp_path / "new.db", 8192), (older, 4096)):
        with open_store(f"sqlite:///{path}") as store:
            store.write_batch(events)
            assert list(store.events()) == events
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA page_size").fetchone() == (page,)


def test_sqlite_calls_in_database_once_per_write_before_the_batch_goes_into_its_tables(
    tmp_path: Path,
) -> None:
    """The sink decodes its next batch from then on, so rows must no longer be bound one by
    one: the batch is staged, and neither its own connection nor another sees it yet."""
    path = tmp_path / "audit.db"
    _, events = _chain("alpha", _signal_lifecycle())
    seen: list[tuple[int, int]] = []

    with open_store(f"sqlite:///{path}") as store:

        def in_database() -> None:
            with sqlite3.connect(path) as other:  # WAL: sees committed rows only
                committed = other.execute("SELECT count(*) FROM audit_events").fetchone()[0]
            seen.append((store.count(), committed))

        store.in_database = in_database
        store.write_batch(events[:SPLIT])
        store.write_batch(events[SPLIT:])

        assert seen == [(0, 0), (SPLIT, SPLIT)]
        assert list(store.events()) == events


def test_a_sqlite_write_that_fails_once_staged_leaves_nothing_behind(tmp_path: Path) -> None:
    """Staged rows live in the write's transaction: a failed write must not leak them into
    the next one."""
    _, events = _chain("alpha", _signal_lifecycle("sig-1"))
    _, other = _chain("beta", _signal_lifecycle("sig-2"))

    def fail() -> None:
        raise RuntimeError("the write fails once its rows are staged")

    with open_store(f"sqlite:///{tmp_path / 'audit.db'}") as store:
        store.in_database = fail
        with pytest.raises(RuntimeError, match="staged"):
            store.write_batch(events)
        store.in_database = None

        assert store.write_batch(other) == len(other)
        assert list(store.events()) == other
        assert store.signal_status("sig-1") is None
        assert store.intent_statuses("sig-1") == {}
        assert store.write_batch(events) == len(events)
        assert list(store.events()) == events + other
        assert store.signal_status("sig-1") == store.signal_status("sig-2")


def test_an_event_from_before_the_year_1000_round_trips_in_postgresql() -> None:
    backends = _postgres_backend()
    backend = next(backends)
    _, events = _chain("alpha", _signal_lifecycle(), ts=datetime(999, 12, 31, 23, 59, tzinfo=UTC))
    try:
        with open_store(backend.url) as store:
            store.write_batch(events)
            assert list(store.events()) == events
    finally:
        backends.close()


def test_sqlite_store_is_in_wal_mode_at_a_relative_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///audit.db")
    store.close()

    assert isinstance(store, SqliteStore)
    with sqlite3.connect(tmp_path / "audit.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://root@localhost/db", "unsupported database URL"),
        ("postgresql+psycopg://u:secret@h/db", "unsupported database URL"),
        ("sqlite://relative.db", "sqlite:///relative/path"),
        ("sqlite:///", "no file path"),
        ("sqlite:///audit.db?mode=ro", "query options"),
        ("sqlite:////no/such/directory/audit.db", "does not exist"),
        ("orch-audit.db", "unsupported database URL"),
    ],
)
def test_unusable_urls_are_refused_clearly(url: str, message: str) -> None:
    with pytest.raises(StoreUrlError, match=message) as info:
        open_store(url)
    assert "secret" not in str(info.value)


def test_schema_is_refused_for_sqlite_and_checked_for_postgresql(tmp_path: Path) -> None:
    with pytest.raises(StoreUrlError, match="PostgreSQL"):
        open_store(f"sqlite:///{tmp_path}/a.db", schema="x")
    with pytest.raises(StoreUrlError, match="schema name"):
        open_store(f"{PG_URL}?schema=bad;drop")
    with pytest.raises(StoreUrlError, match="conflicts"):
        open_store(f"{PG_URL}?schema=a", schema="b")


def test_a_lost_postgresql_connection_is_retryable_and_then_recovers() -> None:
    backends = _postgres_backend()
    backend = next(backends)
    app = f"orch-test-{uuid.uuid4().hex[:8]}"
    _, events = _chain("alpha", _signal_lifecycle())
    try:
        with open_store(f"{backend.url}&application_name={app}") as store:
            store.write_batch(events[:3])
            backend.sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                f" WHERE application_name = '{app}'"
            )

            with pytest.raises(StoreUnavailableError):
                store.write_batch(events)
            assert store.write_batch(events) == len(events) - 3

            assert list(store.events()) == events
    finally:
        backends.close()


def test_a_locked_sqlite_database_is_retryable_and_the_store_recovers(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _, events = _chain("alpha", _signal_lifecycle())
    with SqliteStore(str(path), busy_timeout_ms=50) as store:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock

        with pytest.raises(StoreUnavailableError, match="locked"):
            store.write_batch(events)
        other.execute("ROLLBACK")
        other.close()

        assert store.write_batch(events) == len(events)
        assert store.count() == len(events)


def test_sqlite_writers_sharing_a_file_wait_for_the_writer_lock_and_give_up_in_time(
    tmp_path: Path,
) -> None:
    """Sinks of one group sharing a file take turns on the lock beside it, staging their rows
    without it; one that cannot get it within its busy timeout reports the database busy
    (retryable) and names the lock."""
    path = tmp_path / "audit.db"
    _, events = _chain("alpha", _signal_lifecycle())
    with (
        SqliteStore(str(path), busy_timeout_ms=5000) as first,
        SqliteStore(str(path), busy_timeout_ms=100) as second,
    ):
        staged = threading.Event()
        go_on = threading.Event()

        def park() -> None:
            staged.set()
            assert go_on.wait(10)

        first.in_database = park
        writer = threading.Thread(target=first.write_batch, args=(events[:SPLIT],))
        writer.start()
        try:
            assert staged.wait(10)
            # `first` has staged its batch, which takes no lock: `second` writes meanwhile.
            assert second.write_batch(events[SPLIT:]) == len(events) - SPLIT
            with second._transaction():  # holds the writer lock, as a long write would
                go_on.set()
                writer.join(0.3)
                assert writer.is_alive()  # `first` waits for the lock
            writer.join(10)
            assert not writer.is_alive()
        finally:
            go_on.set()
            writer.join(10)
        assert list(second.events()) == events

        with first._transaction(), pytest.raises(StoreUnavailableError, match=r"audit\.db-writer"):
            second.write_batch(events)


def test_a_sqlite_writer_lock_is_freed_when_its_process_dies(tmp_path: Path) -> None:
    """A sink killed while it writes leaves no lock behind: the kernel frees a `flock`."""
    path = tmp_path / "audit.db"
    _, events = _chain("alpha", _signal_lifecycle())
    with SqliteStore(str(path), busy_timeout_ms=50) as store:
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, os, time\n"
                f"fd = os.open({str(path) + '-writer'!r}, os.O_RDWR)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "print('held', flush=True)\n"
                "time.sleep(60)\n",
            ],
            stdout=subprocess.PIPE,
        )
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == b"held\n"
            with pytest.raises(StoreUnavailableError, match="writer"):
                store.write_batch(events)
            holder.kill()
            holder.wait(10)
            assert store.write_batch(events) == len(events)
        finally:
            holder.kill()
            holder.wait(10)


def test_sinks_starting_together_on_a_new_sqlite_file_all_open_it(tmp_path: Path) -> None:
    """Several sink processes of one group start at once on a file that does not exist yet:
    none may fail on creating it, turning it to WAL or creating its tables."""
    opener = (
        "import os, sys, time\n"
        "from orch_worker.adapters.db.store import open_store\n"
        "go = sys.argv[1]\n"
        "while not os.path.exists(go):\n"
        "    time.sleep(0.0005)\n"
        "open_store('sqlite:///' + sys.argv[2]).close()\n"
        "print('opened', flush=True)\n"
    )
    for attempt in range(3):
        path, go = tmp_path / f"audit-{attempt}.db", tmp_path / f"go-{attempt}"
        sinks = [
            subprocess.Popen(
                [sys.executable, "-c", opener, str(go), str(path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for _ in range(4)
        ]
        time.sleep(1.5)  # every one of them imported and waiting
        go.touch()
        for sink in sinks:
            out, err = sink.communicate(timeout=60)
            assert (sink.returncode, out) == (0, b"opened\n"), err.decode()
        with open_store(f"sqlite:///{path}") as store:
            assert store.count() == 0


def test_sinks_starting_together_on_a_new_postgresql_schema_all_open_it() -> None:
    """Several sink processes of one group start at once: none may fail on creating the schema
    or its tables (neither IF NOT EXISTS is atomic in PostgreSQL)."""
    backends = _postgres_backend()
    backend = next(backends)
    barrier = threading.Barrier(6)
    failures: list[BaseException] = []

    def open_one() -> None:
        barrier.wait()
        try:
            open_store(backend.url).close()
        except BaseException as exc:  # collected: the assertion below names it
            failures.append(exc)

    try:
        threads = [threading.Thread(target=open_one) for _ in range(barrier.parties)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert failures == []
        assert backend.sql("SELECT value FROM schema_meta WHERE key = 'version'")
    finally:
        backends.close()
