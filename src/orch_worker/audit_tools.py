"""`orch-worker audit verify` and `audit prune`: is the stored trail intact and complete?

Intact: every portfolio's events form an unbroken hash chain (no gap, no altered row, no fork).
Complete: every released intent reached a terminal state and every signal a final result.

Pruned signals (retention, `audit prune`) leave a tombstone per deleted event holding its seq,
hash and prev_hash: verify walks each chain over stored events and tombstones together, so a
pruned stretch is an accounted-for gap, while any other missing or altered event still breaks
the chain. The content of a pruned event can no longer be checked, only its place in the chain.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from orch_worker.adapters.db.store import PruneResult, Tombstone, open_store
from orch_worker.domain.audit import GENESIS_HASH, event_hash
from orch_worker.domain.coordinator import TERMINAL
from orch_worker.domain.models import AuditEvent, ResultStatus

TERMINAL_INTENT = frozenset(s.value for s in TERMINAL)
TERMINAL_SIGNAL = frozenset(s.value for s in ResultStatus if s.terminal)


@dataclass
class VerifyReport:
    events: int = 0
    portfolios: int = 0
    signals: int = 0
    intents: int = 0
    pruned: int = 0
    """Events removed by retention, accounted for by their tombstones."""
    breaks: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaks and not self.incomplete

    def text(self) -> str:
        head = (
            f"{self.events} events, {self.portfolios} portfolios, {self.signals} signals, "
            f"{self.intents} intents"
        )
        if self.pruned:
            head += f" ({self.pruned} pruned events accounted for by tombstones)"
        if self.ok:
            return f"OK: {head}; every chain intact, every intent and signal terminal"
        lines = [f"FAILED: {head}"]
        lines += [f"  chain: {b}" for b in self.breaks]
        lines += [f"  incomplete: {i}" for i in self.incomplete[:50]]
        if len(self.incomplete) > 50:
            lines.append(f"  ... and {len(self.incomplete) - 50} more")
        return "\n".join(lines)


def verify_with_gaps(events: Iterable[AuditEvent], tombstones: Iterable[Tombstone]) -> str | None:
    """`verify_chain` over stored events and the tombstones of pruned ones, merged by seq.

    A tombstone stands for its event in the chain: its prev_hash must link to the previous
    hash and the next event must link to its hash; only its content can no longer be checked.
    """
    merged: list[AuditEvent | Tombstone] = [*events, *tombstones]
    merged.sort(key=lambda x: x.seq)
    prev, expected_seq = GENESIS_HASH, 1
    for e in merged:
        what = "pruned event" if isinstance(e, Tombstone) else "event"
        if e.seq != expected_seq:
            return f"seq {e.seq}: expected seq {expected_seq} (missing or duplicated event)"
        if e.prev_hash != prev:
            return (
                f"seq {e.seq} ({what} {e.event_id}): prev_hash does not match the previous "
                "event's hash"
            )
        if isinstance(e, AuditEvent) and event_hash(e) != e.hash:
            return f"seq {e.seq} ({e.event_id}): hash does not match its content (altered)"
        prev, expected_seq = e.hash, e.seq + 1
    return None


def verify_store(url: str) -> VerifyReport:
    store = open_store(url)
    report = VerifyReport()
    try:
        portfolios = sorted(set(store.portfolios()) | {t.portfolio for t in store.tombstones()})
        for portfolio in portfolios:
            report.portfolios += 1
            events = list(store.events(portfolio=portfolio))
            tombstones = store.tombstones(portfolio)
            report.events += len(events)
            report.pruned += len(tombstones)
            broken = verify_with_gaps(events, tombstones)
            if broken:
                report.breaks.append(f"{portfolio}: first break at {broken}")
            for c in store.conflicts():
                if c.portfolio == portfolio:
                    report.breaks.append(
                        f"{portfolio}: event {c.event_id} (seq {c.seq}) was forked"
                    )
            signal_ids = sorted(
                {e.signal_id for e in events if e.signal_id and e.type == "signal_received"}
            )
            for sid in signal_ids:
                report.signals += 1
                status = store.signal_status(sid)
                if status not in TERMINAL_SIGNAL:
                    report.incomplete.append(f"signal {sid} is {status or 'unknown'}, not final")
                for iid, istatus in sorted(store.intent_statuses(sid).items()):
                    report.intents += 1
                    if istatus not in TERMINAL_INTENT:
                        report.incomplete.append(f"intent {iid} of {sid} is {istatus}")
    finally:
        store.close()
    return report


def prune_cutoff(
    before: datetime | None, retention_days: float | None, now: datetime
) -> datetime | None:
    """The prune cutoff: `before` if given, else now minus the configured retention, else None.

    None means keep everything: retention is a policy someone configured or asked for, never a
    default.
    """
    if before is not None:
        return before if before.tzinfo is not None else before.replace(tzinfo=UTC)
    if retention_days is None:
        return None
    return now - timedelta(days=retention_days)


def prune_store(url: str, before: datetime, *, dry_run: bool = False) -> PruneResult:
    """Delete whole terminal signals older than `before`, leaving tombstones (see the store)."""
    with open_store(url) as store:
        return store.prune(before, pruned_at=datetime.now(UTC), dry_run=dry_run)
