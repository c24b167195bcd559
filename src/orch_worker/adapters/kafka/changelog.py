"""The worker's changelog: its decisions, written before their effects (an outbox).

Commit order, written down once:
  1. append a `decision` record per input that changed state: the changed signal states, the
     portfolio header (audit chain head, halts, pauses) and every output it will publish;
     a signal that was open before the decision is written as a patch of what changed (its
     small fields and the intents that are new or changed), not whole;
  2. publish the outputs;
  3. append a `done` record naming the finished outboxes;
  4. commit the input offsets.
A crash before 1 redelivers the input and the decision is taken again; a crash between 1 and 3
leaves an outbox that start-up republishes verbatim (same ids, same hashes); after 4 nothing is
redone. Records are keyed by portfolio, so one portfolio's history lives in one partition, in
order. Correctness never depends on compaction.

Ownership epochs: a worker that takes a partition over appends a fence record carrying the
group generation it was assigned in (its epoch), and stamps every decision it writes there with
that epoch. A decision stamped with an epoch older than a fence before it in the partition was
written by a worker that had lost the partition already (a process frozen or cut off mid-publish
whose records arrived late): folding skips it, and its outbox is never republished.

Snapshots: every `worker.snapshot_every` decisions of a partition, the owner appends the whole
state of that partition's portfolios, in parts (`snapshot_parts`), after the done markers of
the round that made it, so every outbox before it is finished. Recovery then reads only from
the newest complete snapshot (`SnapshotScan` finds it in the tail of the partition) instead of
the whole history, and restart time stops growing with the age of the log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from orch_worker.domain.coordinator import IntentState, SignalState
from orch_worker.domain.decider import PortfolioState
from orch_worker.domain.models import OrderIntent
from orch_worker.domain.recovery import AccountHealth


@dataclass(frozen=True, slots=True)
class OutRecord:
    topic: str
    key: str | None
    value: bytes
    headers: tuple[tuple[str, str], ...] = ()
    partition: int | None = None


SNAPSHOT_PART_BYTES = 64 * 1024
"""Signals per snapshot part are cut at about this much JSON: records stay far below the
broker's message limit, compressed or not, and building one holds the loop (and a due
release) for about a millisecond."""
FORGOTTEN_PER_PART = 4_000
"""Forgotten signal ids per snapshot part (about 70 bytes each)."""
SNAPSHOT_PREFIX = b'{"type":"snapshot"'
"""Snapshot parts start so (orjson keeps key order): a scan tells them apart unparsed."""


def _header(state: PortfolioState) -> dict[str, Any]:
    return {
        "audit_seq": state.audit_seq,
        "audit_hash": state.audit_hash,
        "halted": state.halted,
        "paused_accounts": sorted(state.paused_accounts),
        "account_health": {
            a: h.model_dump(mode="json") for a, h in sorted(state.account_health.items())
        },
    }


def _dump(st: SignalState) -> bytes:
    return st.model_dump_json().encode()


_PARTS: set[str] = {"signal", "plan", "intents"}
_INTENT_PARTS: set[str] = {"intent"}


@dataclass(slots=True)
class _Pieces:
    """The JSON of one signal's parts, each with the immutable object it was made from."""

    whole: tuple[SignalState, bytes] | None = None
    signal: tuple[object, bytes] | None = None
    plan: tuple[object, bytes] | None = None
    intents: dict[str, tuple[IntentState, bytes]] = field(default_factory=dict)
    orders: dict[str, tuple[OrderIntent, bytes]] = field(default_factory=dict)


