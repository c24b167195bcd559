"""`orch-worker replay SIGNAL_ID`: one signal's story from the audit store, and its plan re-made.

The timeline is every stored event of the signal in chain order, with the plan, the exclusions
and their reasons, the releases, the fills and the result spelled out. The re-run feeds the
inputs the worker recorded in `plan_created` / `signal_rejected` (the signal, every account state
the planner saw, the `PlanContext`, the configuration snapshot; see `domain.recording`) to the
current `plan_signal` and compares the result with the recorded plan field by field. Same plan:
exit 0. Any difference: every differing field is printed and the exit status is 1, because a
planner that no longer reproduces its own decisions is a change someone must look at.

`--config FILE` swaps the recorded configuration for a file's, to ask what today's configuration
would have done with the same signal and states; the differences are then expected, and printed
the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from orch_worker.adapters.db.store import AuditStore
from orch_worker.domain.config import OrchConfig
from orch_worker.domain.models import AccountState, AuditEvent, Signal
from orch_worker.domain.planner import PlanContext, plan_signal
from orch_worker.domain.recording import (
    config_digest,
    config_from_snapshot,
    config_snapshot,
    plan_context_from_record,
)
from orch_worker.domain.types import format_ts

PLAN_EVENTS = ("plan_created", "signal_rejected")

EXIT_SAME = 0
EXIT_DIFFERENT = 1
EXIT_CANNOT = 2


class ReplayError(Exception):
    """The store does not hold what a replay needs (unknown signal, inputs not recorded)."""


@dataclass(slots=True)
class ReplayOutcome:
    """The re-run's verdict: the differences (empty = same plan) and notes on how it ran."""

    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    replayed: bool = True
    """False when there was nothing to re-run (the worker refused the signal before planning)."""

    @property
    def same(self) -> bool:
        return not self.differences


# -- field-by-field comparison ------------------------------------------------------------------


def _by_account(items: list[Any]) -> dict[str, Any] | None:
    """The list keyed by `account_id` when every item has one (and they are unique)."""
    keys = [x.get("account_id") if isinstance(x, dict) else None for x in items]
    named = [k for k in keys if isinstance(k, str)]
    if not items or len(named) < len(items) or len(set(named)) < len(named):
        return None
    return dict(zip(named, items, strict=True))


def _same_scalar(a: Any, b: Any) -> bool:
    """Equal, with decimal strings compared as numbers ("0.50" is "0.5")."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str):
        try:
            return Decimal(a) == Decimal(b)
        except InvalidOperation:
            return False
    return False


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 200 else text[:197] + "..."


def _diff_keyed(
    recorded: Mapping[Any, Any], replayed: Mapping[Any, Any], path: Callable[[Any], str]
) -> list[str]:
    out: list[str] = []
    for k in [*recorded, *(k for k in replayed if k not in recorded)]:
        where = path(k)
        if k not in replayed:
            out.append(f"{where}: recorded {_show(recorded[k])}, absent in the replay")
        elif k not in recorded:
            out.append(f"{where}: absent in the record, replay {_show(replayed[k])}")
        else:
            out += diff_json(recorded[k], replayed[k], where)
    return out


def diff_json(recorded: Any, replayed: Any, path: str = "") -> list[str]:
    """Every difference between two JSON values, one line per field, with its path.

    Lists of objects with an `account_id` are matched by account (so one missing allocation is
    one line, not a shifted list); other lists by position.
    """
    if isinstance(recorded, dict) and isinstance(replayed, dict):
        return _diff_keyed(recorded, replayed, lambda k: f"{path}.{k}" if path else str(k))
    if isinstance(recorded, list) and isinstance(replayed, list):
        a, b = _by_account(recorded), _by_account(replayed)
        if a is not None and b is not None:
            out = _diff_keyed(a, b, lambda k: f"{path}[{k}]")
            if not out and list(a) != list(b):
                out.append(f"{path}: order differs: recorded {list(a)}, replay {list(b)}")
            return out
        return _diff_keyed(
            dict(enumerate(recorded)), dict(enumerate(replayed)), lambda i: f"{path}[{i}]"
        )
    if _same_scalar(recorded, replayed):
        return []
    return [f"{path or '(whole)'}: recorded {_show(recorded)}, replay {_show(replayed)}"]


# -- the re-run ---------------------------------------------------------------------------------


def plan_record(events: Sequence[AuditEvent]) -> AuditEvent:
    """The signal's `plan_created` or `signal_rejected` event."""
    found = [e for e in events if e.type in PLAN_EVENTS]
    if not found:
        raise ReplayError("no plan_created or signal_rejected event: nothing to replay")
    return found[-1]


