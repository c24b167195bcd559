"""The audit store: every `AuditEvent` from `orch.audit`, plus current-state views of them.

Two backends sit behind one `AuditStore` protocol, picked by URL in `open_store`: SQLite (stdlib,
the default, WAL mode) and PostgreSQL (psycopg 3, imported only when asked for).

Design points, each there for a reason:

* Columns round-trip exactly. The chain hash covers the canonical JSON of every field, so the
  store keeps each one losslessly: `data` is stored as the JSON text we wrote (PostgreSQL `json`,
  not `jsonb`, because `jsonb` rewrites numbers such as `1e20` and refuses `\\u0000`, which would
  make an intact chain fail verification). Reading builds events from the columns, never from a
  cached copy, so an edited row is caught by `verify_chain`.
* Writes are idempotent on `event_id`: a redelivered batch stores nothing twice. The conflict
  clause names `event_id` only (never `INSERT OR IGNORE`, which would also swallow NOT NULL
  violations). Event ids are derived from (portfolio, seq), so a forked chain arrives as a *second
  version of an existing event id*; such versions are kept in `audit_conflicts` rather than
  dropped, and `conflicts()` returns them for `audit verify`.
* `signals` and `intents` are views of the latest status, updated in the same transaction as the
  events they come from, and only forward: a row changes only for a higher `seq` of the same
  portfolio chain, so redelivery or reordering can never move a status backwards.
* Nothing is truncated. An event a backend cannot hold exactly (PostgreSQL text cannot contain
  NUL; no column holds a `seq` or a `data` integer beyond 64 bits) is refused with
  `UnstorableEventError`, and `unstorable_reason` / `record_problem` say why, so the sink can
  dead-letter it and write the rest of its batch.
* Writes take events in their row form (`rows.EventRecord`): the sink builds it straight from a
  record's JSON, `write` from `AuditEvent`s. SQLite binds a batch into temporary tables of its
  connection (`executemany`) and moves it into the audit tables with one statement per table,
  which run without the GIL; PostgreSQL COPYs a batch into `audit_events` when none of it is
  stored yet (nearly always) and falls back to INSERT ... ON CONFLICT DO NOTHING when some of
  it is.
* Retention is explicit, never silent: `prune` deletes only whole signals that are terminal and
  older than a cutoff, and leaves a tombstone per deleted event in `pruned` (its seq, hash and
  prev_hash), so `audit verify` can still walk each chain across the gap. A redelivered event that
  was pruned is recognised by its tombstone and not stored again.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import operator
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol, Self, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
from pydantic import ValidationError

from orch_worker.adapters.db.rows import (
    EVENT_COLUMNS,
    EventRecord,
    UnrepresentableEventError,
    record_from_event,
)
from orch_worker.adapters.db.writer_lock import WriterLock
from orch_worker.domain.coordinator import TERMINAL as TERMINAL_INTENTS
from orch_worker.domain.models import AuditEvent, ResultStatus
from orch_worker.domain.types import format_ts

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
"""Version of the tables below; a database written by a newer version is refused, not guessed at.

2 added the `pruned` table. A version-1 database is used as it is (the table is created), and its
recorded version becomes 2 only when something is pruned: from then on the chains have gaps that
only a version that reads `pruned` can verify, so an older orch-worker must refuse the database.
"""

PAGE_SIZE = 5000
"""Events per query in `events()`: bounded memory without a long-lived cursor or transaction."""

_ID_CHUNK = 500
"""Ids per `IN (...)` lookup: well under SQLite's bound-parameter limit on every version."""

_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

Row = tuple[Any, ...]
_T = TypeVar("_T")


class AuditStoreError(RuntimeError):
    """Base of the store's own errors."""


class StoreUrlError(AuditStoreError, ValueError):
    """The database URL names no backend we support, or has options the backend does not take."""


class SchemaVersionError(AuditStoreError):
    """The database holds tables of a schema version this code does not know."""


class CorruptRowError(AuditStoreError):
    """A stored row no longer forms a valid `AuditEvent` (edited by hand, or damaged)."""


class UnstorableEventError(AuditStoreError, ValueError):
    """An event this backend cannot store exactly; not retryable, dead-letter it instead."""

    def __init__(self, event_id: str, reason: str) -> None:
        super().__init__(f"event {event_id}: {reason}")
        self.event_id = event_id
        self.reason = reason


class StoreUnavailableError(AuditStoreError):
    """A retryable failure (database locked, connection lost, disk full): try the batch again."""


TERMINAL_SIGNAL_STATUSES = tuple(sorted(s.value for s in ResultStatus if s.terminal))
TERMINAL_INTENT_STATUSES = tuple(sorted(s.value for s in TERMINAL_INTENTS))

TOMBSTONE_COLUMNS = (
    "event_id",
    "portfolio",
    "seq",
    "signal_id",
    "type",
    "ts",
    "prev_hash",
    "hash",
    "pruned_at",
    "cutoff",
)