class StateDumper:
    """Serialises signal states from cached JSON of their unchanged parts.

    A decision record carries the whole state of every signal it changed, but a decision
    changes little: a release moves one intent of five, and the signal and its plan (half the
    bytes) never change after planning. States are immutable and share unchanged parts, so a
    part's JSON is kept with the object it came from and reused while the state still holds
    that very object: a release serialises one intent's status, not the signal. The result
    parses to exactly what `model_dump_json` gives (key order aside)."""

    def __init__(self) -> None:
        self._signals: dict[str, _Pieces] = {}

    def __len__(self) -> int:
        return len(self._signals)

    def _pieces(self, sid: str) -> _Pieces:
        pieces = self._signals.get(sid)
        if pieces is None:
            pieces = self._signals[sid] = _Pieces()
        return pieces

    def __call__(self, st: SignalState) -> bytes:
        pieces = self._pieces(st.signal.signal_id)
        if pieces.whole is not None and pieces.whole[0] is st:
            return pieces.whole[1]
        signal = pieces.signal
        if signal is None or signal[0] is not st.signal:
            signal = pieces.signal = (st.signal, st.signal.model_dump_json().encode())
        plan = pieces.plan
        if plan is None or plan[0] is not st.plan:
            plan = pieces.plan = (st.plan, st.plan.model_dump_json().encode())
        intents = [self._intent(pieces, i) for i in st.intents]
        rest = st.model_dump_json(exclude=_PARTS).encode()
        raw = b"".join(
            (
                b'{"signal":',
                signal[1],
                b',"plan":',
                plan[1],
                b',"intents":[',
                b",".join(intents),
                b"]",
                b"," if len(rest) > 2 else b"",
                rest[1:],
            )
        )
        pieces.whole = (st, raw)
        return raw

    def patch(self, before: SignalState, st: SignalState) -> bytes | None:
        """`st` as a patch of `before` (see `apply_patch`), or None when it must be written
        whole: the signal or plan changed, intents went missing, or `before` was finished
        (recovery may have let a finished signal go before reading the patch)."""
        if (
            before.status.terminal
            or before.signal is not st.signal
            or before.plan is not st.plan
            or len(st.intents) < len(before.intents)
        ):
            return None
        sid = st.signal.signal_id
        pieces = self._pieces(sid)
        old = before.intents
        changed = [
            b"[%d,%s]" % (k, self._intent(pieces, i))
            for k, i in enumerate(st.intents)
            if k >= len(old) or old[k] is not i
        ]
        return b"".join(
            (
                b'{"signal_id":',
                orjson.dumps(sid),
                b',"set":',
                st.model_dump_json(exclude=_PARTS).encode(),
                b',"intents":[',
                b",".join(changed),
                b"]}",
            )
        )

    @staticmethod
    def _intent(pieces: _Pieces, i: IntentState) -> bytes:
        iid = i.intent.intent_id
        cached = pieces.intents.get(iid)
        if cached is not None and cached[0] is i:
            return cached[1]
        order = pieces.orders.get(iid)
        if order is None or order[0] is not i.intent:
            order = pieces.orders[iid] = (i.intent, i.intent.model_dump_json().encode())
        rest = i.model_dump_json(exclude=_INTENT_PARTS).encode()
        raw = b"".join((b'{"intent":', order[1], b"," if len(rest) > 2 else b"", rest[1:]))
        pieces.intents[iid] = (i, raw)
        return raw

    def forget(self, signal_id: str) -> None:
        self._signals.pop(signal_id, None)

    def keep(self, signal_ids: set[str]) -> None:
        """Drop every signal not named (after recovery replaced the states)."""
        self._signals = {s: p for s, p in self._signals.items() if s in signal_ids}


def snapshot_parts(
    snap_id: str,
    states: Sequence[PortfolioState],
    epoch: int | None,
    dump: Callable[[SignalState], bytes] = _dump,
) -> Iterator[bytes]:
    """The records of one snapshot: part 0 holds every portfolio's header, the next parts its
    signals; the last part says so. A generator, so the caller can yield between parts.
    `dump` may cache: a finished signal's state never changes between snapshots."""
    base = {"type": "snapshot", "snap": snap_id, "epoch": epoch}
    yield orjson.dumps(
        {
            **base,
            "part": 0,
            "last": not any(st.signals or st.forgotten for st in states),
            "portfolios": [
                {
                    "portfolio": st.portfolio,
                    "header": _header(st),
                    "seen_commands": list(st.seen_commands),
                }
                for st in states
            ],
        }
    )
    # Parts are built one ahead of the one yielded (to know which is last), never all at once:
    # the caller yields to the loop between parts, and dumping thousands of signals in one go
    # would hold the loop for as long as they take.
    chunks = _chunks(states, dump)
    current = next(chunks, None)
    n = 0
    while current is not None:
        following = next(chunks, None)
        n += 1
        portfolio, field, items = current
        yield orjson.dumps(
            {
                **base,
                "part": n,
                "last": following is None,
                "portfolio": portfolio,
                field: [orjson.Fragment(raw) for raw in items],
            }
        )
        current = following