def _states(data: Mapping[str, Any], events: Sequence[AuditEvent]) -> dict[str, AccountState]:
    """Every recorded state: the plan event's, and a large portfolio's `plan_inputs` parts."""
    raw: dict[str, Any] = {**data.get("account_states", {}), **data.get("other_account_states", {})}
    parts = [e for e in events if e.type == "plan_inputs"]
    wanted = data.get("other_account_states_parts", 0)
    if len({e.data.get("part") for e in parts}) != wanted:
        raise ReplayError(
            f"the plan's inputs were recorded in {wanted} plan_inputs events, "
            f"{len(parts)} are in the store (pruned or lost)"
        )
    for e in parts:
        raw.update(e.data.get("other_account_states", {}))
    return {a: AccountState.model_validate(s) for a, s in sorted(raw.items())}


def replay_plan(events: Sequence[AuditEvent], config: OrchConfig | None = None) -> ReplayOutcome:
    """Re-make the recorded plan and compare; `config` replaces the recorded configuration.

    Raises:
        ReplayError: the inputs were not recorded and no configuration was given.
    """
    record = plan_record(events)
    data = record.data
    signal = Signal.model_validate(data["signal"])
    outcome = ReplayOutcome()
    if "plan_context" not in data:
        # Recorded before the worker kept the planner's context and configuration.
        if config is None:
            raise ReplayError(
                "this signal was recorded without its configuration and planning context "
                "(an older worker); pass --config to replay it against a configuration file"
            )
        rotation = data["plan"].get("numbers", {}).get("rotation", 0)
        ctx = PlanContext(now=record.ts, rotation=int(rotation))
        outcome.notes.append(
            "older record: planning time taken from the event, rotation from the plan, "
            "paused accounts unknown, and only the allocated accounts' states were recorded"
        )
    elif data["plan_context"] is None:
        outcome.replayed = False
        outcome.notes.append(
            "the worker refused this signal before planning "
            f"({data['plan'].get('rejected_reason')}): there is no plan to re-make"
        )
        return outcome
    else:
        ctx = plan_context_from_record(data["plan_context"])
    snapshot = data.get("config")
    if snapshot is not None:
        digest = config_digest(snapshot)
        if digest != data.get("config_digest"):
            outcome.differences.append(
                f"config_digest: recorded {data.get('config_digest')}, but the recorded "
                f"configuration hashes to {digest}"
            )
    if config is None:
        config = config_from_snapshot(snapshot or {})
        outcome.notes.append(f"configuration: as recorded (digest {data['config_digest'][:16]})")
    else:
        today = config_snapshot(config, signal.portfolio)
        outcome.notes.append(f"configuration: given file (digest {config_digest(today)[:16]})")
        if snapshot is not None:
            changed = diff_json(snapshot, today, "config")
            outcome.notes += [f"  changed since the record: {c}" for c in changed] or [
                "  same as recorded"
            ]
    plan = plan_signal(signal, _states(data, events), config, ctx)
    outcome.differences += diff_json(data["plan"], plan.model_dump(mode="json"), "plan")
    return outcome


# -- the timeline -------------------------------------------------------------------------------


def _event_line(e: AuditEvent) -> str:
    return f"  {format_ts(e.ts)}  #{e.seq:<6} {e.type:<18} {e.account_id or '-':<10} {e.rationale}"