@dataclass(frozen=True, slots=True)
class ReceivedSignal:
    """A signal as the trail first saw it: id, portfolio and when it was received."""

    signal_id: str
    portfolio: str
    received_ts: datetime


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What is left of a pruned event: enough to keep its place in the hash chain."""

    event_id: str
    portfolio: str
    seq: int
    signal_id: str | None
    type: str
    ts: datetime
    prev_hash: str
    hash: str
    pruned_at: datetime
    cutoff: datetime


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What `prune` removed (or, with `dry_run`, would remove)."""

    signal_ids: tuple[str, ...]
    events: int


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What one batch did: `new` events stored, exact `duplicates`, and forked `conflicts`."""

    new: int
    duplicates: int
    conflicts: int


class AuditStore(Protocol):
    """What the sink writes to and the `audit`, `replay` and `report` commands read from."""

    in_database: Callable[[], None] | None
    """Called on the writing thread when a write hands the rest of its batch to the database,
    if the backend gains from work done meanwhile (see `_SqlStore.in_database`); it must not
    raise."""

    decodes_beside_writes: ClassVar[bool]
    """Whether other work (the sink's decoding of its next batch) may run on another thread
    for the whole of a write, not only from `in_database` on (see `_SqlStore`)."""

    def unstorable_reason(self, event: AuditEvent) -> str | None:
        """Why this backend cannot store `event` exactly, or None when it can."""
        ...

    def record_problem(self, record: EventRecord) -> str | None:
        """Why this backend cannot store `record` exactly, or None when it can."""
        ...

    def write(self, events: Sequence[AuditEvent]) -> WriteResult:
        """Store a batch in one transaction, idempotent on `event_id`."""
        ...

    def write_records(self, records: Sequence[EventRecord]) -> WriteResult:
        """`write` for events already in the store's row form (the sink's path)."""
        ...

    def write_batch(self, events: Sequence[AuditEvent]) -> int:
        """`write`, returning only how many events were new."""
        ...

    def events(
        self, portfolio: str | None = None, signal_id: str | None = None
    ) -> Iterator[AuditEvent]:
        """Stored events, filtered, ordered by portfolio then seq (then event id)."""
        ...

    def conflicts(self) -> list[AuditEvent]:
        """Versions of an event id that differ from the stored one (a forked or altered chain)."""
        ...

    def portfolios(self) -> list[str]:
        """Every portfolio with at least one stored event, sorted."""
        ...

    def count(self) -> int:
        """How many events are stored (conflicting versions not included)."""
        ...

    def signal_status(self, signal_id: str) -> str | None:
        """The latest recorded status of a signal, or None if none was recorded."""
        ...

    def intent_statuses(self, signal_id: str) -> dict[str, str]:
        """intent_id -> latest recorded status, for every intent of a signal."""
        ...

    def received_signals(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> list[ReceivedSignal]:
        """Signals whose `signal_received` event is in [since, until), oldest first."""
        ...

    def signal_events(self, signal_ids: Sequence[str]) -> list[AuditEvent]:
        """Every stored event of these signals, ordered by portfolio then seq."""
        ...

    def tombstones(self, portfolio: str | None = None) -> list[Tombstone]:
        """What `prune` left of the events it deleted, ordered by portfolio then seq."""
        ...

    def prune(self, before: datetime, *, pruned_at: datetime, dry_run: bool = False) -> PruneResult:
        """Delete whole signals that are terminal and whose every event is older than `before`."""
        ...

    def close(self) -> None:
        """Release the connection; the store is unusable afterwards."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def open_store(url: str, *, schema: str | None = None) -> AuditStore:
    """Open (and create or check the tables of) the audit store at `url`.

    Args:
        url: `sqlite:///relative/path`, `sqlite:////absolute/path`, `sqlite:///:memory:`, or
            `postgresql://user@host:port/db` (`postgres://` too). PostgreSQL URLs may carry
            `?schema=name` to keep the tables in their own schema (created if missing).
        schema: the PostgreSQL schema, instead of `?schema=` in the URL.

    Raises:
        StoreUrlError: the URL is not one of the forms above.
        SchemaVersionError: the database was written by a newer schema version.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        if schema is not None:
            raise StoreUrlError("schema= is for PostgreSQL; use a separate SQLite file instead")
        return SqliteStore(_sqlite_path(url))
    if scheme in ("postgresql", "postgres"):
        conninfo, url_schema = _split_schema(url)
        if schema is not None and url_schema is not None and schema != url_schema:
            raise StoreUrlError(f"schema {schema!r} conflicts with ?schema={url_schema} in the URL")
        return PostgresStore(conninfo, schema=schema or url_schema)
    raise StoreUrlError(
        f"unsupported database URL {_redact(url)!r}: use sqlite:///path or postgresql://..."
    )


def _sqlite_path(url: str) -> str:
    if not url.startswith("sqlite:///"):
        raise StoreUrlError(
            f"bad SQLite URL {url!r}: use sqlite:///relative/path or sqlite:////absolute/path"
        )
    path = url[len("sqlite:///") :]
    if "?" in path:
        raise StoreUrlError(f"SQLite URL {url!r}: query options are not supported")
    if not path:
        raise StoreUrlError(f"SQLite URL {url!r} has no file path")
    if path != ":memory:" and not Path(path).parent.exists():
        raise StoreUrlError(f"SQLite URL {url!r}: directory {Path(path).parent} does not exist")
    return path


def _split_schema(url: str) -> tuple[str, str | None]:
    """The URL without our `schema` option (libpq would reject it), and that option's value."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [v for k, v in query if k == "schema"]
    if len(schemas) > 1:
        raise StoreUrlError("the database URL has more than one ?schema=")
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), (schemas[0] if schemas else None)


def _redact(url: str) -> str:
    """The URL without a password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# ---------------------------------------------------------------------------------------------
# Current-state views, derived from a batch (pure; the SQL only guards against going backwards)


@dataclass(frozen=True, slots=True)
class SignalState:
    signal_id: str
    portfolio: str
    status: str
    last_seq: int
    updated_ts: str
    """RFC 3339 UTC text, as the events store `ts`."""
    updated_at: datetime


@dataclass(slots=True)
class IntentState:
    """One intent's latest state within a batch (mutable: folded event by event)."""

    intent_id: str
    portfolio: str
    signal_id: str | None
    account_id: str | None
    status: str
    filled_quantity: str | None
    quantity: str | None
    last_seq: int
    updated_ts: str
    updated_at: datetime


def _seq(record: EventRecord) -> int:
    return record.row[2]


def current_state(
    records: Iterable[EventRecord],
) -> tuple[list[SignalState], list[IntentState]]:
    """The latest signal and intent states a batch implies, one row per (id, portfolio).

    Follows the worker's conventions: `data.signal_status` changes the signal's status;
    `data.intent_status` changes the intent's, with optional `filled_quantity` and `quantity`
    (a later event without them keeps the earlier values).
    """
    # Only the last status of a signal counts: its record is kept and made a row once.
    last_signal: dict[tuple[str, str], EventRecord] = {}
    intents: dict[tuple[str, str], IntentState] = {}
    changes = [r for r in records if r.signal_status is not None or r.intent_status is not None]
    for r in sorted(changes, key=_seq):
        _, portfolio, seq, ts, _, signal_id, intent_id, account_id = r.row[:8]
        if signal_id is not None and r.signal_status is not None:
            last_signal[(signal_id, portfolio)] = r
        if intent_id is None or r.intent_status is None:
            continue
        state = intents.get((intent_id, portfolio))
        if state is None:
            intents[(intent_id, portfolio)] = IntentState(
                intent_id,
                portfolio,
                signal_id,
                account_id,
                r.intent_status,
                r.filled_quantity,
                r.quantity,
                seq,
                ts,
                r.at,
            )
            continue
        # Values this event lacks are kept from before it.
        state.status, state.last_seq, state.updated_ts, state.updated_at = (
            r.intent_status,
            seq,
            ts,
            r.at,
        )
        state.signal_id = signal_id or state.signal_id
        state.account_id = account_id or state.account_id
        state.filled_quantity = r.filled_quantity or state.filled_quantity
        state.quantity = r.quantity or state.quantity
    signals = [
        SignalState(signal_id, portfolio, r.signal_status, r.row[2], r.row[3], r.at)
        for (signal_id, portfolio), r in last_signal.items()
        if r.signal_status is not None  # always: only such records are kept
    ]
    return signals, list(intents.values())


# ---------------------------------------------------------------------------------------------
# The shared write/read logic; the two backends supply SQL and transactions.