def _chunks(
    states: Sequence[PortfolioState], dump: Callable[[SignalState], bytes]
) -> Iterator[tuple[str, str, list[bytes]]]:
    """(portfolio, field, items) of every part after part 0, in order, built as they are asked
    for. Forgotten ids grow with throughput (tens of thousands within max_signal_age_s): they
    go in parts of their own, each well below the broker's message limit."""
    for st in states:
        ids: list[bytes] = []
        for sid, at in st.forgotten.items():
            ids.append(orjson.dumps([sid, at.isoformat()]))
            if len(ids) == FORGOTTEN_PER_PART:
                yield st.portfolio, "forgotten", ids
                ids = []
        if ids:
            yield st.portfolio, "forgotten", ids
    for st in states:
        cut: list[bytes] = []
        size = 0
        for sig in st.signals.values():
            raw = dump(sig)
            if cut and size + len(raw) > SNAPSHOT_PART_BYTES:
                yield st.portfolio, "signals", cut
                cut, size = [], 0
            cut.append(raw)
            size += len(raw)
        if cut:
            yield st.portfolio, "signals", cut


@dataclass
class SnapshotScan:
    """Finds, in a partition's records read in order, where the newest usable snapshot starts.

    Usable: complete (every part up to the last one present) and not written by a deposed
    owner (its epoch below a fence seen before it). Only snapshot parts and fences are parsed.
    """

    start: int | None = None
    """Offset of part 0 of the newest usable snapshot found so far."""
    _epoch: int | None = None
    _parts: dict[str, tuple[int, int, int | None]] = field(default_factory=dict)
    """Snapshot id -> (offset of part 0, parts seen, its epoch)."""

    def feed(self, offset: int, value: bytes) -> None:
        if value.startswith(b'{"type":"fence"'):
            epoch = orjson.loads(value).get("epoch")
            if isinstance(epoch, int) and (self._epoch is None or epoch > self._epoch):
                self._epoch = epoch
            return
        if not value.startswith(SNAPSHOT_PREFIX):
            return
        doc = orjson.loads(value)
        epoch = doc.get("epoch")
        if isinstance(epoch, int) and self._epoch is not None and epoch < self._epoch:
            return
        snap, part = doc["snap"], doc["part"]
        if part == 0:
            self._parts[snap] = (offset, 1, epoch)
        elif snap in self._parts and self._parts[snap][1] == part:
            first, seen, e = self._parts[snap]
            self._parts[snap] = (first, seen + 1, e)
        else:
            self._parts.pop(snap, None)  # a part missing: this snapshot is unusable
            return
        if doc["last"]:
            self.start = self._parts.pop(snap)[0]


def decision_record(
    outbox_id: str,
    state: PortfolioState,
    changed: tuple[str, ...],
    command_id: str | None,
    outbox: list[OutRecord],
    *,
    epoch: int | None = None,
    dump: StateDumper | None = None,
    before: PortfolioState | None = None,
) -> bytes:
    """`before`: the portfolio before the decision, whose open signals are written as patches.
    `dump` may cache: the worker keeps each signal's JSON for its next snapshot, so the state
    a release writes is serialised once, not once here and again for the snapshot."""
    dump = dump or StateDumper()
    whole: list[orjson.Fragment] = []
    patches: list[orjson.Fragment] = []
    for sid in changed:
        st = state.signals[sid]
        prior = before.signals.get(sid) if before is not None else None
        patch = dump.patch(prior, st) if prior is not None else None
        if patch is None:
            whole.append(orjson.Fragment(dump(st)))
        else:
            patches.append(orjson.Fragment(patch))
    return orjson.dumps(
        {
            "type": "decision",
            "epoch": epoch,
            "outbox_id": outbox_id,
            "portfolio": state.portfolio,
            "header": _header(state),
            "command_id": command_id,
            "signals": whole,
            "patches": patches,
            "outbox": [
                {"topic": r.topic, "key": r.key, "value": r.value.decode("utf-8")} for r in outbox
            ],
        }
    )