def _plan_lines(record: AuditEvent) -> list[str]:
    plan = record.data.get("plan", {})
    lines = [
        f"plan ({plan.get('method')}): requested {plan.get('requested')}, "
        f"{len(plan.get('allocations', []))} accounts, {len(plan.get('exclusions', []))} excluded"
    ]
    if plan.get("rejected_reason"):
        lines.append(f"  rejected: {plan['rejected_reason']}")
    for a in plan.get("allocations", []):
        lines.append(f"  {a['account_id']:<12} {a['quantity']:>10}  {a['rationale']}")
    for x in plan.get("exclusions", []):
        lines.append(f"  {x['account_id']:<12} {'excluded':>10}  {'; '.join(x['reasons'])}")
    if plan.get("alternatives"):
        lines.append(f"  alternatives: {', '.join(plan['alternatives'])}")
    context = record.data.get("plan_context")
    if context:
        paused = ", ".join(context.get("paused_accounts", [])) or "none"
        lines.append(
            f"  planned at {context.get('now')}, rotation {context.get('rotation')}, "
            f"paused: {paused}, configuration {str(record.data.get('config_digest'))[:16]}"
        )
    return lines


def _fill_lines(events: Iterable[AuditEvent]) -> list[str]:
    filled: dict[str, Decimal] = {}
    notional: dict[str, Decimal] = {}
    status: dict[str, str] = {}
    for e in events:
        account = e.account_id or "?"
        if isinstance(e.data.get("intent_status"), str) and e.intent_id:
            status[f"{account} {e.intent_id}"] = str(e.data["intent_status"])
        if e.type == "intent_transition":
            delta = Decimal(str(e.data.get("fill_delta") or 0))
            if delta > 0 and e.data.get("last_price") is not None:
                filled[account] = filled.get(account, Decimal(0)) + delta
                notional[account] = notional.get(account, Decimal(0)) + delta * Decimal(
                    str(e.data["last_price"])
                )
    lines = ["intents:"]
    lines += [f"  {k}: {v}" for k, v in sorted(status.items())] or ["  none"]
    lines.append("fills:")
    for account in sorted(filled):
        avg = notional[account] / filled[account]
        lines.append(f"  {account:<12} {filled[account]:>10} @ {avg:.6f} avg")
    if not filled:
        lines.append("  none")
    return lines


def timeline(signal_id: str, events: Sequence[AuditEvent]) -> str:
    """The human-readable story of one signal, from the events in chain order."""
    first = events[0]
    out = [f"signal {signal_id} (portfolio {first.portfolio}), {len(events)} audit events:"]
    out += [_event_line(e) for e in events]
    out.append("")
    try:
        out += _plan_lines(plan_record(events))
    except ReplayError:
        out.append("plan: none recorded")
    out += _fill_lines(events)
    statuses = [e for e in events if isinstance(e.data.get("signal_status"), str)]
    if statuses:
        last = statuses[-1]
        out.append(f"result: {last.data['signal_status']} ({last.rationale})")
    return "\n".join(out)


def replay_signal(store: AuditStore, signal_id: str, config: OrchConfig | None) -> tuple[str, int]:
    """The replay command's output and exit status (0 same plan, 1 different, 2 cannot)."""
    events = store.signal_events([signal_id])
    if not events:
        return f"signal {signal_id}: no events in the audit store", EXIT_CANNOT
    text = [timeline(signal_id, events), ""]
    try:
        outcome = replay_plan(events, config)
    except ReplayError as exc:
        return "\n".join([*text, f"replay: cannot re-run the planner: {exc}"]), EXIT_CANNOT
    text += [f"replay: {n}" for n in outcome.notes]
    if not outcome.replayed:
        return "\n".join(text), EXIT_SAME
    if outcome.same:
        text.append("replay: SAME plan (every field equal)")
        return "\n".join(text), EXIT_SAME
    text.append(f"replay: DIFFERENT plan, {len(outcome.differences)} fields differ:")
    text += [f"  {d}" for d in outcome.differences]
    return "\n".join(text), EXIT_DIFFERENT