class _SqlStore(ABC):
    """Everything both backends do the same way; subclasses supply dialect and connection."""

    _ph: str  # the driver's parameter placeholder
    _data_select = "data"  # as JSON text: we parse it ourselves, exactly as it was written

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- hooks ---------------------------------------------------------------------------------

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager[None]: ...

    @abstractmethod
    def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    @abstractmethod
    def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement inside the current transaction; return the rows it changed."""

    @abstractmethod
    def _insert_events(self, table: str, records: Sequence[EventRecord]) -> int:
        """Insert records into `table`, skipping existing keys; return how many were inserted."""

    @abstractmethod
    def _upsert_state(self, signals: list[SignalState], intents: list[IntentState]) -> None: ...

    def _insert_events_and_state(
        self,
        records: Sequence[EventRecord],
        signals: list[SignalState],
        intents: list[IntentState],
        *,
        prepared: bool,
    ) -> tuple[int, bool]:
        """Insert `records` into `audit_events` and, if every one of them was new (so none can
        conflict), upsert the state they imply; return how many were new and whether the
        state was written. `prepared`: these are the lists `_prepare` was given."""
        new = self._insert_events("audit_events", records)
        if new < len(records):
            return new, False
        self._upsert_state(signals, intents)
        return new, True

    @abstractmethod
    def _prepare(
        self, records: Sequence[EventRecord], signals: list[SignalState], intents: list[IntentState]
    ) -> None:
        """Work on a batch that needs no lock on the audit tables, done before its transaction
        (SQLite stages its rows); `_insert_events_and_state` then gets the same lists
        (`prepared`), unless pruned events were left out of them."""

    @abstractmethod
    def _ts_param(self, ts: datetime) -> object: ...

    in_database: Callable[[], None] | None = None
    """SQLite calls it on the writing thread once a write's rows are staged in the connection's
    own temporary tables, just before the few statements that move them into the audit tables
    and COMMIT: the long stretch of a write that runs without the GIL (index updates, WAL
    frames, fsync, now and then a checkpoint), and the sink decodes its next batch meanwhile.
    Not earlier: while rows are bound one by one, the sqlite3 module lets go of the GIL around
    every row, and another thread's decoding would make each row wait for it (measured: the
    sink a sixth slower). PostgreSQL does not call it: see `decodes_beside_writes`."""

    decodes_beside_writes: ClassVar[bool] = False
    """Whether the sink may decode its next batch beside the whole of a write. PostgreSQL:
    a write is mostly waiting on the server (COPY, the upserts, COMMIT), without the GIL, so
    decoding then costs the write little and takes the decoding out of the sink's critical
    path (measured, runs taking turns on two cores at load 2: 33,000-40,000 events/s end to end
    rather than 23,000-26,000). SQLite: no, for the reason under `in_database`."""

    _holds_nul: ClassVar[bool] = True
    """Whether text columns can hold NUL; if not, `record_problem` looks for it."""

    # -- writing -------------------------------------------------------------------------------

    def record_problem(self, record: EventRecord) -> str | None:
        """Why this backend cannot store `record` exactly, or None when it can."""
        if not self._holds_nul and "\x00" in record.row[8]:
            return "rationale contains a NUL character, which PostgreSQL text cannot store"
        return None

    def unstorable_reason(self, event: AuditEvent) -> str | None:
        """Why this backend cannot store `event` exactly, or None when it can."""
        try:
            record = record_from_event(event)
        except UnrepresentableEventError as exc:
            return exc.reason
        return self.record_problem(record)

    def write(self, events: Sequence[AuditEvent]) -> WriteResult:
        """Store a batch in one transaction, idempotent on `event_id`.

        Events already stored with the same hash count as duplicates; a different event under an
        existing id goes to `audit_conflicts` (so a fork is evidence, not silently lost). An
        event that was pruned counts the same way against its tombstone, so a late redelivery
        cannot bring back part of a pruned signal. The current-state views move forward from
        the stored events in the same transaction.

        Raises:
            UnstorableEventError: an event cannot be stored exactly (nothing is written).
            StoreUnavailableError: a retryable database failure (nothing is written).
        """
        records: list[EventRecord] = []
        for e in events:
            try:
                records.append(record_from_event(e))
            except UnrepresentableEventError as exc:
                raise UnstorableEventError(e.event_id, exc.reason) from exc
        return self.write_records(records)

    def write_records(self, records: Sequence[EventRecord]) -> WriteResult:
        """`write` for events already in the store's row form (the sink's path).

        Raises:
            UnstorableEventError: a record cannot be stored exactly (nothing is written).
            StoreUnavailableError: a retryable database failure (nothing is written).
        """
        if not records:
            return WriteResult(0, 0, 0)
        if not self._holds_nul:
            for r in records:
                problem = self.record_problem(r)
                if problem is not None:
                    raise UnstorableEventError(r.row[0], problem)
        # The state as if no event of the batch was pruned or conflicts, which is nearly always
        # so; it is made again below without the ones that do. Made, and handed to the backend
        # (`_prepare`), before the transaction: the lock it takes is then held for database
        # work only, which matters when several sinks share one SQLite file.
        signals, intents = current_state(records)
        self._prepare(records, signals, intents)
        with self._transaction():
            tombstoned = self._tombstoned_hashes(records)
            live = records
            if tombstoned:
                live = [r for r in records if r.row[0] not in tombstoned]
                signals, intents = current_state(live)
            new, state_written = self._insert_events_and_state(
                live, signals, intents, prepared=not tombstoned
            )
            stored = tombstoned
            if new < len(live):
                stored = stored | self._stored_hashes({r.row[0] for r in live})
            conflicting = (
                {i for i, r in enumerate(records) if stored.get(r.row[0], r.row[11]) != r.row[11]}
                if stored
                else set()
            )
            if conflicting:
                self._insert_events("audit_conflicts", [records[i] for i in sorted(conflicting)])
                for i in sorted(conflicting):
                    event_id, portfolio, seq = records[i].row[:3]
                    log.warning(
                        "audit event %s (%s seq %d) conflicts with the stored version: kept in "
                        "audit_conflicts",
                        event_id,
                        portfolio,
                        seq,
                    )
            if not state_written:
                if conflicting:
                    signals, intents = current_state(
                        r
                        for i, r in enumerate(records)
                        if i not in conflicting and r.row[0] not in tombstoned
                    )
                self._upsert_state(signals, intents)
        return WriteResult(new, len(records) - new - len(conflicting), len(conflicting))

    def write_batch(self, events: Sequence[AuditEvent]) -> int:
        """`write`, returning only how many events were new."""
        return self.write(events).new

    def _stored_hashes(self, event_ids: set[str], table: str = "audit_events") -> dict[str, str]:
        ids = sorted(event_ids)
        found: dict[str, str] = {}
        for start in range(0, len(ids), _ID_CHUNK):
            chunk = ids[start : start + _ID_CHUNK]
            marks = ", ".join([self._ph] * len(chunk))
            sql = f"SELECT event_id, hash FROM {table} WHERE event_id IN ({marks})"
            found.update((str(r[0]), str(r[1])) for r in self._fetch(sql, chunk))
        return found

    def _tombstoned_hashes(self, records: Sequence[EventRecord]) -> dict[str, str]:
        """event_id -> hash of the batch's events that were pruned (usually none, cheaply).

        Pruned events are the oldest of their chain, so only events at or below a portfolio's
        highest pruned seq are looked up; with nothing pruned this is one query on an empty
        table.
        """
        highest = {
            str(r[0]): int(r[1])
            for r in self._fetch("SELECT portfolio, max(seq) FROM pruned GROUP BY portfolio")
        }
        if not highest:
            return {}
        suspects = {r.row[0] for r in records if r.row[2] <= highest.get(r.row[1], 0)}
        return self._stored_hashes(suspects, "pruned") if suspects else {}

    # -- reading -------------------------------------------------------------------------------

    def _select(self, table: str) -> str:
        cols = [self._data_select if c == "data" else c for c in EVENT_COLUMNS]
        return f"SELECT {', '.join(cols)} FROM {table}"

    @staticmethod
    def _to_event(row: Row) -> AuditEvent:
        fields = dict(zip(EVENT_COLUMNS, row, strict=True))
        try:
            fields["data"] = orjson.loads(fields["data"])
            return AuditEvent.model_validate(fields)
        except (orjson.JSONDecodeError, ValidationError) as exc:
            raise CorruptRowError(
                f"stored audit event {fields['event_id']} ({fields['portfolio']} seq "
                f"{fields['seq']}) is not a valid AuditEvent: {exc}"
            ) from exc

    def events(
        self, portfolio: str | None = None, signal_id: str | None = None
    ) -> Iterator[AuditEvent]:
        """Stored events, filtered, ordered by portfolio then seq (then event id).

        Pages by key rather than holding one cursor open, so a long read (a verify over millions
        of events) keeps no transaction open against the sink's writes.
        """
        p = self._ph
        filters: list[str] = []
        params: list[Any] = []
        if portfolio is not None:
            filters.append(f"portfolio = {p}")
            params.append(portfolio)
        if signal_id is not None:
            filters.append(f"signal_id = {p}")
            params.append(signal_id)
        after: Row | None = None
        while True:
            where = list(filters)
            page_params = list(params)
            if after is not None:
                where.append(f"(portfolio, seq, event_id) > ({p}, {p}, {p})")
                page_params.extend(after)
            sql = self._select("audit_events")
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += f" ORDER BY portfolio, seq, event_id LIMIT {PAGE_SIZE}"
            rows = self._fetch(sql, page_params)
            for row in rows:
                yield self._to_event(row)
            if len(rows) < PAGE_SIZE:
                return
            last = rows[-1]
            after = (last[1], last[2], last[0])

    def conflicts(self) -> list[AuditEvent]:
        """Versions of an event id that differ from the stored one (a forked or altered chain)."""
        sql = self._select("audit_conflicts") + " ORDER BY portfolio, seq, event_id, hash"
        return [self._to_event(r) for r in self._fetch(sql)]

    def portfolios(self) -> list[str]:
        """Every portfolio with at least one stored event, sorted."""
        rows = self._fetch("SELECT DISTINCT portfolio FROM audit_events ORDER BY portfolio")
        return [str(r[0]) for r in rows]

    def count(self) -> int:
        """How many events are stored (conflicting versions not included)."""
        return int(self._fetch("SELECT count(*) FROM audit_events")[0][0])

    def signal_status(self, signal_id: str) -> str | None:
        """The latest recorded status of a signal, or None if none was recorded."""
        rows = self._fetch(f"SELECT status FROM signals WHERE signal_id = {self._ph}", [signal_id])
        return str(rows[0][0]) if rows else None

    def intent_statuses(self, signal_id: str) -> dict[str, str]:
        """intent_id -> latest recorded status, for every intent of a signal."""
        rows = self._fetch(
            f"SELECT intent_id, status FROM intents WHERE signal_id = {self._ph}"
            " ORDER BY intent_id",
            [signal_id],
        )
        return {str(r[0]): str(r[1]) for r in rows}

    def received_signals(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> list[ReceivedSignal]:
        """Signals whose `signal_received` event is in [since, until), oldest first.

        A report or a prune takes whole signals by when they arrived, so a signal's later
        events (fills after `until`) are never cut off from it.
        """
        sql = "SELECT signal_id, portfolio, ts FROM audit_events WHERE type = 'signal_received'"
        sql += " AND signal_id IS NOT NULL"
        params: list[Any] = []
        if since is not None:
            sql += f" AND ts >= {self._ph}"
            params.append(self._ts_param(since))
        if until is not None:
            sql += f" AND ts < {self._ph}"
            params.append(self._ts_param(until))
        sql += " ORDER BY ts, portfolio, seq"
        return [
            ReceivedSignal(str(r[0]), str(r[1]), _as_datetime(r[2]))
            for r in self._fetch(sql, params)
        ]

    def signal_events(self, signal_ids: Sequence[str]) -> list[AuditEvent]:
        """Every stored event of these signals, ordered by portfolio then seq."""
        ids = sorted(set(signal_ids))
        rows: list[Row] = []
        for start in range(0, len(ids), _ID_CHUNK):
            chunk = ids[start : start + _ID_CHUNK]
            marks = ", ".join([self._ph] * len(chunk))
            rows += self._fetch(
                self._select("audit_events") + f" WHERE signal_id IN ({marks})", chunk
            )
        rows.sort(key=lambda r: (r[1], r[2], r[0]))
        return [self._to_event(r) for r in rows]

    def tombstones(self, portfolio: str | None = None) -> list[Tombstone]:
        """What `prune` left of the events it deleted, ordered by portfolio then seq."""
        sql = f"SELECT {', '.join(TOMBSTONE_COLUMNS)} FROM pruned"
        params: list[Any] = []
        if portfolio is not None:
            sql += f" WHERE portfolio = {self._ph}"
            params.append(portfolio)
        sql += " ORDER BY portfolio, seq, event_id"
        return [
            Tombstone(
                event_id=str(r[0]),
                portfolio=str(r[1]),
                seq=int(r[2]),
                signal_id=None if r[3] is None else str(r[3]),
                type=str(r[4]),
                ts=_as_datetime(r[5]),
                prev_hash=str(r[6]),
                hash=str(r[7]),
                pruned_at=_as_datetime(r[8]),
                cutoff=_as_datetime(r[9]),
            )
            for r in self._fetch(sql, params)
        ]

    def _prunable(self, before: datetime) -> list[str]:
        p = self._ph
        signal_marks = ", ".join([p] * len(TERMINAL_SIGNAL_STATUSES))
        intent_marks = ", ".join([p] * len(TERMINAL_INTENT_STATUSES))
        sql = (
            "SELECT s.signal_id FROM signals s"
            f" WHERE s.status IN ({signal_marks}) AND s.updated_ts < {p}"
            " AND NOT EXISTS (SELECT 1 FROM audit_events e"
            f"   WHERE e.signal_id = s.signal_id AND e.ts >= {p})"
            " AND NOT EXISTS (SELECT 1 FROM intents i"
            f"   WHERE i.signal_id = s.signal_id AND i.status NOT IN ({intent_marks}))"
            " ORDER BY s.signal_id"
        )
        cutoff = self._ts_param(before)
        params = [*TERMINAL_SIGNAL_STATUSES, cutoff, cutoff, *TERMINAL_INTENT_STATUSES]
        return [str(r[0]) for r in self._fetch(sql, params)]

    def prune(self, before: datetime, *, pruned_at: datetime, dry_run: bool = False) -> PruneResult:
        """Delete whole signals that are terminal and whose every event is older than `before`.

        A signal goes only as a whole: its status is terminal, so are all its intents, and none
        of its events (a late report included) is at or after `before`. Each deleted event
        leaves a tombstone in `pruned` in the same transaction, and the database's recorded
        schema version becomes 2 so an orch-worker that cannot read tombstones refuses it.
        Events without a signal (control commands on a portfolio) are never pruned.
        """
        with self._transaction():
            signal_ids = self._prunable(before)
            if dry_run or not signal_ids:
                count = 0
                for start in range(0, len(signal_ids), _ID_CHUNK):
                    chunk = signal_ids[start : start + _ID_CHUNK]
                    marks = ", ".join([self._ph] * len(chunk))
                    count += int(
                        self._fetch(
                            f"SELECT count(*) FROM audit_events WHERE signal_id IN ({marks})",
                            chunk,
                        )[0][0]
                    )
                return PruneResult(tuple(signal_ids), count)
            events = 0
            stamp = (self._ts_param(pruned_at), self._ts_param(before))
            for start in range(0, len(signal_ids), _ID_CHUNK):
                chunk = signal_ids[start : start + _ID_CHUNK]
                marks = ", ".join([self._ph] * len(chunk))
                kept = ", ".join(TOMBSTONE_COLUMNS[:-2])
                self._execute(
                    f"INSERT INTO pruned ({', '.join(TOMBSTONE_COLUMNS)})"
                    f" SELECT {kept}, {self._ph}, {self._ph} FROM audit_events"
                    f" WHERE signal_id IN ({marks}) ON CONFLICT DO NOTHING",
                    [*stamp, *chunk],
                )
                events += self._execute(
                    f"DELETE FROM audit_events WHERE signal_id IN ({marks})", chunk
                )
                self._execute(f"DELETE FROM intents WHERE signal_id IN ({marks})", chunk)
                self._execute(f"DELETE FROM signals WHERE signal_id IN ({marks})", chunk)
            self._execute(
                f"UPDATE schema_meta SET value = {self._ph} WHERE key = 'version'"
                f" AND CAST(value AS INTEGER) < {self._ph}",
                [str(SCHEMA_VERSION), SCHEMA_VERSION],
            )
        log.info("pruned %d signals (%d events) older than %s", len(signal_ids), events, before)
        return PruneResult(tuple(signal_ids), events)

    def _check_version(self, found: str | None) -> None:
        if found is not None and int(found) > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"the audit store has schema version {found}, newer than this orch-worker "
                f"supports ({SCHEMA_VERSION}); upgrade orch-worker"
            )


def _as_datetime(value: object) -> datetime:
    """A timestamp column as an aware datetime (SQLite keeps RFC 3339 text, PostgreSQL not)."""
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _pruned_table_sql(*, ts: str, seq: str) -> str:
    return f"""CREATE TABLE IF NOT EXISTS pruned (
        event_id TEXT PRIMARY KEY,
        portfolio TEXT NOT NULL,
        seq {seq} NOT NULL,
        signal_id TEXT,
        type TEXT NOT NULL,
        ts {ts} NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        pruned_at {ts} NOT NULL,
        cutoff {ts} NOT NULL
    )"""


def _event_table_sql(name: str, *, ts: str, data: str, seq: str, key: str) -> str:
    return f"""CREATE TABLE IF NOT EXISTS {name} (
        event_id TEXT NOT NULL,
        portfolio TEXT NOT NULL,
        seq {seq} NOT NULL,
        ts {ts} NOT NULL,
        type TEXT NOT NULL,
        signal_id TEXT,
        intent_id TEXT,
        account_id TEXT,
        rationale TEXT NOT NULL,
        data {data} NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        schema_version INTEGER NOT NULL,
        PRIMARY KEY ({key})
    )"""


def _state_tables_sql(*, ts: str, seq: str) -> list[str]:
    return [
        f"""CREATE TABLE IF NOT EXISTS signals (
            signal_id TEXT PRIMARY KEY,
            portfolio TEXT NOT NULL,
            status TEXT NOT NULL,
            last_seq {seq} NOT NULL,
            updated_ts {ts} NOT NULL
        )""",
        f"""CREATE TABLE IF NOT EXISTS intents (
            intent_id TEXT PRIMARY KEY,
            portfolio TEXT NOT NULL,
            signal_id TEXT,
            account_id TEXT,
            status TEXT NOT NULL,
            filled_quantity TEXT,
            quantity TEXT,
            last_seq {seq} NOT NULL,
            updated_ts {ts} NOT NULL
        )""",
    ]


# Exactly the indexes the readers use, because every index on audit_events is paid for on every
# event the sink writes: the chain order (verify, `events`), a signal's events (replay, report,
# prune), and the arrival time of signals only (`received_signals`: report and prune ranges), as
# a partial index holding one row per signal rather than one per event.
_INDEXES = [
    "CREATE INDEX IF NOT EXISTS audit_events_chain ON audit_events (portfolio, seq, event_id)",
    "CREATE INDEX IF NOT EXISTS audit_events_signal ON audit_events (signal_id)"
    " WHERE signal_id IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS audit_events_received ON audit_events (ts)"
    " WHERE type = 'signal_received'",
    "CREATE INDEX IF NOT EXISTS intents_signal ON intents (signal_id)",
    "CREATE INDEX IF NOT EXISTS signals_portfolio ON signals (portfolio)",
    "CREATE INDEX IF NOT EXISTS pruned_chain ON pruned (portfolio, seq)",
]

_SCHEMA_META_SQL = (
    "CREATE TABLE IF NOT EXISTS schema_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
)

_SIGNAL_UPSERT_TAIL = """ON CONFLICT (signal_id) DO UPDATE SET
        status = excluded.status,
        last_seq = excluded.last_seq,
        updated_ts = excluded.updated_ts
    WHERE signals.portfolio = excluded.portfolio AND excluded.last_seq > signals.last_seq"""

_INTENT_UPSERT_TAIL = """ON CONFLICT (intent_id) DO UPDATE SET
        signal_id = COALESCE(excluded.signal_id, intents.signal_id),
        account_id = COALESCE(excluded.account_id, intents.account_id),
        status = excluded.status,
        filled_quantity = COALESCE(excluded.filled_quantity, intents.filled_quantity),
        quantity = COALESCE(excluded.quantity, intents.quantity),
        last_seq = excluded.last_seq,
        updated_ts = excluded.updated_ts
    WHERE intents.portfolio = excluded.portfolio AND excluded.last_seq > intents.last_seq"""

_SIGNAL_COLUMNS = "signal_id, portfolio, status, last_seq, updated_ts"
_INTENT_COLUMNS = (
    "intent_id, portfolio, signal_id, account_id, status, filled_quantity, quantity, last_seq,"
    " updated_ts"
)


def _signal_row(s: SignalState, ts: object) -> Row:
    return (s.signal_id, s.portfolio, s.status, s.last_seq, ts)


def _intent_row(i: IntentState, ts: object) -> Row:
    return (
        i.intent_id,
        i.portfolio,
        i.signal_id,
        i.account_id,
        i.status,
        i.filled_quantity,
        i.quantity,
        i.last_seq,
        ts,
    )


# ---------------------------------------------------------------------------------------------
# SQLite


# RFC 3339 UTC with microseconds: exact, and sorts as text in time order. Cached because the
# worker stamps a whole batch of audit events with one time, and strftime is most of the cost of
# turning an event into a row.
_sqlite_ts = functools.lru_cache(maxsize=4096)(format_ts)

_ROW = operator.itemgetter(0)
"""`EventRecord.row`, as a C getter for `map`."""

PAGE_BYTES = 8192
"""SQLite page size of a new audit database."""

CACHE_KIB = 65_536
"""SQLite page cache per connection, in KiB."""

WAL_CHECKPOINT_BYTES = 40 * 1024 * 1024
"""SQLite checkpoints the WAL into the database once it holds about this much."""

_EVENT_LIST = ", ".join(EVENT_COLUMNS)

# A write's rows go first into these tables of the connection's own temporary database (in
# memory), bound row by row, then into the audit tables by one statement each: see
# `SqliteStore._insert_events_and_state`. No constraints: the audit tables enforce theirs.
_SQLITE_STAGES = {
    "audit_stage": _EVENT_LIST,
    "signals_stage": _SIGNAL_COLUMNS,
    "intents_stage": _INTENT_COLUMNS,
}


def _staged(table: str, stage: str, columns: str, tail: str) -> str:
    """Move the rows of `stage`, in the order they were staged, into `table`."""
    # `WHERE true` keeps the parser from reading the conflict clause as a join's ON.
    return (
        f"INSERT INTO {table} ({columns}) SELECT {columns} FROM temp.{stage}"
        f" WHERE true ORDER BY rowid {tail}"
    )


_SQLITE_MOVE_EVENTS = _staged("audit_events", "audit_stage", _EVENT_LIST, "ON CONFLICT DO NOTHING")
_SQLITE_MOVE_SIGNALS = _staged("signals", "signals_stage", _SIGNAL_COLUMNS, _SIGNAL_UPSERT_TAIL)
_SQLITE_MOVE_INTENTS = _staged("intents", "intents_stage", _INTENT_COLUMNS, _INTENT_UPSERT_TAIL)

# SQLite primary result codes that a later attempt can get past: busy/locked by another
# connection, an I/O error, a full disk. Anything else (a missing table, a constraint) is a bug.
_SQLITE_RETRYABLE = {5, 6, 10, 13}


class SqliteStore(_SqlStore):
    """The default store: one file, WAL mode so readers (verify, report) never block the sink.

    One connection, used by one thread at a time (the sink serialises its calls); created with
    `check_same_thread=False` so the sink may do that work off the event loop.
    """

    _ph = "?"

    def __init__(self, path: str, *, busy_timeout_ms: int = 5000) -> None:
        self.path = path
        self._writers = None if path == ":memory:" else WriterLock(f"{path}-writer")
        self._busy_timeout_s = busy_timeout_ms / 1000
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so reads run outside any
        # transaction and a write batch is exactly one transaction.
        self._conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, cached_statements=64
        )
        try:
            # Sinks of one group often start together: one turning a new file to WAL while
            # another does fails at once ("database is locked"), whatever the busy timeout.
            with self._writer_lock():
                self._set_up(path, busy_timeout_ms)
        except BaseException:
            self._conn.close()
            raise

    def _set_up(self, path: str, busy_timeout_ms: int) -> None:
        # Wait this long for another writer's lock before reporting a retryable failure.
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        # Only a new database takes it (an existing one keeps its page size): events are
        # about a kilobyte, and 8 KiB pages make each batch fewer, fuller pages to write.
        self._conn.execute(f"PRAGMA page_size = {PAGE_BYTES}")
        mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if path != ":memory:" and str(mode).lower() != "wal":
            raise AuditStoreError(f"could not put {path} in WAL mode (got {mode!r})")
        # FULL, not NORMAL: the sink commits Kafka offsets right after a write returns, so
        # a transaction that a power loss could still undo would lose events for good. WAL
        # makes that one fsync per transaction, a small share of the sink's transactions of
        # up to a few thousand events. (NORMAL would survive a crash of the process, not of
        # the machine, and measured no clear gain.)
        self._conn.execute("PRAGMA synchronous = FULL")
        # The sink's inserts land all over the event-id index, so they keep re-reading and
        # re-writing the same pages: a page cache that holds the indexes (64 MiB) and a
        # checkpoint every ~40 MB of WAL rather than ~4 MB (each page copied into the
        # database once per checkpoint, however often it changed) cut the CPU of a write
        # by about a fifth. Neither changes what a commit guarantees.
        self._conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        page = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
        self._conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_BYTES // page}")
        # The staging tables of a write (a few MB) stay in memory, never in a temporary file.
        self._conn.execute("PRAGMA temp_store = MEMORY")
        self._create_schema()

    def _create_schema(self) -> None:
        with self._sqlite_transaction():
            for sql in (
                _SCHEMA_META_SQL,
                _event_table_sql(
                    "audit_events", ts="TEXT", data="TEXT", seq="INTEGER", key="event_id"
                ),
                _event_table_sql(
                    "audit_conflicts", ts="TEXT", data="TEXT", seq="INTEGER", key="event_id, hash"
                ),
                *_state_tables_sql(ts="TEXT", seq="INTEGER"),
                _pruned_table_sql(ts="TEXT", seq="INTEGER"),
                *_INDEXES,
                *(f"CREATE TEMP TABLE {t} ({c})" for t, c in _SQLITE_STAGES.items()),
            ):
                self._conn.execute(sql)
            self._conn.execute(
                "INSERT INTO schema_meta (key, value) VALUES ('version', ?)"
                " ON CONFLICT (key) DO NOTHING",
                (str(SCHEMA_VERSION),),
            )
            row = self._conn.execute("SELECT value FROM schema_meta WHERE key = 'version'")
            self._check_version(row.fetchone()[0])

    def close(self) -> None:
        """Release the connection; the store is unusable afterwards."""
        self._conn.close()
        if self._writers is not None:
            self._writers.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._writer_lock(), self._sqlite_transaction():
            yield

    @contextlib.contextmanager
    def _sqlite_transaction(self) -> Iterator[None]:
        try:
            # IMMEDIATE takes the write lock up front, so a busy database fails here (and is
            # retried) instead of half-way through the batch.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._conn.execute("COMMIT")
            except BaseException:
                # Some errors end the transaction themselves; a failed COMMIT leaves it open.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            if (exc.sqlite_errorcode & 0xFF) in _SQLITE_RETRYABLE:
                raise StoreUnavailableError(f"SQLite {self.path}: {exc}") from exc
            raise

    @contextlib.contextmanager
    def _writer_lock(self) -> Iterator[None]:
        if self._writers is None:
            yield
            return
        if not self._writers.acquire(self._busy_timeout_s):
            raise StoreUnavailableError(
                f"SQLite {self.path}: another writer held {self._writers.path} for over "
                f"{self._busy_timeout_s:g}s"
            )
        try:
            yield
        finally:
            self._writers.release()

    def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._conn.execute(sql, params).fetchall()

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return max(self._conn.execute(sql, params).rowcount, 0)

    def _insert_events(self, table: str, records: Sequence[EventRecord]) -> int:
        before = self._conn.total_changes
        self._conn.executemany(
            f"INSERT INTO {table} ({', '.join(EVENT_COLUMNS)})"
            f" VALUES ({', '.join('?' * len(EVENT_COLUMNS))})"
            " ON CONFLICT DO NOTHING",
            map(_ROW, records),
        )
        return self._conn.total_changes - before

    def _prepare(
        self, records: Sequence[EventRecord], signals: list[SignalState], intents: list[IntentState]
    ) -> None:
        """Stage the batch in the connection's temporary tables, outside the write transaction.

        Binding rows one by one holds the GIL between rows, and the sqlite3 module lets go of
        it around each row's insert; with another thread busy (the sink decoding its next
        batch), each row would wait for that thread. So rows are bound into the temporary
        tables first, the cheap part, and the expensive part (the audit tables' indexes, the
        state upserts, COMMIT) runs in a few statements that hold the GIL only between them;
        `in_database` tells the sink when. The temporary tables are the connection's own, so
        staging takes no lock on the audit database: another sink writing to the same file
        goes on meanwhile, and the writer lock is held for the database's work alone.
        """
        self._stage(records, signals, intents, transaction=True)
        if self.in_database is not None:
            self.in_database()

    def _stage(
        self,
        records: Sequence[EventRecord],
        signals: list[SignalState],
        intents: list[IntentState],
        *,
        transaction: bool,
    ) -> None:
        conn = self._conn
        if transaction:  # one for the staging alone: row by row, each insert would be one
            conn.execute("BEGIN")
        try:
            for stage in _SQLITE_STAGES:  # what the previous write staged
                conn.execute(f"DELETE FROM temp.{stage}")
            conn.executemany(
                f"INSERT INTO temp.audit_stage VALUES ({', '.join('?' * len(EVENT_COLUMNS))})",
                map(_ROW, records),
            )
            if signals:
                conn.executemany(
                    "INSERT INTO temp.signals_stage VALUES (?, ?, ?, ?, ?)",
                    [_signal_row(s, s.updated_ts) for s in signals],
                )
            if intents:
                conn.executemany(
                    "INSERT INTO temp.intents_stage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [_intent_row(i, i.updated_ts) for i in intents],
                )
            if transaction:
                conn.execute("COMMIT")
        except BaseException:
            if transaction and conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _insert_events_and_state(
        self,
        records: Sequence[EventRecord],
        signals: list[SignalState],
        intents: list[IntentState],
        *,
        prepared: bool,
    ) -> tuple[int, bool]:
        """Move the staged batch into the audit tables with one statement per table.

        The batch is staged again, inside the transaction, only when it is not what `_prepare`
        staged (pruned events were left out). The state goes in only if every event was new;
        the caller writes it otherwise, once it knows which events conflict.
        """
        conn = self._conn
        if not prepared:
            self._stage(records, signals, intents, transaction=False)
        before = conn.total_changes
        conn.execute(_SQLITE_MOVE_EVENTS)
        new = conn.total_changes - before
        if new < len(records):
            return new, False
        if signals:
            conn.execute(_SQLITE_MOVE_SIGNALS)
        if intents:
            conn.execute(_SQLITE_MOVE_INTENTS)
        return new, True

    def _upsert_state(self, signals: list[SignalState], intents: list[IntentState]) -> None:
        if signals:
            self._conn.executemany(
                f"INSERT INTO signals ({_SIGNAL_COLUMNS}) VALUES (?, ?, ?, ?, ?) "
                + _SIGNAL_UPSERT_TAIL,
                [_signal_row(s, s.updated_ts) for s in signals],
            )
        if intents:
            self._conn.executemany(
                f"INSERT INTO intents ({_INTENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                + _INTENT_UPSERT_TAIL,
                [_intent_row(i, i.updated_ts) for i in intents],
            )

    def _ts_param(self, ts: datetime) -> object:
        return _sqlite_ts(ts)


# ---------------------------------------------------------------------------------------------
# PostgreSQL


_PG_EVENT_TYPES = (
    "text",
    "text",
    "bigint",
    "timestamptz",
    "text",
    "text",
    "text",
    "text",
    "text",
    "json",
    "text",
    "text",
    "integer",
)
_PG_SIGNAL_TYPES = ("text", "text", "text", "bigint", "timestamptz")
_PG_INTENT_TYPES = ("text", "text", "text", "text", "text", "text", "text", "bigint", "timestamptz")


def _unnest(types: Sequence[str]) -> str:
    return "SELECT * FROM unnest(" + ", ".join(f"%b::{t}[]" for t in types) + ")"


def _columns(rows: Sequence[Row], width: int) -> list[list[Any]]:
    """Rows to one list per column: a whole batch becomes one statement with array parameters."""
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


_SCHEMA_LOCK_SQL: Final = "SELECT pg_advisory_xact_lock(hashtext('orch-worker audit schema'))"


class PostgresStore(_SqlStore):
    """The production store: psycopg 3, one statement per table per batch.

    Events go in by COPY straight into `audit_events` (INSERT ... ON CONFLICT from `unnest` of
    column arrays when the batch holds an event already stored); the current-state tables take
    one `unnest` upsert each. The connection is in autocommit mode with explicit transactions
    for writes, so a reader never leaves the session idle in a transaction. A lost connection is
    reopened on the next call.
    """

    _ph = "%s"
    _data_select = "data::text"
    _holds_nul = False
    decodes_beside_writes = True

    def __init__(self, conninfo: str, *, schema: str | None = None) -> None:
        if importlib.util.find_spec("psycopg") is None:  # pragma: no cover - depends on install
            raise AuditStoreError("PostgreSQL needs psycopg 3: pip install 'orch-worker[postgres]'")
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise StoreUrlError(f"schema name {schema!r} must match {_SCHEMA_NAME.pattern}")
        self._conninfo = conninfo
        self.schema = schema
        self._conn: psycopg.Connection[tuple[Any, ...]] = self._connect()
        try:
            self._create_schema()
        except BaseException:
            self._conn.close()
            raise

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        import psycopg

        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.OperationalError as exc:
            raise StoreUnavailableError(
                f"cannot connect to PostgreSQL {_redact(self._conninfo)}: {exc}"
            ) from exc
        if self.schema is not None:
            ident = psycopg.sql.Identifier(self.schema)
            with conn.transaction():
                # CREATE SCHEMA IF NOT EXISTS is not atomic either: of two sinks starting
                # together, one would fail on the schema's unique name without the lock.
                conn.execute(_SCHEMA_LOCK_SQL)
                conn.execute(psycopg.sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
            conn.execute(psycopg.sql.SQL("SET search_path TO {}").format(ident))
        return conn

    def _create_schema(self) -> None:
        with self._transaction():
            # Two sinks starting together would race on CREATE TABLE IF NOT EXISTS (it is not
            # atomic in PostgreSQL); the advisory lock serialises them.
            self._conn.execute(_SCHEMA_LOCK_SQL)
            for sql in (
                _SCHEMA_META_SQL,
                _event_table_sql(
                    "audit_events", ts="TIMESTAMPTZ", data="JSON", seq="BIGINT", key="event_id"
                ),
                _event_table_sql(
                    "audit_conflicts",
                    ts="TIMESTAMPTZ",
                    data="JSON",
                    seq="BIGINT",
                    key="event_id, hash",
                ),
                *_state_tables_sql(ts="TIMESTAMPTZ", seq="BIGINT"),
                _pruned_table_sql(ts="TIMESTAMPTZ", seq="BIGINT"),
                *_INDEXES,
            ):
                self._conn.execute(sql)
            self._conn.execute(
                "INSERT INTO schema_meta (key, value) VALUES ('version', %s)"
                " ON CONFLICT (key) DO NOTHING",
                (str(SCHEMA_VERSION),),
            )
            row = self._conn.execute("SELECT value FROM schema_meta WHERE key = 'version'")
            found = row.fetchone()
            self._check_version(found[0] if found else None)

    def close(self) -> None:
        """Release the connection; the store is unusable afterwards."""
        self._conn.close()

    def _ensure_connected(self) -> None:
        if self._conn.closed or self._conn.broken:
            log.warning("PostgreSQL connection lost; reconnecting")
            self._conn = self._connect()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        import psycopg

        try:
            self._ensure_connected()
            yield
        except (psycopg.OperationalError, psycopg.errors.TransactionRollback) as exc:
            # Connection lost, server shutting down, serialisation failure, deadlock: the
            # transaction rolled back, so retrying the whole batch is safe.
            raise StoreUnavailableError(f"PostgreSQL: {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._guard(), self._conn.transaction():
            yield

    def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with self._guard():
            return self._conn.execute(sql, params).fetchall()

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return max(self._conn.execute(sql, params).rowcount, 0)

    def _insert_events(self, table: str, records: Sequence[EventRecord]) -> int:
        if table == "audit_events" and self._copy_events(records):
            return len(records)
        rows = [_pg_row(r) for r in records]
        cur = self._conn.execute(
            f"INSERT INTO {table} ({', '.join(EVENT_COLUMNS)}) {_unnest(_PG_EVENT_TYPES)}"
            " ON CONFLICT DO NOTHING",
            _columns(rows, len(EVENT_COLUMNS)),
        )
        return max(cur.rowcount, 0)

    def _copy_events(self, records: Sequence[EventRecord]) -> bool:
        """COPY the batch straight into `audit_events` in a savepoint; False if one was stored.

        A batch of new events (nearly every batch) costs the server and us far less as COPY
        than as an INSERT with ON CONFLICT. A batch holding an event already stored (a
        redelivery) fails on the primary key as a whole, rolls back to the savepoint, and the
        caller takes the INSERT ... ON CONFLICT DO NOTHING path, which skips exactly those.
        """
        import psycopg

        try:
            with (
                self._conn.transaction(),
                self._conn.cursor() as cur,
                cur.copy(f"COPY audit_events ({', '.join(EVENT_COLUMNS)}) FROM STDIN") as copy,
            ):
                for r in records:
                    # The stored RFC 3339 text is the exact instant for PostgreSQL too, except
                    # for years before 1000, which format_ts writes without padding.
                    copy.write_row(r.row if len(r.row[3]) == _RFC3339_LENGTH else _pg_row(r))
        except psycopg.errors.UniqueViolation:
            return False
        return True

    def _prepare(
        self, records: Sequence[EventRecord], signals: list[SignalState], intents: list[IntentState]
    ) -> None:
        """Nothing: a batch goes to the server whole, inside its transaction (COPY, upserts)."""

    def _stored_hashes(self, event_ids: set[str], table: str = "audit_events") -> dict[str, str]:
        rows = self._conn.execute(
            f"SELECT event_id, hash FROM {table} WHERE event_id = ANY(%b::text[])",
            [sorted(event_ids)],
        ).fetchall()
        return {str(r[0]): str(r[1]) for r in rows}

    def _upsert_state(self, signals: list[SignalState], intents: list[IntentState]) -> None:
        # One statement may not update a row twice, and ids are keys on their own: the rare
        # id that two portfolios share in one batch goes in a statement of its own.
        for part in _unique(signals, _SIGNAL_ID):
            rows = [_signal_row(s, s.updated_at) for s in part]
            self._conn.execute(
                f"INSERT INTO signals ({_SIGNAL_COLUMNS}) {_unnest(_PG_SIGNAL_TYPES)} "
                + _SIGNAL_UPSERT_TAIL,
                _columns(rows, len(_PG_SIGNAL_TYPES)),
            )
        for batch in _unique(intents, _INTENT_ID):
            rows = [_intent_row(i, i.updated_at) for i in batch]
            self._conn.execute(
                f"INSERT INTO intents ({_INTENT_COLUMNS}) {_unnest(_PG_INTENT_TYPES)} "
                + _INTENT_UPSERT_TAIL,
                _columns(rows, len(_PG_INTENT_TYPES)),
            )

    def _ts_param(self, ts: datetime) -> object:
        return ts  # timestamptz keeps microseconds; it comes back as the same instant


_RFC3339_LENGTH = len("2000-01-01T00:00:00.000000Z")

_SIGNAL_ID = operator.attrgetter("signal_id")
_INTENT_ID = operator.attrgetter("intent_id")


def _pg_row(r: EventRecord) -> Row:
    """The record's row with `ts` as a datetime, for binary parameters and old years."""
    row = r.row
    return (*row[:3], r.at, *row[4:])


def _unique(items: list[_T], key: Callable[[_T], str]) -> Iterator[list[_T]]:
    """`items` in parts whose keys are unique, in order: one part unless a key repeats."""
    while items:
        seen: set[str] = set()
        part: list[_T] = []
        rest: list[_T] = []
        for item in items:
            k = key(item)
            (rest if k in seen else part).append(item)
            seen.add(k)
        yield part
        items = rest