def done_record(outbox_ids: list[str]) -> bytes:
    return orjson.dumps({"type": "done", "outbox_ids": outbox_ids})


def fence_record(epoch: int | None) -> bytes:
    return orjson.dumps({"type": "fence", "epoch": epoch})


@dataclass
class Recovered:
    """What the changelog folds into. Signal states are validated lazily: a signal is written
    once per decision about it, and only its last state before a `settle` is ever used, so a
    long history costs one JSON parse per record and one validation per signal."""

    _portfolios: dict[str, PortfolioState] = field(default_factory=dict)
    _raw: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """Portfolio -> signal id -> its newest state, not yet validated."""
    _header: dict[str, dict[str, Any]] = field(default_factory=dict)
    _commands: dict[str, list[str]] = field(default_factory=dict)
    pending: dict[str, list[OutRecord]] = field(default_factory=dict)
    pending_portfolio: dict[str, str] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    """Done markers seen before their decision (only possible across partitions)."""
    records: int = 0
    epochs: dict[int, int] = field(default_factory=dict)
    """Partition -> the newest ownership epoch fenced so far."""
    deposed: int = 0
    """Decisions skipped: written by a worker that no longer owned their partition."""
    snapshots: int = 0
    """Complete snapshots applied."""
    _snap: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Snapshot id -> its parts folded so far."""

    @property
    def portfolios(self) -> dict[str, PortfolioState]:
        """The folded portfolios (settled first); entries may be replaced in place."""
        self.settle()
        return self._portfolios

    def settle(self) -> None:
        """Build the portfolio states from what was folded since the last call."""
        for name in set(self._raw) | set(self._header) | set(self._commands):
            pf = self._portfolios.get(name) or PortfolioState(portfolio=name)
            update: dict[str, Any] = {}
            raw = self._raw.pop(name, None)
            if raw:
                signals = dict(pf.signals)
                for sid, doc in raw.items():
                    signals[sid] = SignalState.model_validate(doc)
                update["signals"] = signals
            h = self._header.pop(name, None)
            if h is not None:
                update |= {
                    "audit_seq": h["audit_seq"],
                    "audit_hash": h["audit_hash"],
                    "halted": h["halted"],
                    "paused_accounts": frozenset(h["paused_accounts"]),
                    "account_health": {
                        a: AccountHealth.model_validate(v)
                        for a, v in h.get("account_health", {}).items()
                    },
                }
            commands = self._commands.pop(name, None)
            if commands:
                update["seen_commands"] = (*pf.seen_commands, *commands)
            self._portfolios[name] = pf.model_copy(update=update)

    def pending_by_portfolio(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for oid in self.pending:
            out.setdefault(self.pending_portfolio[oid], []).append(oid)
        return out


def fold(rec: Recovered, value: bytes, partition: int = 0) -> None:
    """Apply one changelog record to the recovered state (records arrive in partition order)."""
    rec.records += 1
    doc: dict[str, Any] = orjson.loads(value)
    if doc["type"] == "fence":  # a reader's end marker (see reader.py): no state
        rec.records -= 1
        epoch = doc.get("epoch")
        if isinstance(epoch, int) and epoch > rec.epochs.get(partition, epoch - 1):
            rec.epochs[partition] = epoch
        return
    if doc["type"] == "done":
        for oid in doc["outbox_ids"]:
            if rec.pending.pop(oid, None) is None:
                rec.done.add(oid)
        return
    epoch = doc.get("epoch")
    if isinstance(epoch, int) and epoch < rec.epochs.get(partition, epoch):
        rec.deposed += 1
        return
    if doc["type"] == "snapshot":
        _fold_snapshot(rec, doc, partition)
        return
    name = doc["portfolio"]
    raw = rec._raw.setdefault(name, {})
    for st in doc["signals"]:
        raw[st["signal"]["signal_id"]] = st
    for patch in doc.get("patches", ()):
        _fold_patch(rec, name, patch, partition)
    rec._header[name] = doc["header"]
    if doc.get("command_id"):
        rec._commands.setdefault(name, []).append(doc["command_id"])
    if doc["outbox"] and doc["outbox_id"] not in rec.done:
        rec.pending_portfolio[doc["outbox_id"]] = name
        rec.pending[doc["outbox_id"]] = [
            OutRecord(o["topic"], o["key"], o["value"].encode("utf-8")) for o in doc["outbox"]
        ]


def _fold_patch(rec: Recovered, name: str, patch: dict[str, Any], partition: int) -> None:
    raw = rec._raw.setdefault(name, {})
    sid = patch["signal_id"]
    base = raw.get(sid)
    if base is None:  # folded into a settled state already
        settled = rec._portfolios.get(name)
        state = settled.signals.get(sid) if settled is not None else None
        if state is None:
            raise BrokenChangelogError(
                f"partition {partition}: a patch of signal {sid} of {name} without the "
                "signal's state before it"
            )
        base = orjson.loads(state.model_dump_json())
    raw[sid] = apply_patch(base, patch)


class BrokenChangelogError(ValueError):
    """The changelog cannot be folded: a record refers to state that is not before it."""


def apply_patch(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A signal's JSON state with a patch applied: its small fields replaced, each listed
    intent set at its index (the next index appends)."""
    intents = list(base["intents"])
    for k, intent in patch["intents"]:
        if k < len(intents):
            intents[k] = intent
        elif k == len(intents):
            intents.append(intent)
        else:
            raise BrokenChangelogError(
                f"a patch of signal {patch['signal_id']} sets intent {k} of {len(intents)}"
            )
    return {**base, **patch["set"], "intents": intents}


def _fold_snapshot(rec: Recovered, doc: dict[str, Any], partition: int) -> None:
    """Collect a snapshot's parts; at its last part, it replaces its portfolios' state."""
    rec.records -= 1  # a snapshot is state, not a decision
    epoch = doc.get("epoch")
    if isinstance(epoch, int) and epoch > rec.epochs.get(partition, epoch - 1):
        # Read from a snapshot, the fences before it are unseen: its writer's epoch stands in.
        rec.epochs[partition] = epoch
    parts = rec._snap.setdefault(doc["snap"], [])
    if doc["part"] != len(parts):
        rec._snap.pop(doc["snap"], None)  # a part missing (cut off by a crash): unusable
        return
    parts.append(doc)
    if not doc["last"]:
        return
    del rec._snap[doc["snap"]]
    signals: dict[str, dict[str, Any]] = {}
    forgotten: dict[str, dict[str, datetime]] = {}
    for part in parts[1:]:
        if "forgotten" in part:
            gone = forgotten.setdefault(part["portfolio"], {})
            for sid, at in part["forgotten"]:
                gone[sid] = datetime.fromisoformat(at)
            continue
        by_id = signals.setdefault(part["portfolio"], {})
        for st in part["signals"]:
            by_id[st["signal"]["signal_id"]] = st
    for p in parts[0]["portfolios"]:
        name = p["portfolio"]
        rec._raw.pop(name, None)
        rec._header[name] = p["header"]
        rec._commands.pop(name, None)
        rec._portfolios[name] = PortfolioState(
            portfolio=name,
            seen_commands=tuple(p["seen_commands"]),
            forgotten=forgotten.get(name, {}),
        )
        rec._raw[name] = signals.get(name, {})
        # Everything before a snapshot was finished: no outbox of these portfolios is pending.
        for oid in [o for o, pf in rec.pending_portfolio.items() if pf == name]:
            rec.pending.pop(oid, None)
            rec.pending_portfolio.pop(oid, None)
    rec.snapshots += 1
